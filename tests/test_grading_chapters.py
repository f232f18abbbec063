"""The sandboxed grader works for every chapter: the solution gets full marks, the stub zero."""

from __future__ import annotations

import nbformat
import pytest

from autograders.engine import grade
from autograders.engine.sandbox import Limits
from course import CHAPTERS, SOLUTIONS, chapter_names, notebook_of
from test_roundtrip import solved

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("chapter", chapter_names())
def test_sandboxed_grader_gives_solution_full_marks_and_stub_zero(chapter, tmp_path):
    release_nb = nbformat.read(notebook_of(CHAPTERS / chapter), as_version=4)
    source_nb = nbformat.read(notebook_of(SOLUTIONS / chapter), as_version=4)
    subs = tmp_path / "submissions"
    subs.mkdir()
    nbformat.write(solved(release_nb, source_nb), subs / "alice.ipynb")
    nbformat.write(release_nb, subs / "bob.ipynb")
    grader = grade.Grader(chapter, course_dir=tmp_path, source_dir=SOLUTIONS, release_dir=CHAPTERS,
                          workers=2, db_url=f"sqlite:///{tmp_path / 'gradebook.db'}", out=tmp_path / "out",
                          limits=Limits(step_wall_s=60.0, start_wall_s=120.0), progress=False)
    results = {r.student: r for r in grader.run(subs)}
    alice, bob = results["alice"], results["bob"]
    maximum = sum(r.max_points for r in alice.rows)
    lost = [(r.name, r.points, r.max_points, r.reasons) for r in alice.rows if r.points != r.max_points]
    assert alice.score == maximum > 0 and not lost, f"{chapter}: the solution lost points: {lost}"
    assert bob.score == 0, f"{chapter}: the untouched stub earned points: {bob}"
