"""Grade a whole class's submissions of one chapter, with student code sandboxed.

    python -m autograders.engine.grade --submissions submitted/ --chapter 01_self_attention [--workers 2]
                                [--out DIR] [--gradebook sqlite:///gradebook.db]

What runs where:

* The tests come from the instructor's source notebook (``solutions/<chapter>/``), never from the
  submission: each test cell (nbgrader ``grade: true``, ``solution: false``) is read with ``ast`` for
  its ``<module>.check("<check>", <name>)`` calls and its points.
* For each student, the student's code cells run in order inside :class:`autograders.engine.sandbox.Sandbox`,
  except test cells and cells that the SOURCE tags ``skip-in-grading`` (matched to the student's cells
  by cell id or grade id; the student's own metadata cannot add to or remove from these), and only up
  to the last graded exercise. Right after each exercise's solution cell the sandbox calls
  :func:`autograders.engine.core.produce` (visible and hidden cases, a fresh random seed per student) and
  returns plain arrays (.npz, loaded without pickle) and JSON.
* A cell that kills the sandbox (exit, segfault, memory, hang past the per-cell wall limit) is left out
  and the remaining exercises are run again without it: a crash costs only the exercise it happens in.
* This process judges the arrays with :func:`autograders.engine.core.judge` against the reference, gives a
  test cell its points when every check it calls passes (all or nothing, as nbgrader), and alone writes
  nbgrader's gradebook (the assignment's cells as ``nbgrader generate_assignment`` records them, then a
  submission and auto scores per student as ``nbgrader autograde`` does), ``autograded/`` and
  ``feedback/`` notebooks in nbgrader's layout, ``grades.csv``, ``summary.md`` and ``results.json``.

Accepts nbgrader's ``submitted/<student>/<chapter>/*.ipynb`` layout or a flat folder of
``<student>.ipynb`` files.
"""

from __future__ import annotations

import argparse
import ast
import csv
import html
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import numpy as np
import warnings

from autograders import core
from autograders.engine.sandbox import REPO, Limits, Sandbox, describe_exit

SKIP_TAG = "skip-in-grading"
MAX_NOTEBOOK_BYTES = 20 << 20
MAX_OUTPUT_BYTES = 64 << 20


# ---------------------------------------------------------------------------------------------
# The instructor's source: exercises, points, cells to leave out


@dataclass(frozen=True)
class CheckCall:
    module: str
    check: str
    impl: str


@dataclass
class Exercise:
    name: str  # the test cell's grade_id, e.g. test_stable_softmax
    points: float
    checks: list[CheckCall]
    cell_id: str | None
    source: str  # the test cell as in the source (hidden tests included)
    anchor_ids: set[str] = field(default_factory=set)  # ids / grade ids of its solution cell


@dataclass
class SourceNotebook:
    name: str  # file name, e.g. self_attention.ipynb
    nb: nbformat.NotebookNode
    exercises: list[Exercise]
    test_keys: set[str]  # ids and grade ids of test cells
    test_sources: set[str]
    skip_keys: set[str]
    release: nbformat.NotebookNode | None


def _nbgrader(cell) -> dict:
    md = cell.get("metadata", {}) if isinstance(cell, dict) else {}
    value = md.get("nbgrader", {}) if isinstance(md, dict) else {}
    return value if isinstance(value, dict) else {}


def _keys(cell) -> set[str]:
    keys = set()
    if isinstance(cell.get("id"), str):
        keys.add("id:" + cell["id"])
    grade_id = _nbgrader(cell).get("grade_id")
    if isinstance(grade_id, str):
        keys.add("grade:" + grade_id)
    return keys


def _norm(source: str) -> str:
    return "\n".join(line.rstrip() for line in source.strip().splitlines())


