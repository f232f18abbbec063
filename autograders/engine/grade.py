"""Grade a whole class's submissions of one chapter, with student code sandboxed.

    python -m autograders.engine.grade --submissions submitted/ --chapter 01_self_attention [--workers 2]
                                       [--out DIR] [--gradebook sqlite:///gradebook.db] [--shard i/n]

What runs where:

* The tests come from the instructor's source notebook (``solutions/<chapter>/``), never from the
  submission: each test cell (nbgrader ``grade: true``, ``solution: false``) is read with ``ast`` for
  its ``<module>.check("<check>", <name>)`` calls and its points.
* For each student, the student's code cells run in order inside :class:`~autograders.engine.sandbox.Sandbox`,
  except test cells and cells that the SOURCE tags ``skip-in-grading`` (matched by cell id or grade id;
  the student's own metadata cannot add to or remove from these), and only up to the last graded
  exercise. Right after each exercise's solution cell the sandbox calls
  :func:`~autograders.engine.core.produce` with the exercise's *task* (inputs and call only: the sandbox
  holds no reference) on a fresh random seed per student, and sends the outputs over a pipe.
* A cell that kills the sandbox (exit, segfault, memory, CPU time) is left out and the remaining
  exercises are run again without it: a crash costs only the exercise it happens in.
* This process judges the outputs with :func:`~autograders.engine.core.judge` against the reference
  (one judgement at a time, so that references that seed torch's global generator stay deterministic
  with any number of workers), answers the sandbox's calls of *given* functions (earlier exercises that
  a later one uses) once the earlier exercise has been handed in, gives a test cell its points when
  every check it calls passes (all or nothing, as nbgrader), and alone writes nbgrader's gradebook,
  ``autograded/`` and ``feedback/`` in nbgrader's layout, ``grades.csv``, ``summary.md`` and
  ``results.json``.

Accepts nbgrader's ``submitted/<student>/<chapter>/*.ipynb`` layout or a flat folder of
``<student>.ipynb`` files. Symbolic links, FIFOs and other non-regular files are never followed or
opened; a student name that is not a plain identifier is graded under a distinct, derived id and the
report says so.
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import html
import importlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import torch

from autograders.engine import core
from autograders.engine.protocol import ProtocolError, decode_value, encode_value
from autograders.engine.sandbox import REPO, Limits, Sandbox, Session, describe_exit

SKIP_TAG = "skip-in-grading"
MAX_NOTEBOOK_BYTES = 20 << 20
MAX_ORACLE_CALLS = 20_000
# One judgement (reference, mistakes, given functions) at a time in this process: references may seed
# torch's global generator or import lazily, and two threads doing that at once give wrong answers.
JUDGE_LOCK = threading.RLock()


def shorten(text: str, limit: int) -> str:
    """``text`` cut at a word boundary, with an ellipsis, when it is longer than ``limit``."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return (cut if len(cut) > limit // 2 else text[:limit]) + " …"


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


def harness_of(module: str) -> str:
    """``autograders.self_attention`` -> ``autograders.harness.self_attention``."""
    parts = module.split(".")
    if len(parts) != 2 or parts[0] != "autograders":
        raise ValueError(f"a test cell calls checks of {module!r}; only autograders.<chapter> modules can grade")
    return f"autograders.harness.{parts[1]}"


def verify_split(modules: dict, harnesses: dict) -> None:
    """Every check the grader uses must take its task from the chapter's harness (what the sandbox runs)."""
    for name, module in modules.items():
        tasks = getattr(harnesses[harness_of(name)], "TASKS", None)
        for check in module.CHECKS:
            if tasks is None or check.name not in tasks or tasks[check.name] is not check.task:
                raise ValueError(f"{name}: check {check.name!r} does not take its task from "
                                 f"{harness_of(name)}.TASKS; the sandbox could not produce its outputs")
            for used in check.task.uses:
                if used not in check.given:
                    raise ValueError(f"{name}: check {check.name!r} uses {used!r} without a given version")


# ---------------------------------------------------------------------------------------------
# Submissions: every file is hostile until read


