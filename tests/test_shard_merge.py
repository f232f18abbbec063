"""A class graded in n=3 shards (`grade --shard i/3`, each with its own gradebook and out folder) and
merged (`python -m autograders.engine.merge`) gives what one run over the whole class gives: the same
gradebook scores and the same grades.csv, byte for byte.

The class is chapter 01: the solution, the untouched stub and two partially wrong notebooks, under
names picked so that every shard has at least one student.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

import grading_corpus as gc
from course import ROOT

pytestmark = pytest.mark.slow

from autograders.engine.grade import in_shard  # noqa: E402

N = 3
WRONG_SOFTMAX = ("def stable_softmax(scores, dim=-1):\n"
                 "    e = torch.exp(scores - scores.max())\n    return e / e.sum()\n")
KINDS = {
    "solution": (gc.solved, gc.FULL),
    "stub": (gc.release, gc.ZERO),
    "no_scale": (lambda: gc.set_answer(gc.solved(), "SelfAttention", gc.WRONG_MODULE), gc.but(SelfAttention=0)),
    "global_max": (lambda: gc.set_answer(gc.solved(), "stable_softmax", WRONG_SOFTMAX), gc.but(stable_softmax=0)),
}


def class_names() -> dict[str, str]:
    """student id -> kind, with every one of the N shards holding someone."""
    for k in range(1000):
        names = {f"{kind}{k}": kind for kind in KINDS}
        if {next(i for i in range(N) if in_shard(n, i, N)) for n in names} == set(range(N)):
            return names
    raise AssertionError("no names that fill every shard")


def grade(submissions: Path, folder: Path, shard: int | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "autograders.engine.grade", "--submissions", str(submissions), "--chapter", gc.CHAPTER,
           "--workers", "2", "--no-progress", "--course-dir", str(folder), "--source-dir", str(ROOT / "solutions"),
           "--release-dir", str(ROOT / "chapters"), "--gradebook", f"sqlite:///{folder / 'gradebook.db'}",
           "--out", str(folder / "out")]
    if shard is not None:
        cmd += ["--shard", f"{shard}/{N}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def merge(*args: str) -> subprocess.CompletedProcess:
    """The documented command line, as an instructor (or a Job after the shards) runs it."""
    return subprocess.run([sys.executable, "-m", "autograders.engine.merge", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def merge_here(capsys, *args: str) -> tuple[int, str]:
    """The same, in this process (no new interpreter to start): exit status and what it printed."""
    from autograders.engine import merge as merge_module

    code = merge_module.main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


def scores(db: Path) -> dict[str, dict[str, float]]:
    """Per student: every graded cell's score and the total, as nbgrader (and formgrader) read them."""
    from nbgrader.api import Gradebook

    out = {}
    with Gradebook(f"sqlite:///{db}") as gb:
        for sub in gb.assignment_submissions(gc.CHAPTER):
            nb = gb.find_submission_notebook(gc.NOTEBOOK[:-6], gc.CHAPTER, sub.student_id)
            out[sub.student_id] = {**{g.name: g.score for g in nb.grades}, "total": sub.score}
    return out


def summary_rows(path: Path) -> list[list[str]]:
    """The summary table's student and points columns (the reasons quote hidden cases drawn per run)."""
    return [[c.strip() for c in line.split("|")[1:8]] for line in path.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| student")]


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    names = class_names()
    subs = root / "submissions"
    subs.mkdir()
    for student, kind in names.items():
        nbformat.write(KINDS[kind][0](), subs / f"{student}.ipynb")
    # every job starts from the course's gradebook with the chapter recorded (`make assignment`), as an
    # instructor would hand it out; recording it once here spares each job nbgrader's generate_assignment
    template = root / "template.db"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # alembic
    proc = subprocess.run([sys.executable, "-m", "autograders.engine.assignment", gc.CHAPTER, "--gradebook",
                           f"sqlite:///{template}"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for folder in ["single"] + [f"shard{i}" for i in range(N)]:
        (root / folder).mkdir()
        shutil.copyfile(template, root / folder / "gradebook.db")
    grade(subs, root / "single")
    for i in range(N):
        grade(subs, root / f"shard{i}", i)
    return root, names


def test_shards_merged_equal_one_run(graded):
    root, names = graded
    # each shard graded exactly its share of the class
    for i in range(N):
        with open(root / f"shard{i}" / "out" / "grades.csv", newline="") as f:
            got = {row["student_id"] for row in csv.DictReader(f)}
        assert got == {n for n in names if in_shard(n, i, N)} and got, (i, got)
    shard_dirs = [str(root / f"shard{i}") for i in range(N)]
    merged = root / "merged"
    proc = merge("--into", f"sqlite:///{merged / 'gradebook.db'}", *shard_dirs, "--out", str(merged / "out"))
    assert proc.returncode == 0, proc.stderr
    assert f"merged {len(names)} graded submission(s) from {N} shard(s)" in proc.stdout, proc.stdout

    single, combined = scores(root / "single" / "gradebook.db"), scores(merged / "gradebook.db")
    expected = {n: {**{k: float(v) for k, v in KINDS[kind][1].items()}, "total": float(sum(KINDS[kind][1].values()))}
                for n, kind in names.items()}
    assert single == expected, single
    assert combined == single
    assert (merged / "out" / "grades.csv").read_bytes() == (root / "single" / "out" / "grades.csv").read_bytes()
    assert summary_rows(merged / "out" / "summary.md") == summary_rows(root / "single" / "out" / "summary.md")
    one = json.loads((root / "single" / "out" / "results.json").read_text())
    many = json.loads((merged / "out" / "results.json").read_text())
    pairs = (lambda results: [(s["student"], s["score"]) for s in results["students"]])
    assert pairs(many) == pairs(one)
    assert many["chapter"] == gc.CHAPTER and many["sandbox"] == one["sandbox"] and len(many["merged_from"]) == N


def test_merge_keeps_manual_scores_and_refuses_overlaps(graded, capsys):
    root, names = graded
    shard_dirs = [str(root / f"shard{i}") for i in range(N)]
    target = root / "instructor" / "gradebook.db"  # the course's gradebook, the chapter recorded in it
    target.parent.mkdir()
    shutil.copyfile(root / "template.db", target)
    url = f"sqlite:///{target}"
    assert merge_here(capsys, "--into", url, *shard_dirs)[0] == 0
    # the instructor grades one answer by hand; merging the shards again must keep it
    from nbgrader.api import Gradebook

    stub = next(n for n, kind in names.items() if kind == "stub")
    with Gradebook(url) as gb:
        grade = gb.find_grade("test_SelfAttention", gc.NOTEBOOK[:-6], gc.CHAPTER, stub)
        grade.manual_score = 1.5
        gb.db.commit()
    assert merge_here(capsys, "--into", url, *shard_dirs)[0] == 0
    after = scores(target)
    assert after[stub]["test_SelfAttention"] == 1.5 and after[stub]["total"] == 1.5
    single = scores(root / "single" / "gradebook.db")
    assert {n: s for n, s in after.items() if n != stub} == {n: s for n, s in single.items() if n != stub}
    # the same shard twice is an overlap, not a silent choice (gradebook and reports alike)
    code, text = merge_here(capsys, "--into", f"sqlite:///{root / 'twice.db'}", shard_dirs[0], shard_dirs[0])
    assert code == 2 and "overlap" in text, text
    code, text = merge_here(capsys, "--into", f"sqlite:///{root / 'twice2.db'}", str(root / "shard1" / "out"),
                            "--out", str(root / "twice_out"), "--reports", str(root / "shard1" / "out"))
    assert code == 2 and "overlap" in text, text