def _check_calls(source: str) -> list[CheckCall]:
    """The ``alias.check("name", impl)`` calls of a test cell, with the module each alias names."""
    tree = ast.parse(source)
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "autograders":
            for a in node.names:
                aliases[a.asname or a.name] = f"autograders.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("autograders."):
                    aliases[a.asname or a.name] = a.name
    calls = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "check"
                and isinstance(node.func.value, ast.Name) and node.func.value.id in aliases
                and len(node.args) >= 2 and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str) and isinstance(node.args[1], ast.Name)):
            call = CheckCall(aliases[node.func.value.id], node.args[0].value, node.args[1].id)
            if call not in calls:
                calls.append(call)
    return calls


def load_source(path: Path, release_path: Path | None) -> SourceNotebook:
    nb = nbformat.read(path, as_version=4)
    exercises, test_keys, test_sources, skip_keys = [], set(), set(), set()
    last_solution: set[str] = set()
    for cell in nb.cells:
        md = _nbgrader(cell)
        tags = cell.get("metadata", {}).get("tags", []) or []
        if SKIP_TAG in tags:
            skip_keys |= _keys(cell)
        if cell.cell_type != "code":
            continue
        if md.get("solution"):
            last_solution = _keys(cell)
        if md.get("grade") and not md.get("solution"):
            calls = _check_calls(cell.source)
            test_keys |= _keys(cell)
            test_sources.add(_norm(cell.source))
            if not calls:
                raise ValueError(f"{path}: test cell {md.get('grade_id')!r} calls no check")
            exercises.append(Exercise(md["grade_id"], float(md.get("points", 0)), calls, cell.get("id"),
                                      cell.source, set(last_solution)))
    release = None
    if release_path is not None and release_path.exists():
        release = nbformat.read(release_path, as_version=4)
        for cell in release.cells:
            if cell.cell_type == "code" and _nbgrader(cell).get("grade") and not _nbgrader(cell).get("solution"):
                test_sources.add(_norm(cell.source))
    return SourceNotebook(path.name, nb, exercises, test_keys, test_sources, skip_keys, release)


# ---------------------------------------------------------------------------------------------
# Submissions


@dataclass
class Submission:
    student: str
    files: dict[str, Path]  # notebook name -> file
    problem: str | None = None
    timestamp: str | None = None


_SAFE = re.compile(r"[^A-Za-z0-9_.@+-]")


def find_submissions(root: Path, chapter: str, notebook_names: list[str]) -> list[Submission]:
    """nbgrader's submitted/<student>/<chapter>/*.ipynb, or a flat folder of <student>.ipynb."""
    root = Path(root)
    subs: dict[str, Submission] = {}
    nested = [d for d in sorted(root.iterdir()) if d.is_dir() and (d / chapter).is_dir()]
    if nested:
        for d in nested:
            student = _SAFE.sub("_", d.name)
            files = {p.name: p for p in sorted((d / chapter).glob("*.ipynb"))}
            sub = Submission(student, {n: files[n] for n in notebook_names if n in files})
            missing = [n for n in notebook_names if n not in files]
            if missing:
                if len(notebook_names) == 1 and len(files) == 1:
                    sub.files = {notebook_names[0]: next(iter(files.values()))}  # renamed notebook
                else:
                    sub.problem = f"missing notebook(s): {', '.join(missing)}"
            stamp = d / chapter / "timestamp.txt"
            if stamp.is_file():
                sub.timestamp = stamp.read_text()[:64].strip() or None
            subs[student] = sub
    for p in sorted(root.glob("*.ipynb")):
        student = _SAFE.sub("_", p.stem)
        if student in subs:
            continue
        if len(notebook_names) != 1:
            subs[student] = Submission(student, {}, f"a flat submission needs one notebook per student; "
                                                    f"this chapter has {len(notebook_names)}")
        else:
            subs[student] = Submission(student, {notebook_names[0]: p})
    return list(subs.values())