@dataclass
class Submission:
    student: str  # the id used in the gradebook and in file names
    files: dict[str, Path]  # notebook name -> file
    problem: str | None = None
    timestamp: str | None = None
    original: str | None = None  # the folder or file name, when the id had to differ from it
    notes: list[str] = field(default_factory=list)
    folder: Path | None = None  # nbgrader layout: submitted/<student>/<chapter>/


_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.@+-")


def student_id(name: str) -> tuple[str, bool]:
    """(id, changed). A plain name (ASCII letters, digits, ``_ . @ + -``, not starting with a dot, at
    most 64 characters) is its own id. Any other name gets a readable part plus 8 hex digits of a hash
    of the exact name, so two names never share an id, whatever they differ in."""
    if name and len(name) <= 64 and name[0] not in ".-" and set(name) <= _ID_CHARS:
        return name, False
    ascii_part = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    readable = "".join(ch if ch in _ID_CHARS else "_" for ch in ascii_part).strip("._-")[:40] or "student"
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{readable}-{digest}", True


def _kind(path: Path) -> str | None:
    """None for a regular file or folder, else what it is (never following a link)."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link (not followed)"
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        return None
    return "not a regular file (a FIFO, socket or device; not opened)"


def find_submissions(root: Path, chapter: str, notebook_names: list[str]) -> list[Submission]:
    """nbgrader's submitted/<student>/<chapter>/*.ipynb, or a flat folder of <student>.ipynb.
    Every entry becomes exactly one submission (with a problem when it cannot be graded)."""
    root = Path(root)
    if _kind(root) is not None or not root.is_dir():
        raise SystemExit(f"{root} is not a folder of submissions")
    subs: list[Submission] = []
    used: dict[str, str] = {}

    def add(name: str, sub_files: dict[str, Path], problem: str | None, timestamp: str | None = None):
        sid, changed = student_id(name)
        sub = Submission(sid, sub_files, problem, timestamp, name if changed else None)
        if changed:
            sub.notes.append(f"the name {name!r} is not a plain id; graded as {sid!r}")
        if sid in used:  # cannot happen with distinct names (the hash), but never merge two records
            sub.problem = f"two submissions map to the id {sid!r} ({used[sid]!r} and {name!r}); not graded"
            sub.student = f"{sid}-dup{len(subs)}"
        used[sub.student] = name
        subs.append(sub)

    entries = sorted(os.scandir(root), key=lambda e: e.name)
    for entry in entries:
        path = Path(entry.path)
        why = _kind(path)
        is_dir = why is None and stat.S_ISDIR(os.lstat(path).st_mode)
        if is_dir or (why is not None and not entry.name.endswith(".ipynb")):
            if why is not None:
                add(entry.name, {}, f"the submission folder is {why}")
                continue
            chapter_dir = path / chapter
            cwhy = _kind(chapter_dir)
            if cwhy is not None:
                if chapter_dir.exists() or chapter_dir.is_symlink():
                    add(entry.name, {}, f"the folder {chapter} is {cwhy}")
                continue  # a student folder without this chapter is not a submission of it
            files, problems = {}, []
            for f in sorted(os.scandir(chapter_dir), key=lambda e: e.name):
                if f.name.endswith(".ipynb"):
                    fwhy = _kind(Path(f.path))
                    if fwhy is not None:
                        problems.append(f"{f.name} is {fwhy}")
                    else:
                        files[f.name] = Path(f.path)
            chosen = {n: files[n] for n in notebook_names if n in files}
            missing = [n for n in notebook_names if n not in files]
            problem = None
            if missing:
                if len(notebook_names) == 1 and len(files) == 1:
                    chosen = {notebook_names[0]: next(iter(files.values()))}  # a renamed notebook
                else:
                    problem = "; ".join(problems + [f"missing notebook(s): {', '.join(missing)}"])
            stamp, timestamp = chapter_dir / "timestamp.txt", None
            if _kind(stamp) is None and stamp.is_file() and stamp.stat().st_size < 4096:
                timestamp = stamp.read_text(errors="replace")[:64].strip() or None
            add(entry.name, chosen, problem, timestamp)
            subs[-1].folder = chapter_dir
        elif entry.name.endswith(".ipynb"):
            stem = entry.name[: -len(".ipynb")]
            if why is not None:
                add(stem, {}, f"the file is {why}")
            elif len(notebook_names) != 1:
                add(stem, {}, f"a flat submission needs one notebook per student; this chapter has "
                              f"{len(notebook_names)}")
            else:
                add(stem, {notebook_names[0]: path}, None)
    return subs


def read_notebook(path: Path) -> tuple[nbformat.NotebookNode | None, str | None]:
    """Read one notebook without following links or blocking on FIFOs, bounded in size; cells with
    ids that nbformat refuses get fresh ones. Returns (notebook, None) or (None, why not)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        return None, f"the file could not be opened ({exc.strerror})"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, "not a regular file"
        if st.st_size == 0:
            return None, "the file is empty"
        if st.st_size > MAX_NOTEBOOK_BYTES:
            return None, f"the file is {st.st_size >> 20} MiB, more than the {MAX_NOTEBOOK_BYTES >> 20} MiB allowed"
        with os.fdopen(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_NOTEBOOK_BYTES + 1)
    finally:
        os.close(fd)
    try:
        data = json.loads(raw.decode("utf-8", errors="replace"))
        if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
            return None, "not a notebook: no list of cells"
        cells = []
        for i, cell in enumerate(data["cells"]):
            if not isinstance(cell, dict) or cell.get("cell_type") not in ("code", "markdown", "raw"):
                return None, "not a notebook: a cell without a valid cell_type"
            source = cell.get("source", "")
            if isinstance(source, list):
                source = "".join(map(str, source))
            if not isinstance(source, str):
                return None, "not a notebook: a cell without source text"
            md = cell.get("metadata") if isinstance(cell.get("metadata"), dict) else {}
            cid = cell.get("id")
            if not (isinstance(cid, str) and 1 <= len(cid) <= 64
                    and all(ch.isascii() and (ch.isalnum() or ch in "-_") for ch in cid)):
                cid = f"renumbered-{i}"
            new = {"cell_type": cell["cell_type"], "id": cid, "metadata": md, "source": source}
            if cell["cell_type"] == "code":
                new.update(outputs=[], execution_count=None)
            cells.append(new)
        nb = nbformat.from_dict({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5})
        return nb, None
    except (ValueError, RecursionError, MemoryError, TypeError) as exc:
        return None, f"not a valid notebook ({type(exc).__name__})"


