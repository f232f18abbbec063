"""A real nbgrader round trip per chapter: release, submit, autograde, feedback, export.

One student submits the solutions (full marks on every graded cell), another the untouched release
(zero on every graded cell).
"""

from __future__ import annotations

import csv
import shutil

import nbformat
import pytest
from nbgrader.api import Gradebook

from autograders.engine.nbgrader_ext import SKIP_TAG, SKIPPED, SkipDemoCells
from course import ROOT, SOLUTIONS, chapter_names, nbgrader, notebook_of

pytestmark = pytest.mark.slow


def make_course(tmp_path, chapter):
    shutil.copytree(SOLUTIONS / chapter, tmp_path / "source" / chapter)
    config = (ROOT / "nbgrader_config.py").read_text()
    config += (f"\nc.CourseDirectory.root = {str(tmp_path)!r}\n"
               "c.CourseDirectory.source_directory = 'source'\n"
               "c.CourseDirectory.release_directory = 'release'\n")
    (tmp_path / "nbgrader_config.py").write_text(config)


def solved(release_nb, source_nb):
    """The release notebook with every solution cell filled in as the instructor did."""
    answers = {c.metadata["nbgrader"]["grade_id"]: c.source for c in source_nb.cells
               if c.metadata.get("nbgrader", {}).get("solution")}
    nb = nbformat.from_dict(release_nb)
    for c in nb.cells:
        grade_id = c.metadata.get("nbgrader", {}).get("grade_id")
        if c.metadata.get("nbgrader", {}).get("solution"):
            c.source = answers[grade_id]
    return nb


@pytest.mark.parametrize("chapter", chapter_names())
def test_roundtrip(chapter, tmp_path):
    make_course(tmp_path, chapter)
    nbgrader("generate_assignment", chapter, cwd=tmp_path)
    released = notebook_of(tmp_path / "release" / chapter)
    name = released.name
    release_nb = nbformat.read(released, as_version=4)
    source_nb = nbformat.read(notebook_of(SOLUTIONS / chapter), as_version=4)
    submissions = {"alice": solved(release_nb, source_nb), "bob": release_nb}
    for student, nb in submissions.items():
        folder = tmp_path / "submitted" / student / chapter
        folder.mkdir(parents=True)
        nbformat.write(nb, folder / name)
        nbgrader("db", "student", "add", student, cwd=tmp_path)

    nbgrader("autograde", chapter, cwd=tmp_path)

    with Gradebook(f"sqlite:///{tmp_path / 'gradebook.db'}") as gb:
        scores = {}
        for student in submissions:
            nb = gb.find_submission_notebook(name.removesuffix(".ipynb"), chapter, student)
            scores[student] = {g.name: (g.score, g.max_score) for g in nb.grades}
    autograded = nbformat.read(tmp_path / "autograded" / "alice" / chapter / name, as_version=4)
    demos = [c for c in autograded.cells if SKIP_TAG in c.metadata.get("tags", [])]
    assert all(c.source == SKIPPED and not c.outputs for c in demos), "a skip-in-grading cell was run"
    graded = scores["alice"]
    assert graded, "no graded cells were found"
    wrong_alice = {k: v for k, v in graded.items() if v[0] != v[1]}
    assert not wrong_alice, f"the solution lost points (cell: (score, max)): {wrong_alice}"
    wrong_bob = {k: v for k, v in scores["bob"].items() if v[0] != 0}
    assert not wrong_bob, f"the untouched stub earned points (cell: (score, max)): {wrong_bob}"

    nbgrader("generate_feedback", chapter, cwd=tmp_path)
    for student in submissions:
        feedback = tmp_path / "feedback" / student / chapter / name.replace(".ipynb", ".html")
        assert feedback.is_file(), f"no feedback for {student}"
    nbgrader("export", cwd=tmp_path)
    with open(tmp_path / "grades.csv") as f:
        rows = {r["student_id"]: r for r in csv.DictReader(f)}
    assert float(rows["alice"]["score"]) == float(rows["alice"]["max_score"]) > 0
    assert float(rows["bob"]["score"]) == 0


def test_nbgrader_skips_only_plain_demo_cells():
    """A skip-in-grading tag on a cell nbgrader grades (or a solution cell) does not skip it."""
    from nbformat.v4 import new_code_cell

    demo = new_code_cell("train()", metadata={"tags": [SKIP_TAG]})
    test = new_code_cell("check()", metadata={"tags": [SKIP_TAG], "nbgrader": {
        "grade": True, "solution": False, "locked": True, "grade_id": "t", "points": 1, "schema_version": 3}})
    answer = new_code_cell("def f(): ...", metadata={"tags": [SKIP_TAG], "nbgrader": {
        "grade": False, "solution": True, "locked": False, "grade_id": "s", "schema_version": 3}})
    plain = new_code_cell("x = 1")
    skip = SkipDemoCells()
    out = [skip.preprocess_cell(c, {}, i)[0].source for i, c in enumerate([demo, test, answer, plain])]
    assert out == [SKIPPED, "check()", "def f(): ...", "x = 1"]