def read_notebook(path: Path) -> tuple[nbformat.NotebookNode | None, str | None]:
    try:
        size = path.stat().st_size
        if size == 0:
            return None, "the file is empty"
        if size > MAX_NOTEBOOK_BYTES:
            return None, f"the file is {size >> 20} MiB, more than the {MAX_NOTEBOOK_BYTES >> 20} MiB allowed"
        nb = nbformat.reads(path.read_text(encoding="utf-8", errors="replace"), as_version=4)
        if not isinstance(nb.get("cells"), list):
            return None, "not a notebook: no list of cells"
        for cell in nb.cells:
            if not isinstance(cell, dict) or cell.get("cell_type") not in ("code", "markdown", "raw"):
                return None, "not a notebook: a cell without a valid cell_type"
            if isinstance(cell.get("source"), list):
                cell["source"] = "".join(map(str, cell["source"]))
            if not isinstance(cell.get("source"), str):
                return None, "not a notebook: a cell without source text"
        return nb, None
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a reason, not a crash
        return None, f"not a valid notebook ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"


# ---------------------------------------------------------------------------------------------
# Planning and running one student's notebook


_DEFINES = "^(?:(?:async\\s+)?def|class)\\s+{0}\\b|^{0}\\s*(?::[^=]*)?=(?!=)"


def plan(student_nb, src: SourceNotebook) -> tuple[list[dict], dict[int, list[Exercise]], dict[str, int]]:
    """The student's cells to run (index, source) and where each exercise's outputs are produced."""
    runnable = []
    for i, cell in enumerate(student_nb.cells):
        if cell.get("cell_type") != "code":
            continue
        keys = _keys(cell)  # matched against the SOURCE's cells; the student's flags are not trusted
        if keys & src.test_keys or keys & src.skip_keys:
            continue
        if _norm(cell["source"]) in src.test_sources:  # a test cell whose id and metadata were changed
            continue
        runnable.append(i)
    anchors: dict[str, int] = {}
    for ex in src.exercises:
        position = None
        for i in runnable:
            if _keys(student_nb.cells[i]) & ex.anchor_ids:
                position = i
                break
        if position is None:  # ids or metadata changed: the first cell that defines the name
            names = {c.impl for c in ex.checks}
            for i in runnable:
                if any(re.search(_DEFINES.format(re.escape(n)), student_nb.cells[i]["source"], re.M) for n in names):
                    position = i
                    break
        if position is None:
            position = runnable[-1] if runnable else -1
        anchors[ex.name] = position
    last = max(anchors.values(), default=-1)
    cells = [{"index": i, "source": student_nb.cells[i]["source"]} for i in runnable if i <= last]
    checkpoints: dict[int, list[Exercise]] = {}
    for ex in src.exercises:
        checkpoints.setdefault(anchors[ex.name], []).append(ex)
    return cells, checkpoints, anchors


@dataclass
class ExerciseResult:
    name: str
    points: float
    max_points: float
    reasons: list[str]
    reports: list[str]


def _load_outputs(scratch: Path, ex: Exercise) -> dict[str, dict[str, core.Produced]] | str:
    js, npz = scratch / f"{ex.name}.json", scratch / f"{ex.name}.npz"
    try:
        if js.stat().st_size > MAX_OUTPUT_BYTES or npz.stat().st_size > MAX_OUTPUT_BYTES:
            return "its outputs were too large"
        record = json.loads(js.read_text())
        produced: dict[str, dict[str, core.Produced]] = {}
        with np.load(npz, allow_pickle=False) as arrays:
            for call in ex.checks:
                entry = record.get(call.check) if isinstance(record, dict) else None
                if not isinstance(entry, dict):
                    continue
                if "missing" in entry:
                    produced[call.check] = {"__missing__": core.Produced(None, str(entry["missing"])[:500])}
                    continue
                cases = entry.get("cases", {})
                out = {}
                for case, value in (cases.items() if isinstance(cases, dict) else ()):
                    if not isinstance(value, dict):
                        continue
                    if value.get("error") is not None:
                        out[str(case)] = core.Produced(None, str(value["error"])[:2000])
                    else:
                        keys = value.get("arrays", [])
                        out[str(case)] = core.Produced(tuple(np.asarray(arrays[k]) for k in keys))
                produced[call.check] = out
        return produced
    except FileNotFoundError:
        return "no outputs came back"
    except Exception as exc:  # noqa: BLE001 - malformed outputs are the student's loss only
        return f"its outputs could not be read ({type(exc).__name__})"