# ---------------------------------------------------------------------------------------------
# Planning and running one student's notebook


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
            names = [c.impl for c in ex.checks]
            position = next((i for i in runnable if core.defines(student_nb.cells[i]["source"], names)), None)
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
    reasons: list[str]  # what the student may see
    reports: list[str]  # the checks' public summaries
    private: list[str] = field(default_factory=list)  # full messages, for the instructor


class _StudentSession(Session):
    """One run's conversation with the sandbox, for one student's notebook."""

    def __init__(self, grader: "Grader", src: SourceNotebook, pending: list[Exercise], sealed: set[str]):
        self.grader, self.src = grader, src
        self.pending = {ex.name: ex for ex in pending}
        self.records: dict[str, tuple[dict, list[bytes]]] = {}
        self.sealed = sealed  # exercises handed in (this run or an earlier one)
        self.owner = {c.impl: ex.name for ex in src.exercises for c in ex.checks}
        self.calls = 0

    def on_record(self, header, blobs):
        name = header.get("exercise")
        if name in self.pending and name not in self.records:  # the first record of an exercise counts
            self.records[name] = (header, blobs)
            self.sealed.add(name)

    def on_call(self, header, blobs):
        name = header.get("name")
        self.calls += 1
        owner = self.owner.get(name)
        if self.calls > MAX_ORACLE_CALLS:
            return {"error": "too many calls of given functions"}, []
        if owner is None or owner not in self.sealed:
            return {"error": f"{name!r} is not given yet"}, []
        impl = self.grader.given.get(name)
        if impl is None:
            return {"error": f"{name!r} is not a given function here"}, []
        try:
            args, kwargs = decode_value(header.get("value"), blobs)
            with JUDGE_LOCK, torch.no_grad():
                value = impl(*args, **dict(kwargs))
            out: list[bytes] = []
            return {"value": encode_value(value, out)}, out
        except (ProtocolError, ValueError) as exc:
            return {"error": f"bad arguments ({shorten(exc, 200)})"}, []
        except Exception as exc:  # noqa: BLE001 - the student's arguments made the given function fail
            return {"error": f"{type(exc).__name__}: {shorten(exc, 300)}"}, []


