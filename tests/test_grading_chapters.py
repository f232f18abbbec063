"""The sandboxed grader works for every chapter, whatever the number of workers.

Per chapter, a class of three identical correct submissions and one untouched stub is graded with two
workers: every correct student gets full marks, the stub zero. Judging runs in threads of the grader's
process; the same judgement, run by two threads at once over many fresh seeds, must pass every time.
"""

from __future__ import annotations

import importlib
from concurrent.futures import ThreadPoolExecutor

import nbformat
import pytest

from autograders.engine import core, grade
from autograders.engine.sandbox import Limits
from course import CHAPTERS, SOLUTIONS, chapter_names, notebook_of
from notebook_code import load_solutions
from test_roundtrip import solved

pytestmark = pytest.mark.slow
CLASS_SIZE = 3  # with the stub, 4 notebooks for 2 workers: both busy, results merged out of order


@pytest.mark.parametrize("chapter", chapter_names())
def test_a_class_of_correct_submissions_gets_full_marks_with_two_workers(chapter, tmp_path):
    release_nb = nbformat.read(notebook_of(CHAPTERS / chapter), as_version=4)
    source_nb = nbformat.read(notebook_of(SOLUTIONS / chapter), as_version=4)
    subs = tmp_path / "submissions"
    subs.mkdir()
    for i in range(CLASS_SIZE):
        nbformat.write(solved(release_nb, source_nb), subs / f"student{i}.ipynb")
    nbformat.write(release_nb, subs / "stub.ipynb")
    grader = grade.Grader(chapter, course_dir=tmp_path, source_dir=SOLUTIONS, release_dir=CHAPTERS,
                          workers=2, db_url=f"sqlite:///{tmp_path / 'gradebook.db'}", out=tmp_path / "out",
                          limits=Limits(start_wall_s=180.0), progress=False)
    results = {r.student: r for r in grader.run(subs)}
    assert len(results) == CLASS_SIZE + 1
    for i in range(CLASS_SIZE):
        r = results[f"student{i}"]
        lost = [(x.name, x.points, x.max_points, x.private or x.reasons) for x in r.rows if x.points != x.max_points]
        assert not lost, f"{chapter}: a correct student{i} lost points: {lost}"
        assert r.score > 0
    assert results["stub"].score == 0, f"{chapter}: the untouched stub earned points"


def _judge(check, produced, seed):
    with grade.JUDGE_LOCK:
        report = core.judge(check, produced, seed, None)
    return None if report.passed else report.summary()


@pytest.mark.parametrize("chapter", chapter_names())
def test_the_solution_passes_hidden_checks_over_many_seeds_judged_by_two_threads(chapter):
    """Outputs are produced one after another (as in the sandbox), then judged by two threads at once
    (as in the grader's process)."""
    source = nbformat.read(notebook_of(SOLUTIONS / chapter), as_version=4)
    calls = [c for cell in source.cells if cell.metadata.get("nbgrader", {}).get("grade")
             and not cell.metadata.get("nbgrader", {}).get("solution") for c in grade._check_calls(cell.source)]
    sol = load_solutions(chapter)
    jobs = []
    for call in calls:
        check = importlib.import_module(call.module).CHECKS[call.check]
        for seed in (core.fresh_seed() for _ in range(12)):
            # the given versions go where the notebook's own code looks names up (its globals)
            produced = core.produce(check.task, getattr(sol, call.impl), seed, None, given=check.given)
            jobs.append((check, produced, seed))
    with ThreadPoolExecutor(2) as pool:
        failures = [f for f in pool.map(lambda job: _judge(*job), jobs) if f]
    assert not failures, "\n\n".join(failures[:3])


def test_the_course_twin_of_an_exercise_scores_zero_in_the_sandbox(tmp_path):
    """Chapter 15's patchify answered by coursekit's own patchify (imported in the cell, or inside the
    function) gets 0 for that exercise only, in the sandbox, with the rule in the feedback."""
    chapter = "15_sora_dit"
    release_nb = nbformat.read(notebook_of(CHAPTERS / chapter), as_version=4)
    source_nb = nbformat.read(notebook_of(SOLUTIONS / chapter), as_version=4)
    answers = {
        "aliased": "from coursekit.dit import patchify as _course_patchify\n\n\n"
                   "def patchify(x, patch):\n    return _course_patchify(x, patch)\n",
        "imported_inside": "def patchify(x, patch):\n    import coursekit.dit\n    return coursekit.dit.patchify(x, patch)\n",
    }
    subs = tmp_path / "submissions"
    subs.mkdir()
    for student, code in answers.items():
        nb = solved(release_nb, source_nb)
        cell = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution")
                    and c.source.lstrip().startswith("def patchify"))
        cell.source = code
        nbformat.write(nb, subs / f"{student}.ipynb")
    grader = grade.Grader(chapter, course_dir=tmp_path, source_dir=SOLUTIONS, release_dir=CHAPTERS, workers=2,
                          db_url=f"sqlite:///{tmp_path / 'gradebook.db'}", out=tmp_path / "out",
                          limits=Limits(start_wall_s=180.0), progress=False)
    for r in grader.run(subs):
        rows = {x.name: x for x in r.rows}
        patch = next(x for name, x in rows.items() if "patchify" in name and "unpatchify" not in name)
        assert patch.points == 0, f"{r.student}: coursekit's patchify earned {patch.points}"
        assert "the course's own coursekit.dit.patchify" in " ".join(patch.private + patch.reasons), \
            f"{r.student}: no rule in the message: {patch}"
        others = [(x.name, x.points, x.max_points) for x in r.rows if x is not patch and x.points != x.max_points]
        assert not others, f"{r.student}: other exercises lost points: {others}"
