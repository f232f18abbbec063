"""Sandboxed grading (autograders/grade.py) against an adversarial corpus of chapter-01 submissions.

The whole corpus is graded once, as one batch with two workers, the way an instructor would; every
kind must get exactly its expected points per exercise (no unearned point, no lost correct answer),
the batch must finish, and nothing but the grader may change the gradebook or the repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings

import nbformat
import pytest

import grading_corpus as gc
from course import ROOT

pytestmark = pytest.mark.slow

from autograders.engine import grade  # noqa: E402
from autograders.engine.sandbox import Limits, Sandbox  # noqa: E402

TARGET = ROOT / "autograders" / "self_attention.py"


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    course = tmp_path_factory.mktemp("course")
    # The instructor's source with the slow non-graded cells tagged as the chapter will tag them.
    source = course / "source"
    (source / gc.CHAPTER).mkdir(parents=True)
    nb = gc.source()
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if cell.get("id") in gc.SKIP_IN_GRADING and grade.SKIP_TAG not in tags:
            tags.append(grade.SKIP_TAG)
    nbformat.write(nb, source / gc.CHAPTER / gc.NOTEBOOK)
    subs = course / "submissions"
    subs.mkdir()
    db = course / "gradebook.db"
    db_url = f"sqlite:///{db}"
    grader = grade.Grader(gc.CHAPTER, course_dir=course, source_dir=source,
                          release_dir=ROOT / "chapters", workers=2, db_url=db_url, out=course / "out",
                          limits=Limits(step_cpu_s=5.0, step_wall_s=8.0, start_wall_s=90.0), progress=False)
    isolated = grader.sandbox.mode == "bwrap"
    if shutil.which("bwrap"):
        # bubblewrap is installed (make setup installs it): falling back would hide a broken sandbox.
        assert isolated, f"bubblewrap is installed but the sandbox fell back: {grader.sandbox.problem}"
    kinds = [k for k in gc.corpus(str(db), str(TARGET)) if isolated or not k.needs_isolation]
    only = os.environ.get("GRADING_CORPUS_ONLY")  # a developer's quick run: a comma-separated subset
    if only:
        kinds = [k for k in kinds if k.name in only.split(",")]
    for k in kinds:
        gc.write(k, subs)
    # two students whose names differ only in characters a cleaner would replace
    nbformat.write(gc.solved(), subs / "ann smith.ipynb")
    nbformat.write(gc.release(), subs / "ann_smith.ipynb")
    # files that must never be followed, opened or merged
    secret_file = course / "secret.txt"
    secret_file.write_text(gc.SECRET + "\n")
    os.symlink(ROOT / "solutions" / gc.CHAPTER / gc.NOTEBOOK, subs / "link_to_solution.ipynb")
    os.symlink(secret_file, subs / "link_to_secret.ipynb")
    os.mkfifo(subs / "fifo_student.ipynb")
    nbformat.write(gc.solved(), subs / "...ipynb")  # a student named ".."

    # A student graded earlier by hand: nothing in this batch may change their record.
    from nbgrader.api import Gradebook

    grade.ensure_assignment(db_url, gc.CHAPTER, source / gc.CHAPTER)
    with Gradebook(db_url) as gb, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gb.add_student("zed")
        gb.add_submission(gc.CHAPTER, "zed")
        g = gb.find_grade("test_SelfAttention", "self_attention", gc.CHAPTER, "zed")
        g.manual_score = 1.5
        gb.db.commit()
    before = _digest(TARGET)
    os.environ["GRADER_SECRET"] = gc.SECRET
    try:
        results = grader.run(subs)
    finally:
        del os.environ["GRADER_SECRET"]
    return {"grader": grader, "results": {r.student: r for r in results}, "kinds": kinds, "course": course,
            "db_url": db_url, "before": before}


def test_corpus_gets_exactly_the_expected_points(graded):
    rows, wrong = [], []
    for k in graded["kinds"]:
        r = graded["results"][k.name]
        got = {x.name: x.points for x in r.rows}
        rows.append(f"| {k.name} | {sum(k.expected.values()):g} | {sum(got.values()):g} | {r.seconds:.1f} |")
        if got != {n: float(p) for n, p in k.expected.items()}:
            wrong.append(f"{k.name}: expected {k.expected}, got {got}; reasons: "
                         f"{[x.reasons for x in r.rows if x.reasons]}; notes: {r.notes}")
    print("\n".join(rows))
    assert len(graded["kinds"]) >= 45 or os.environ.get("GRADING_CORPUS_ONLY")
    assert not wrong, "\n".join(wrong)


def test_every_submission_has_its_own_record(graded):
    from nbgrader.api import Gradebook

    results = graded["results"]
    assert len(results) == len(graded["kinds"]) + 6
    renamed = {r.original: r for r in results.values() if r.original}
    assert set(renamed) == {"ann smith", ".."} and renamed["ann smith"].score == 10 == renamed[".."].score
    for name, why in (("link_to_solution", "symbolic link"), ("link_to_secret", "symbolic link"),
                      ("fifo_student", "FIFO")):
        assert results[name].score == 0 and why in results[name].rows[0].reasons[0], name
    course = graded["course"]
    for path in course.rglob("*"):  # nothing written outside the student's own folders
        if path.is_file() and "feedback" in path.parts:
            assert path.resolve().is_relative_to((course / "feedback").resolve()), path
    assert results["ann_smith"].score == 0
    with Gradebook(graded["db_url"]) as gb:
        ids = {s.id for s in gb.students}
        assert renamed["ann smith"].student in ids and "ann_smith" in ids
        assert len(gb.find_assignment(gc.CHAPTER).submissions) == len(results) + 1  # + zed, graded by hand
        assert "link_to_solution" in ids and "fifo_student" in ids
    summary = (graded["course"] / "out" / "summary.md").read_text()
    assert "ann smith" in summary and "derived id" in summary


def test_feedback_never_shows_student_outputs_or_hidden_cases(graded):
    course = graded["course"]
    for path in (course / "feedback").rglob("*.html"):
        text = path.read_text()
        assert gc.FORGED_OUTPUT_TEXT not in text, f"a stored student output shows in {path}"
        assert "<script" not in text and "http://" not in text and "https://" not in text, path
    for path in (course / "autograded").rglob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code" and not cell.metadata.get("nbgrader", {}).get("grade"):
                assert not cell.outputs, f"{path}: a student cell kept its stored output"
    from autograders import self_attention as ag

    hidden = [c.name for check in ag.CHECKS for c in check.cases if c.hidden]
    text = (course / "feedback" / "wrong_answer" / gc.CHAPTER / "self_attention.html").read_text()
    text += json.dumps(graded["results"]["wrong_answer"].rows[-1].reasons)
    for name in hidden:
        assert name not in text, f"the hidden case {name!r} is named in a student's feedback"
    assert "hidden case" in text or "case '" in text


def test_batch_time_is_bounded(graded):
    slowest = max(graded["results"].values(), key=lambda r: r.seconds)
    # sleeps_and_forges_progress: 8 s + 16 s (the retry) + runs; never its own 150 s
    assert slowest.seconds < 120, f"{slowest.student} took {slowest.seconds:.0f} s"


def test_no_unearned_points(graded):
    for k in graded["kinds"]:
        for x in graded["results"][k.name].rows:
            assert x.points <= k.expected[x.name], f"{k.name} earned {x.points} on {x.name}"


def test_gradebook_written_by_the_grader_only(graded):
    from nbgrader.api import Gradebook

    with Gradebook(graded["db_url"]) as gb:
        assignment = gb.find_assignment(gc.CHAPTER)
        assert assignment.max_score == sum(gc.POINTS.values())
        zed = gb.find_grade("test_SelfAttention", "self_attention", gc.CHAPTER, "zed")
        assert zed.manual_score == 1.5 and zed.auto_score is None
        for k in graded["kinds"]:
            sub = gb.find_submission_notebook("self_attention", gc.CHAPTER, k.name)
            scores = {g.name: g.auto_score for g in sub.grades}
            assert scores == {n: float(p) for n, p in k.expected.items()}, k.name
            assert all(g.max_score == gc.POINTS[g.name] for g in sub.grades)


def test_repository_and_secrets_untouched(graded):
    assert _digest(TARGET) == graded["before"], "student code changed a file of the repository"
    assert not (ROOT / "evil.txt").exists()
    course = graded["course"]
    for path in list((course / "feedback").rglob("*")) + list((course / "out").rglob("*")):
        if path.is_file():
            assert gc.SECRET not in path.read_text(errors="replace"), f"the grader's environment leaked into {path}"


def test_feedback_and_export(graded):
    course = graded["course"]
    html = (course / "feedback" / "wrong_answer" / gc.CHAPTER / "self_attention.html").read_text()
    assert "Score: <b>7 / 10</b>" in html
    assert "BEGIN HIDDEN TESTS" not in html and "hidden=True" not in html
    autograded = nbformat.read(course / "autograded" / "correct" / gc.CHAPTER / "self_attention.ipynb", as_version=4)
    tests = [c for c in autograded.cells if c.metadata.get("nbgrader", {}).get("grade")]
    assert len(tests) == len(gc.POINTS)
    csv_text = (course / "out" / "grades.csv").read_text()
    assert "correct,01_self_attention,2,1,2,2,3,10,10" in csv_text
    summary = (course / "out" / "summary.md").read_text()
    assert "| empty_file |" in summary and "the file is empty" in summary
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "nbgrader", "export", f"--CourseDirectory.root={course}",
                           f"--CourseDirectory.db_url={graded['db_url']}", "--to", str(course / "export.csv")],
                          cwd=course, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrong_answer" in (course / "export.csv").read_text()


def test_nbgrader_layout_is_found(tmp_path):
    for student in ("ann", "ben"):
        folder = tmp_path / student / gc.CHAPTER
        folder.mkdir(parents=True)
        nbformat.write(gc.release(), folder / gc.NOTEBOOK)
        (folder / "timestamp.txt").write_text("2026-01-02 03:04:05 UTC")
    subs = grade.find_submissions(tmp_path, gc.CHAPTER, [gc.NOTEBOOK])
    assert [s.student for s in subs] == ["ann", "ben"]
    assert all(s.files and s.problem is None and s.timestamp for s in subs)


def test_sandbox_mode_is_reported():
    sandbox = Sandbox(Limits())
    if sandbox.mode == "bwrap":
        assert sandbox.warning is None
    else:
        assert "WITHOUT namespace isolation" in sandbox.warning