def _produced_from(record: dict, blobs: list[bytes], check: str) -> dict[str, core.Produced] | str:
    """One check's outputs from a record, as untrusted blobs (decoded later against the reference)."""
    entry = record.get("checks", {}).get(check) if isinstance(record.get("checks"), dict) else None
    if not isinstance(entry, dict):
        return "no outputs came back"
    if "missing" in entry:
        return shorten(entry["missing"], 300)
    cases = entry.get("cases")
    if not isinstance(cases, dict):
        return "its outputs could not be read"
    out = {}
    for case, value in list(cases.items())[:1000]:
        if not isinstance(value, dict):
            continue
        if value.get("error") is not None:
            out[str(case)] = core.Produced(None, shorten(value["error"], 2000),
                                           "rule" if value.get("kind") == "rule" else "error")
            continue
        idx = value.get("arrays")
        if not isinstance(idx, list) or not all(isinstance(i, int) and 0 <= i < len(blobs) for i in idx):
            out[str(case)] = core.Produced(None, "its outputs could not be read")
            continue
        out[str(case)] = core.Produced(tuple(core.Blob(blobs[i]) for i in idx))
    return out


def judge_exercise(ex: Exercise, record: tuple[dict, list[bytes]] | None, seed: int, modules: dict) -> ExerciseResult:
    if record is None:
        return ExerciseResult(ex.name, 0.0, ex.points, ["no outputs came back"], [])
    header, blobs = record
    reasons, reports, private = [], [], []
    for call in ex.checks:
        check = modules[call.module].CHECKS[call.check]
        got = _produced_from(header, blobs, call.check)
        if isinstance(got, str):
            reasons.append(f"{call.check}: {got}")
            private.append(f"{call.check}: {got}")
            continue
        with JUDGE_LOCK:
            report = core.judge(check, got, seed, None)
        reports.append(report.summary(public=True))
        if not report.passed:
            first = report.failures()[0]
            reasons.append(f"{call.check}: {len(report.failures())} of {len(report.results)} case(s) wrong; "
                           f"first: {first.public}")
            private.append(report.summary())
    points = ex.points if not reasons else 0.0
    return ExerciseResult(ex.name, points, ex.points, reasons, reports, private)


def _steps(cells: list[dict], checkpoints: dict[int, list[Exercise]], pending: set[str]) -> list[str]:
    steps = ["start", "ready"]
    for c in cells:
        steps.append(f"cell {c['index']}")
        for ex in checkpoints.get(c["index"], []):
            if ex.name in pending:
                steps += [f"produce {ex.name}", f"done {ex.name}"]
    return steps + ["end"]