def judge_exercise(ex: Exercise, produced: dict | str, seed: int, modules: dict) -> ExerciseResult:
    if isinstance(produced, str):
        return ExerciseResult(ex.name, 0.0, ex.points, [produced], [])
    reasons, reports = [], []
    for call in ex.checks:
        check = modules[call.module].CHECKS[call.check]
        got = produced.get(call.check)
        if got is None:
            reasons.append(f"{call.check}: no outputs came back")
            continue
        if "__missing__" in got:
            reasons.append(f"{call.check}: {got['__missing__'].error}")
            continue
        report = core.judge(check, got, seed, None)
        reports.append(report.summary())
        if not report.passed:
            first = report.failures()[0].message.splitlines()[0]
            reasons.append(f"{call.check}: {len(report.failures())} of {len(report.results)} case(s) wrong; "
                           f"first: {first[:300]}")
    points = ex.points if not reasons else 0.0
    return ExerciseResult(ex.name, points, ex.points, reasons, reports)


def grade_notebook(student_nb, src: SourceNotebook, sandbox: Sandbox, slot: int, seed: int, modules: dict,
                   budget_s: float) -> tuple[dict[str, ExerciseResult], list[str]]:
    """Run one notebook's exercises in the sandbox (again without a cell that kills it), judge here."""
    cells, checkpoints, anchors = plan(student_nb, src)
    by_name = {ex.name: ex for ex in src.exercises}
    results: dict[str, ExerciseResult] = {}
    notes: list[str] = []
    excluded: set[int] = set()
    started = time.monotonic()
    for _attempt in range(len(cells) + len(src.exercises) + 2):
        pending = [ex for ex in src.exercises if ex.name not in results]
        if not pending:
            break
        if time.monotonic() - started > budget_s:
            for ex in pending:
                results[ex.name] = ExerciseResult(ex.name, 0.0, ex.points, [
                    f"not graded: the notebook used up its {budget_s:g} s grading time"], [])
            break
        pending_names = {ex.name for ex in pending}
        job = {"seed": seed,
               "cells": [c for c in cells if c["index"] not in excluded],
               "checkpoints": {str(i): [{"exercise": ex.name, "checks": [vars(c) for c in ex.checks]}
                                        for ex in exs if ex.name in pending_names]
                               for i, exs in checkpoints.items()}}
        last_anchor = max(anchors[n] for n in pending_names)
        job["cells"] = [c for c in job["cells"] if c["index"] <= last_anchor]
        if -1 in checkpoints:  # no code cell at all: produce before anything runs
            job["cells"] = [{"index": -1, "source": ""}] + job["cells"]
        result, scratch = sandbox.run(job, slot)
        try:
            done = {line.split(" ", 1)[1] for line in result.progress if line.startswith("done ")}
            for ex in pending:
                if ex.name in done:
                    results[ex.name] = judge_exercise(ex, _load_outputs(scratch, ex), seed, modules)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if result.finished:
            for ex in pending:
                if ex.name not in results:
                    results[ex.name] = ExerciseResult(ex.name, 0.0, ex.points, ["no outputs came back"], [])
            break
        why = describe_exit(result, sandbox.limits)
        step = result.last_step() or ""
        if step.startswith("cell ") and step[5:].lstrip("-").isdigit():
            index = int(step[5:])
            excluded.add(index)
            hit = [ex for ex in checkpoints.get(index, []) if ex.name not in results]
            for ex in hit:  # the exercise's own solution cell
                results[ex.name] = ExerciseResult(ex.name, 0.0, ex.points, [
                    f"its solution cell (cell {index + 1}) did not finish: {why}"], [])
            if not hit:
                notes.append(f"cell {index + 1} was left out: {why}")
        elif step.startswith("produce ") and step[8:] in by_name and step[8:] not in results:
            ex = by_name[step[8:]]
            results[ex.name] = ExerciseResult(ex.name, 0.0, ex.points, [f"running it on the test inputs: {why}"], [])
        else:
            for ex in pending:
                if ex.name not in results:
                    results[ex.name] = ExerciseResult(ex.name, 0.0, ex.points, [
                        f"the sandbox ended before the notebook ran ({why})"
                        + (f": {result.log_tail.strip().splitlines()[-1][:300]}" if result.log_tail.strip() else "")], [])
            break
    for ex in src.exercises:
        results.setdefault(ex.name, ExerciseResult(ex.name, 0.0, ex.points, ["not graded"], []))
    return results, notes


