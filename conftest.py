"""Suite-wide guard: a full run (`make test`) must collect the tests, the book build (which executes
every solution notebook once, a raising cell failing it) and the per-chapter grading tests."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
MUST_RUN = ("test_book.py::test_book_builds_offline_in_two_editions",
            "test_grading_chapters.py::test_a_class_of_correct_submissions_gets_full_marks_with_two_workers")


def pytest_collection_finish(session):
    if not session.items:
        raise pytest.UsageError("no tests were collected: the suite must never pass by running nothing")
    full_run = [Path(a).resolve() for a in session.config.args] in ([ROOT], [ROOT / "tests"])
    if not full_run or session.config.getoption("markexpr", default=""):
        return
    ids = [item.nodeid for item in session.items]
    for needed in MUST_RUN:
        if not any(needed in i for i in ids):
            raise pytest.UsageError(f"a full run must include {needed}")
    chapters = sorted(p.name for p in (ROOT / "solutions").glob("[0-9][0-9]_*") if p.is_dir())
    graded = {i.split("[", 1)[1].rstrip("]") for i in ids if MUST_RUN[1] in i and "[" in i}
    missing = [c for c in chapters if c not in graded]
    if missing:
        raise pytest.UsageError(f"these chapters are not graded by the full run: {missing}")