def grade_notebook(student_nb, src: SourceNotebook, grader: "Grader", slot: int, seed: int,
                   budget_s: float) -> tuple[dict[str, ExerciseResult], list[str]]:
    """Run one notebook's exercises in the sandbox (again without a cell that kills it), judge here."""
    cells, checkpoints, anchors = plan(student_nb, src)
    if -1 in checkpoints:  # no code cell at all: produce before anything runs
        cells = [{"index": -1, "source": ""}] + cells
    by_name = {ex.name: ex for ex in src.exercises}
    results: dict[str, ExerciseResult] = {}
    notes: list[str] = []
    excluded: set[int] = set()
    sealed: set[str] = set()
    started = time.monotonic()
    wall_scale = 1.0
    limits = grader.sandbox.limits
    for _attempt in range(len(cells) + len(src.exercises) + 3):
        pending = [ex for ex in src.exercises if ex.name not in results]
        if not pending:
            break
        left = budget_s - (time.monotonic() - started)
        if left <= 0:
            for ex in pending:
                results[ex.name] = ExerciseResult(ex.name, 0.0, ex.points, [
                    f"not graded: the notebook used up its {budget_s:g} s of grading time"], [])
            break
        pending_names = {ex.name for ex in pending}
        last_anchor = max(anchors[n] for n in pending_names)
        job_cells = [c for c in cells if c["index"] not in excluded and c["index"] <= last_anchor]
        job_points = {str(i): [{"exercise": ex.name, "checks": [vars(c) for c in ex.checks]}
                               for ex in exs if ex.name in pending_names] for i, exs in checkpoints.items()}
        job = {"seed": seed, "cells": job_cells, "checkpoints": job_points,
               "steps": _steps(job_cells, checkpoints, pending_names)}
        session = _StudentSession(grader, src, pending, sealed)
        result = grader.sandbox.run(job, session, slot, wall_scale=wall_scale, budget_s=left)
        for ex in pending:
            if ex.name in session.records:
                results[ex.name] = judge_exercise(ex, session.records[ex.name], seed, grader.modules)
        if result.finished:
            for ex in pending:
                results.setdefault(ex.name, ExerciseResult(ex.name, 0.0, ex.points, ["no outputs came back"], []))
            break
        if result.timed_out == "wall" and wall_scale == 1.0:
            wall_scale = 2.0  # waiting is not computing: once more with twice the wall-clock time
            notes.append("a cell exceeded the wall-clock limit; the notebook was run again with twice the limit")
            continue
        why = describe_exit(result, limits)
        step = result.last_step() or ""
        if result.timed_out == "total":
            for ex in pending:
                results.setdefault(ex.name, ExerciseResult(ex.name, 0.0, ex.points, [f"not graded: {why}"], []))
            break
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
            tail = result.log_tail.strip().splitlines()[-1] if result.log_tail.strip() else ""
            for ex in pending:
                results.setdefault(ex.name, ExerciseResult(ex.name, 0.0, ex.points, [
                    f"the sandbox ended before the notebook ran ({why})" + (f": {shorten(tail, 300)}" if tail else "")], []))
            break
    for ex in src.exercises:
        results.setdefault(ex.name, ExerciseResult(ex.name, 0.0, ex.points, ["not graded"], []))
    dependent = _dependency_notes(src, results, grader)
    return results, notes + dependent


def _dependency_notes(src: SourceNotebook, results: dict[str, ExerciseResult], grader: "Grader") -> list[str]:
    """Say when a later exercise was graded with the given version of an earlier, failed one."""
    owner = {c.impl: ex.name for ex in src.exercises for c in ex.checks}
    notes = []
    for ex in src.exercises:
        for call in ex.checks:
            check = grader.modules[call.module].CHECKS[call.check]
            for used in check.task.uses:
                earlier = owner.get(used)
                if earlier and results.get(earlier) and results[earlier].points < results[earlier].max_points:
                    notes.append(f"{ex.name} was graded with the course's own {used} in place of yours, so "
                                 f"the mistake in {used} costs points only in {earlier}")
    return notes


# ---------------------------------------------------------------------------------------------
# What the grader writes


def autograded_notebook(student_nb, src: SourceNotebook, results: dict[str, ExerciseResult], anchors: dict):
    """The student's notebook with the SOURCE's test cells (restored, with the verdict as output) and no
    output of the student's own: a stored output must never look like a result."""
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
        if cell.get("cell_type") == "code":
            cell["outputs"], cell["execution_count"] = [], None
        out_cells.append(cell)
        for ex in src.exercises:
            if anchors.get(ex.name) == i and ex.name not in placed:
                placed.add(ex.name)
                out_cells.append(_test_cell(ex, results[ex.name], src_cells.get(ex.cell_id)))
    for ex in src.exercises:
        if ex.name not in placed:
            out_cells.append(_test_cell(ex, results[ex.name], src_cells.get(ex.cell_id)))
    nb.cells = out_cells
    nbformat.validate(nb)
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
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"[grader] {text}\n")]
    else:
        text = "\n".join(result.reasons + result.reports)
        cell.outputs = [nbformat.v4.new_output("error", ename="CheckFailed", evalue=f"[grader] {text}",
                                               traceback=[f"[grader] {text}"])]
    cell.execution_count = 1
    return cell