# ---------------------------------------------------------------------------------------------
# What the grader writes


def autograded_notebook(student_nb, src: SourceNotebook, results: dict[str, ExerciseResult], anchors: dict):
    """The student's notebook with the SOURCE's test cells (restored, with the verdict as output)."""
    nb = nbformat.from_dict(json.loads(json.dumps(student_nb)))
    src_cells = {c.get("id"): c for c in (src.release or src.nb).cells}
    solution_keys = {k for ex in src.exercises for k in ex.anchor_ids}
    out_cells = []
    placed = set()
    for i, cell in enumerate(nb.cells):
        keys = _keys(cell)
        if cell.get("cell_type") == "code" and (keys & src.test_keys or _norm(cell["source"]) in src.test_sources):
            continue  # the student's copy of a test cell: replaced by the source's below
        if not keys & solution_keys:
            cell.get("metadata", {}).pop("nbgrader", None)  # the student cannot make cells graded
        out_cells.append(cell)
        for ex in src.exercises:
            if anchors.get(ex.name) == i and ex.name not in placed:
                placed.add(ex.name)
                out_cells.append(_test_cell(ex, results[ex.name], src_cells.get(ex.cell_id)))
    for ex in src.exercises:
        if ex.name not in placed:
            out_cells.append(_test_cell(ex, results[ex.name], src_cells.get(ex.cell_id)))
    nb.cells = out_cells
    return nb


def _test_cell(ex: Exercise, result: ExerciseResult, release_cell):
    cell = nbformat.v4.new_code_cell(ex.source)
    if ex.cell_id:
        cell.id = ex.cell_id
    md = dict(_nbgrader(release_cell)) if release_cell is not None else {}
    md.update({"grade": True, "solution": False, "locked": True, "grade_id": ex.name, "points": ex.points,
               "schema_version": 3, "task": False})
    cell.metadata["nbgrader"] = md
    if result.points == result.max_points:
        text = "\n".join(result.reports) or f"PASS {ex.name}"
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=text + "\n")]
    else:
        text = "\n".join(result.reasons + result.reports)
        cell.outputs = [nbformat.v4.new_output("error", ename="CheckFailed", evalue=text, traceback=[text])]
    cell.execution_count = 1
    return cell


def feedback_html(nb, student: str, chapter: str, rows: list[ExerciseResult]) -> str:
    from nbconvert import HTMLExporter
    from nbgrader.preprocessors import ClearHiddenTests

    nb = nbformat.from_dict(json.loads(json.dumps(nb)))
    nb, _ = ClearHiddenTests().preprocess(nb, {})
    total = sum(r.points for r in rows)
    maximum = sum(r.max_points for r in rows)
    lines = [f"# Feedback: {chapter}, {student}", "", f"**Score: {total:g} / {maximum:g}**", "",
             "| exercise | points | why points were lost |", "|---|---:|---|"]
    for r in rows:
        why = "; ".join(r.reasons).replace("|", "\\|").replace("\n", " ") or ""
        lines.append(f"| {r.name} | {r.points:g} / {r.max_points:g} | {html.escape(why)} |")
    nb.cells.insert(0, nbformat.v4.new_markdown_cell("\n".join(lines)))
    for cell in nb.cells:  # the grader never executed the student's cells here: drop stale outputs
        if cell.cell_type == "code" and not _nbgrader(cell).get("grade"):
            cell.outputs = []
    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nb)
    return body


