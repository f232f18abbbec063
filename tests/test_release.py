"""chapters/ is exactly what nbgrader generates from solutions/, and the student versions run cleanly."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from autograders.engine.release import release
from course import CHAPTERS, SOLUTIONS, chapter_names, notebook_of

ALLOWED_ERRORS = {"NotImplementedError", "CheckFailed"}


def cell_sources(path):
    nb = nbformat.read(path, as_version=4)
    return [(c.cell_type, c.source, c.metadata.get("nbgrader", {}).get("grade_id")) for c in nb.cells]


@pytest.mark.parametrize("chapter", chapter_names())
def test_released_chapter_is_up_to_date(chapter, tmp_path):
    fresh = release(chapter, tmp_path)
    committed = CHAPTERS / chapter
    assert committed.is_dir(), f"chapters/{chapter} is missing: run `make release` and commit it"
    fresh_files = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    committed_files = sorted(p.relative_to(committed) for p in committed.rglob("*")
                             if p.is_file() and ".ipynb_checkpoints" not in p.parts)
    assert fresh_files == committed_files, f"chapters/{chapter} has other files than a fresh release"
    for rel in fresh_files:
        if rel.suffix == ".ipynb":
            assert cell_sources(fresh / rel) == cell_sources(committed / rel), (
                f"chapters/{chapter}/{rel} is stale: solutions/ changed; run `make release` and commit")
        else:
            assert (fresh / rel).read_bytes() == (committed / rel).read_bytes(), f"chapters/{chapter}/{rel} is stale"


@pytest.mark.parametrize("chapter", chapter_names())
def test_student_notebook_fails_only_at_the_stubs(chapter):
    """An import or helper defined inside a solution block would break the student version silently."""
    path = notebook_of(CHAPTERS / chapter)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [(i, o.ename, o.evalue.splitlines()[0] if o.evalue else "")
              for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.outputs if o.output_type == "error"]
    unexpected = [e for e in errors if e[1] not in ALLOWED_ERRORS]
    assert not unexpected, f"chapters/{chapter}: cells raise errors other than the stubs' (cell, error, message): {unexpected}"
    graded = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("solution")]
    assert len(errors) >= len(graded) > 0, "every stub should raise until it is implemented"


@pytest.mark.parametrize("chapter", chapter_names())
def test_solution_notebook_is_well_formed(chapter):
    nb = nbformat.read(notebook_of(SOLUTIONS / chapter), as_version=4)
    ids = [c.metadata["nbgrader"]["grade_id"] for c in nb.cells if "nbgrader" in c.metadata]
    assert len(ids) == len(set(ids)), f"duplicate nbgrader grade ids in {chapter}: {ids}"
    tests = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade")]
    assert len(tests) >= 4, f"{chapter} should have at least 4 graded exercises, has {len(tests)}"
    for c in tests:
        assert "### BEGIN HIDDEN TESTS" in c.source, f"{chapter}: test cell {c.metadata.nbgrader.grade_id} has no hidden tests"
        assert c.metadata.nbgrader.get("points", 0) > 0
    assert all(c.outputs == [] for c in nb.cells if c.cell_type == "code"), \
        f"solutions/{chapter}: clear the outputs before committing (the book and CI execute it)"