_FEEDBACK_CSS = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3rem .6rem;vertical-align:top}
.grader{border-left:4px solid #2a6;background:#f3fbf6;padding:.5rem 1rem;margin:.5rem 0}
.lost{border-left-color:#c33;background:#fdf3f3}pre{white-space:pre-wrap;margin:0}
.student{border-left:4px solid #999;background:#f7f7f7;padding:.5rem 1rem;margin:.5rem 0}
.label{font-size:.8rem;color:#555;text-transform:uppercase;letter-spacing:.05em}"""


def feedback_html(student_nb, src: SourceNotebook, student: str, chapter: str, rows: list[ExerciseResult],
                  anchors: dict, notes: list[str]) -> str:
    """A self-contained page (no script, no external resource): the score table, then per exercise the
    student's answer cell and the grader's verdict, marked as the grader's. No hidden test, no output
    of the student's own, no file from outside the submission."""
    esc = html.escape
    total, maximum = sum(r.points for r in rows), sum(r.max_points for r in rows)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Feedback: {esc(chapter)}, {esc(student)}"
             f"</title><style>{_FEEDBACK_CSS}</style></head><body>",
             f"<h1>Feedback: {esc(chapter)}</h1><p>Student: <b>{esc(student)}</b> &middot; "
             f"Score: <b>{total:g} / {maximum:g}</b></p>",
             "<table><tr><th>exercise</th><th>points</th><th>why points were lost</th></tr>"]
    for r in rows:
        parts.append(f"<tr><td>{esc(r.name)}</td><td>{r.points:g} / {r.max_points:g}</td>"
                     f"<td>{esc('; '.join(shorten(x, 400) for x in r.reasons))}</td></tr>")
    parts.append("</table>")
    if notes:
        parts.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    by_row = {r.name: r for r in rows}
    for ex in src.exercises:
        r = by_row[ex.name]
        i = anchors.get(ex.name, -1)
        parts.append(f"<h2>{esc(ex.name)} ({r.points:g} / {r.max_points:g})</h2>")
        if student_nb is not None and 0 <= i < len(student_nb.cells):
            parts.append(f"<div class='student'><div class='label'>your answer (cell {i + 1})</div>"
                         f"<pre>{esc(student_nb.cells[i]['source'][:20000])}</pre></div>")
        verdict = "\n".join(r.reports) if r.points == r.max_points else "\n".join(r.reasons + r.reports)
        cls = "grader" if r.points == r.max_points else "grader lost"
        parts.append(f"<div class='{cls}'><div class='label'>grader's verdict</div><pre>{esc(verdict)}</pre></div>")
    parts.append("</body></html>")
    return "\n".join(parts)


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
    original: str | None = None

    @property
    def score(self) -> float:
        return sum(r.points for r in self.rows)


class Grader:
    def __init__(self, chapter: str, course_dir: Path = REPO, source_dir: Path | None = None,
                 release_dir: Path | None = None, limits: Limits | None = None, workers: int = 2,
                 db_url: str | None = None, out: Path | None = None, budget_s: float | None = None,
                 force_fallback: bool = False, progress: bool = True, shard: tuple[int, int] = (0, 1)):
        self.chapter = chapter
        self.shard = shard
        self.course_dir = Path(course_dir)
        self.source_folder = Path(source_dir or self.course_dir / "solutions") / chapter
        release_folder = Path(release_dir or self.course_dir / "chapters") / chapter
        paths = sorted(self.source_folder.glob("*.ipynb"))
        if not paths:
            raise SystemExit(f"no source notebook in {self.source_folder}")
        self.sources = [load_source(p, release_folder / p.name) for p in paths]
        module_names = sorted({c.module for s in self.sources for ex in s.exercises for c in ex.checks})
        self.modules = {m: importlib.import_module(m) for m in module_names}
        self.harnesses = {harness_of(m): importlib.import_module(harness_of(m)) for m in module_names}
        verify_split(self.modules, self.harnesses)
        self.given = {}
        for module in self.modules.values():
            for check in module.CHECKS:
                self.given.update(check.given)
        self.sandbox = Sandbox(limits, modules=tuple(sorted(self.harnesses)), force_fallback=force_fallback)
        self.workers = max(1, workers)
        self.db_url = db_url or f"sqlite:///{self.course_dir / 'gradebook.db'}"
        self.out = Path(out or self.course_dir / "graded" / chapter)
        self.budget_s = budget_s if budget_s is not None else self.sandbox.limits.total_wall_s
        self.progress = progress
        # nbgrader's Gradebook runs `alembic` from PATH: the virtual environment's bin/ must be on it
        bin_dir = str(Path(sys.executable).parent)
        if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")

    def warm_up(self) -> None:
        """Compute each check's first reference once, here, before any worker starts (lazy imports)."""
        with JUDGE_LOCK, torch.no_grad():
            for module in self.modules.values():
                for check in module.CHECKS:
                    case = check.select(False)[0]
                    try:
                        check.reference(core.make_inputs(case, 0))
                    except Exception:  # noqa: BLE001 - a broken reference shows up in the judgement
                        pass

    def grade_student(self, sub: Submission, slot: int) -> StudentResult:
        start = time.monotonic()
        rows, notes, notebooks = [], list(sub.notes), {}
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
                results, extra = grade_notebook(nb, src, self, slot, core.fresh_seed(), self.budget_s)
            except Exception as exc:  # noqa: BLE001 - one odd notebook must not stop the class
                results = {ex.name: ExerciseResult(ex.name, 0.0, ex.points, [
                    f"could not be graded ({type(exc).__name__}: {shorten(exc, 200)})"], []) for ex in src.exercises}
                extra = []
            try:
                anchors = plan(nb, src)[2]
                notebooks[src.name] = (autograded_notebook(nb, src, results, anchors),
                                       feedback_html(nb, src, sub.student, self.chapter,
                                                     [results[ex.name] for ex in src.exercises], anchors, extra))
            except Exception as exc:  # noqa: BLE001
                notebooks[src.name] = None
                extra.append(f"no feedback notebook ({type(exc).__name__}: {shorten(exc, 200)})")
            rows += [results[ex.name] for ex in src.exercises]
            notes += extra
        return StudentResult(sub.student, rows, notes, time.monotonic() - start, notebooks, sub.original)

    def run(self, submissions_root: Path) -> list[StudentResult]:
        from tqdm.auto import tqdm

        if self.sandbox.warning:
            print("\n" + "!" * 100 + "\n" + self.sandbox.warning + "\n" + "!" * 100 + "\n", file=sys.stderr)
        subs = find_submissions(Path(submissions_root), self.chapter, [s.name for s in self.sources])
        subs = [s for s in subs if in_shard(s.student, *self.shard)]
        ensure_assignment(self.db_url, self.chapter, self.source_folder)
        self.out.mkdir(parents=True, exist_ok=True)
        self.warm_up()
        import queue

        free: queue.Queue[int] = queue.Queue()
        for s in range(self.workers):
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
                        for ex in s.exercises], list(sub.notes), 0.0, {}, sub.original)
                self._record(sub, res)
                results.append(res)
                bar.update(1)
            bar.close()
        results.sort(key=lambda r: r.student)
        self._write_reports(results)
        return results

    def _record(self, sub: Submission, res: StudentResult) -> None:
        """The gradebook first (always), then the files; a file that cannot be written is a note."""
        per_notebook, i = {}, 0
        for src in self.sources:
            n = len(src.exercises)
            per_notebook[Path(src.name).stem] = {r.name: r for r in res.rows[i:i + n]}
            i += n
        write_gradebook(self.gradebook, self.chapter, sub.student, sub.timestamp, per_notebook)
        for src in self.sources:
            pair = res.notebooks.get(src.name)
            if pair is None:
                continue
            nb, page = pair
            try:
                auto = self.course_dir / "autograded" / sub.student / self.chapter
                auto.mkdir(parents=True, exist_ok=True)
                nbformat.write(nb, auto / src.name)
                fb = self.course_dir / "feedback" / sub.student / self.chapter
                fb.mkdir(parents=True, exist_ok=True)
                (fb / src.name.replace(".ipynb", ".html")).write_text(page, encoding="utf-8")
                for name, data in _submission_extras(sub).items():  # nbgrader's release_feedback needs them
                    (auto / name).write_bytes(data)
                    (fb / name).write_bytes(data)
            except Exception as exc:  # noqa: BLE001
                res.notes.append(f"feedback not written ({type(exc).__name__}: {shorten(exc, 200)})")
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
            "caps": self.sandbox.caps,
            "students": [{"student": r.student, "submitted_as": r.original, "score": r.score, "max_score": maximum,
                          "seconds": round(r.seconds, 2), "notes": r.notes,
                          "exercises": {x.name: {"points": x.points, "max_points": x.max_points,
                                                 "reasons": x.reasons, "details": x.private} for x in r.rows}}
                         for r in results]}, indent=1))
        (self.out / "summary.md").write_text(summary_table(results, names, maximum, self.sandbox.warning))