def ensure_assignment(db_url: str, chapter: str, source_folder: Path) -> None:
    """Record the assignment's notebooks and cells in the gradebook as ``nbgrader generate_assignment``
    does (it is run on a temporary copy, so the course's release folder is not touched)."""
    from nbgrader.api import Gradebook, MissingEntry

    with Gradebook(db_url) as gb:
        try:
            assignment = gb.find_assignment(chapter)
            names = {n.name for n in assignment.notebooks}
            if names == {p.stem for p in source_folder.glob("*.ipynb")} and all(
                    n.grade_cells for n in assignment.notebooks):
                return
        except MissingEntry:
            pass
    with tempfile.TemporaryDirectory(prefix="grade-source-") as tmp:
        shutil.copytree(source_folder, Path(tmp) / "source" / chapter)
        config = (REPO / "nbgrader_config.py").read_text()
        config += (f"\nc.CourseDirectory.root = {tmp!r}\nc.CourseDirectory.source_directory = 'source'\n"
                   f"c.CourseDirectory.release_directory = 'release'\nc.CourseDirectory.db_url = {db_url!r}\n")
        (Path(tmp) / "nbgrader_config.py").write_text(config)
        proc = subprocess.run([sys.executable, "-m", "nbgrader", "generate_assignment", chapter, "--force"],
                              cwd=tmp, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0:
            raise RuntimeError(f"nbgrader generate_assignment failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def write_gradebook(gb, chapter: str, student: str, timestamp: str | None,
                    per_notebook: dict[str, dict[str, ExerciseResult]]) -> None:
    from nbgrader.api import MissingEntry
    from sqlalchemy.exc import SAWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SAWarning)  # nbgrader's add_submission, as in `nbgrader autograde`
        gb.update_or_create_student(student)
        try:
            gb.find_submission(chapter, student)
        except MissingEntry:
            gb.add_submission(chapter, student)
        submission = gb.find_submission(chapter, student)
        if timestamp:
            try:
                from nbgrader import utils

                submission.timestamp = utils.parse_utc(timestamp)
            except Exception:  # noqa: BLE001
                pass
        for notebook, results in per_notebook.items():
            for name, r in results.items():
                grade = gb.find_grade(name, notebook, chapter, student)
                grade.auto_score = r.points
                grade.needs_manual_grade = grade.manual_score is not None
        gb.db.commit()


# ---------------------------------------------------------------------------------------------
# The whole class


@dataclass
class StudentResult:
    student: str
    rows: list[ExerciseResult]
    notes: list[str]
    seconds: float
    notebooks: dict = field(default_factory=dict)  # name -> autograded notebook (or None)

    @property
    def score(self) -> float:
        return sum(r.points for r in self.rows)