def _submission_extras(sub: Submission) -> dict[str, bytes]:
    """``timestamp.txt`` and ``submission_secret.txt`` of an nbgrader-layout submission, as
    ``nbgrader generate_feedback`` copies them: regular files only (links are not followed), small."""
    out = {}
    if sub.folder is None:
        return out
    for name in ("timestamp.txt", "submission_secret.txt"):
        path = sub.folder / name
        if _kind(path) is None and path.is_file():
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                if stat.S_ISREG(os.fstat(fd).st_mode) and os.fstat(fd).st_size <= 4096:
                    out[name] = os.read(fd, 4096)
            finally:
                os.close(fd)
    return out


def in_shard(student: str, index: int, count: int) -> bool:
    """Whether a student belongs to shard ``index`` of ``count`` (a stable hash of the id, so every
    machine that grades a shard agrees without talking to the others)."""
    return int(hashlib.sha256(student.encode()).hexdigest(), 16) % count == index


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes i/n (e.g. 0/4), not {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= i < n")
    return i, n


def summary_table(results: list[StudentResult], names: list[str], maximum: float, warning: str | None) -> str:
    lines = []
    if warning:
        lines += [f"**{warning}**", ""]
    renamed = [r for r in results if r.original is not None]
    if renamed:
        lines += ["**Submissions graded under a derived id (their names are not plain ids):** "
                  + ", ".join(f"{r.original!r} -> {r.student}" for r in renamed), ""]
    lines += ["| student | " + " | ".join(names) + " | total | why points were lost |",
              "|---|" + "---:|" * (len(names) + 1) + "---|"]
    for r in results:
        why = "; ".join(f"{x.name}: {x.reasons[0]}" for x in r.rows if x.reasons)
        why += "".join(f"; note: {n}" for n in r.notes)
        why = shorten(why, 600).replace("|", "\\|")
        lines.append(f"| {r.student} | " + " | ".join(f"{x.points:g}" for x in r.rows)
                     + f" | {r.score:g}/{maximum:g} | {why} |")
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
    p.add_argument("--step-cpu", type=float, default=20.0, help="CPU seconds per cell (default 20)")
    p.add_argument("--step-timeout", type=float, default=60.0, help="wall-clock seconds per cell (default 60)")
    p.add_argument("--shard", type=parse_shard, default=(0, 1), metavar="I/N",
                   help="grade only shard I of N of the class (stable hash of the student id), e.g. one "
                        "Kubernetes Indexed Job or Slurm array task each; give each shard its own --gradebook "
                        "and --out, then merge them")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not args.submissions.is_dir():
        p.error(f"--submissions {args.submissions}: no such folder")
    grader = Grader(args.chapter, course_dir=args.course_dir, source_dir=args.source_dir,
                    release_dir=args.release_dir, workers=args.workers, db_url=args.gradebook, out=args.out,
                    limits=Limits(step_cpu_s=args.step_cpu, step_wall_s=args.step_timeout),
                    progress=not args.no_progress, shard=args.shard)
    start = time.monotonic()
    results = grader.run(args.submissions)
    names = [ex.name for s in grader.sources for ex in s.exercises]
    maximum = sum(ex.points for s in grader.sources for ex in s.exercises)
    print(summary_table(results, names, maximum, grader.sandbox.warning))
    print(f"{len(results)} submission(s) graded in {time.monotonic() - start:.1f} s with {grader.workers} "
          f"worker(s), sandbox: {grader.sandbox.mode}; {grader.sandbox.caps}. Gradebook: {grader.db_url}; "
          f"grades: {grader.out / 'grades.csv'}; feedback: {grader.course_dir / 'feedback'}")
    if grader.sandbox.warning:
        print(grader.sandbox.warning, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