class Grader:
    def __init__(self, chapter: str, course_dir: Path = REPO, source_dir: Path | None = None,
                 release_dir: Path | None = None, limits: Limits | None = None, workers: int = 2,
                 db_url: str | None = None, out: Path | None = None, budget_s: float = 600.0,
                 force_fallback: bool = False, progress: bool = True):
        self.chapter = chapter
        self.course_dir = Path(course_dir)
        self.source_folder = Path(source_dir or self.course_dir / "solutions") / chapter
        release_folder = Path(release_dir or self.course_dir / "chapters") / chapter
        paths = sorted(self.source_folder.glob("*.ipynb"))
        if not paths:
            raise SystemExit(f"no source notebook in {self.source_folder}")
        self.sources = [load_source(p, release_folder / p.name) for p in paths]
        module_names = sorted({c.module for s in self.sources for ex in s.exercises for c in ex.checks})
        self.modules = {m: importlib.import_module(m) for m in module_names}
        self.sandbox = Sandbox(limits, modules=tuple(module_names), force_fallback=force_fallback)
        self.workers = max(1, workers)
        self.db_url = db_url or f"sqlite:///{self.course_dir / 'gradebook.db'}"
        self.out = Path(out or self.course_dir / "graded" / chapter)
        self.budget_s = budget_s
        self.progress = progress
        # nbgrader's Gradebook runs `alembic` from PATH: the virtual environment's bin/ must be on it
        bin_dir = str(Path(sys.executable).parent)
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")

    def grade_student(self, sub: Submission, slot: int) -> StudentResult:
        start = time.monotonic()
        rows, notes, notebooks = [], [], {}
        for src in self.sources:
            path = sub.files.get(src.name)
            problem = sub.problem or (None if path else f"{src.name} was not submitted")
            nb = None
            if problem is None:
                nb, problem = read_notebook(path)
            if problem is not None:
                rows += [ExerciseResult(ex.name, 0.0, ex.points, [problem], []) for ex in src.exercises]
                notebooks[src.name] = None
                continue
            try:
                results, extra = grade_notebook(nb, src, self.sandbox, slot, core.fresh_seed(), self.modules,
                                                self.budget_s)
            except Exception as exc:  # noqa: BLE001 - one odd notebook must not stop the class
                results = {ex.name: ExerciseResult(ex.name, 0.0, ex.points, [
                    f"could not be graded ({type(exc).__name__}: {str(exc)[:200]})"], []) for ex in src.exercises}
                extra = []
            try:
                notebooks[src.name] = autograded_notebook(nb, src, results, plan(nb, src)[2])
            except Exception as exc:  # noqa: BLE001
                notebooks[src.name] = None
                extra.append(f"no feedback notebook ({type(exc).__name__}: {str(exc)[:200]})")
            rows += [results[ex.name] for ex in src.exercises]
            notes += extra
        return StudentResult(sub.student, rows, notes, time.monotonic() - start, notebooks)

    def run(self, submissions_root: Path) -> list[StudentResult]:
        from tqdm import tqdm

        if self.sandbox.warning:
            print("\n" + "!" * 100 + "\n" + self.sandbox.warning + "\n" + "!" * 100 + "\n", file=sys.stderr)
        subs = find_submissions(Path(submissions_root), self.chapter, [s.name for s in self.sources])
        ensure_assignment(self.db_url, self.chapter, self.source_folder)
        self.out.mkdir(parents=True, exist_ok=True)
        slots = list(range(self.workers))
        import queue

        free: queue.Queue[int] = queue.Queue()
        for s in slots:
            free.put(s)

        def task(sub):
            slot = free.get()
            try:
                return self.grade_student(sub, slot)
            finally:
                free.put(slot)

        from nbgrader.api import Gradebook

        results = []
        self.gradebook = Gradebook(self.db_url)
        with self.gradebook, ThreadPoolExecutor(self.workers) as pool:
            futures = {pool.submit(task, sub): sub for sub in subs}
            bar = tqdm(total=len(futures), desc=f"grading {self.chapter}", unit="student", disable=not self.progress)
            for future in as_completed(futures):
                sub = futures[future]
                try:
                    res = future.result()
                except Exception as exc:  # noqa: BLE001
                    res = StudentResult(sub.student, [ExerciseResult(ex.name, 0.0, ex.points, [
                        f"could not be graded ({type(exc).__name__})"], []) for s in self.sources
                        for ex in s.exercises], [], 0.0)
                self._record(sub, res)
                results.append(res)
                bar.update(1)
            bar.close()
        results.sort(key=lambda r: r.student)
        self._write_reports(results)
        return results

    def _record(self, sub: Submission, res: StudentResult) -> None:
        per_notebook, i = {}, 0
        for src in self.sources:
            n = len(src.exercises)
            per_notebook[Path(src.name).stem] = {r.name: r for r in res.rows[i:i + n]}
            i += n
        write_gradebook(self.gradebook, self.chapter, sub.student, sub.timestamp, per_notebook)
        for src in self.sources:
            nb = res.notebooks.get(src.name)
            if nb is None:
                continue
            auto = self.course_dir / "autograded" / sub.student / self.chapter
            auto.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, auto / src.name)
            fb = self.course_dir / "feedback" / sub.student / self.chapter
            fb.mkdir(parents=True, exist_ok=True)
            rows = list(per_notebook[Path(src.name).stem].values())
            (fb / src.name.replace(".ipynb", ".html")).write_text(
                feedback_html(nb, sub.student, self.chapter, rows), encoding="utf-8")
        res.notebooks = {}

    def _write_reports(self, results: list[StudentResult]) -> None:
        names = [ex.name for s in self.sources for ex in s.exercises]
        maximum = sum(ex.points for s in self.sources for ex in s.exercises)
        with open(self.out / "grades.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["student_id", "assignment", *names, "score", "max_score"])
            for r in results:
                w.writerow([r.student, self.chapter, *[f"{x.points:g}" for x in r.rows], f"{r.score:g}", f"{maximum:g}"])
        (self.out / "results.json").write_text(json.dumps({
            "chapter": self.chapter, "sandbox": self.sandbox.mode, "warning": self.sandbox.warning,
            "students": [{"student": r.student, "score": r.score, "max_score": maximum, "seconds": round(r.seconds, 2),
                          "notes": r.notes, "exercises": {x.name: {"points": x.points, "max_points": x.max_points,
                                                                   "reasons": x.reasons} for x in r.rows}}
                         for r in results]}, indent=1))
        (self.out / "summary.md").write_text(summary_table(results, names, maximum, self.sandbox.warning))


def summary_table(results: list[StudentResult], names: list[str], maximum: float, warning: str | None) -> str:
    lines = []
    if warning:
        lines += [f"**{warning}**", ""]
    lines += ["| student | " + " | ".join(names) + " | total | why points were lost |",
              "|---|" + "---:|" * (len(names) + 1) + "---|"]
    for r in results:
        why = "; ".join(f"{x.name}: {x.reasons[0]}" for x in r.rows if x.reasons)
        why += "".join(f"; note: {n}" for n in r.notes)
        why = why.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r.student} | " + " | ".join(f"{x.points:g}" for x in r.rows)
                     + f" | {r.score:g}/{maximum:g} | {why[:600]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autograders.engine.grade", description=__doc__.split("\n\n")[0])
    p.add_argument("--submissions", required=True, type=Path,
                   help="submitted/ (nbgrader layout) or a folder of <student>.ipynb files")
    p.add_argument("--chapter", required=True, help="e.g. 01_self_attention")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--out", type=Path, help="where grades.csv, summary.md, results.json go "
                                            "(default: graded/<chapter>/ in the course directory)")
    p.add_argument("--gradebook", help="nbgrader database URL (default: sqlite:///<course dir>/gradebook.db)")
    p.add_argument("--course-dir", type=Path, default=REPO,
                   help="nbgrader course directory: source notebooks in solutions/, autograded/ and "
                        "feedback/ are written there (default: this repository)")
    p.add_argument("--source-dir", type=Path, help="instructor notebooks (default: <course dir>/solutions)")
    p.add_argument("--release-dir", type=Path, help="student release (default: <course dir>/chapters)")
    p.add_argument("--step-timeout", type=float, default=20.0, help="wall-clock seconds per cell (default 20)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    grader = Grader(args.chapter, course_dir=args.course_dir, source_dir=args.source_dir,
                    release_dir=args.release_dir, workers=args.workers, db_url=args.gradebook,
                    out=args.out, limits=Limits(step_wall_s=args.step_timeout), progress=not args.no_progress)
    start = time.monotonic()
    results = grader.run(args.submissions)
    names = [ex.name for s in grader.sources for ex in s.exercises]
    maximum = sum(ex.points for s in grader.sources for ex in s.exercises)
    print(summary_table(results, names, maximum, grader.sandbox.warning))
    print(f"{len(results)} submission(s) graded in {time.monotonic() - start:.1f} s with {grader.workers} "
          f"worker(s), sandbox: {grader.sandbox.mode}. Gradebook: {grader.db_url}; "
          f"grades: {grader.out / 'grades.csv'}; feedback: {grader.course_dir / 'feedback'}")
    if grader.sandbox.warning:
        print(grader.sandbox.warning, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
