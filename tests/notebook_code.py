"""Load the graded solutions of a solution notebook as the grader would, without its training runs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import nbformat

ROOT = Path(__file__).resolve().parents[1]

SKIP_TAG = "skip-in-grading"


def grading_cells(path: Path) -> list[str]:
    """The code cells the sandboxed grader runs: every code cell up to the last solution cell,
    except test cells and cells tagged ``skip-in-grading`` (training runs, timing demos)."""
    cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    solutions = [i for i, c in enumerate(cells) if c.metadata.get("nbgrader", {}).get("solution")]
    if not solutions:
        raise ValueError(f"{path} has no solution cells")
    return [c.source for c in cells[: solutions[-1] + 1]
            if not c.metadata.get("nbgrader", {}).get("grade") and SKIP_TAG not in c.metadata.get("tags", [])]


def load_solutions(chapter: str, preamble: str = "") -> SimpleNamespace:
    """Run the solution notebook of ``solutions/<chapter>/`` the way the sandboxed grader runs a
    submission (see :func:`grading_cells`) and return what it defined."""
    notebooks = sorted((ROOT / "solutions" / chapter).glob("*.ipynb"))
    if len(notebooks) != 1:
        raise FileNotFoundError(f"expected one notebook in solutions/{chapter}, found {notebooks}")
    namespace: dict = {"__name__": f"solutions_{chapter}"}
    if preamble:
        exec(compile(preamble, "<preamble>", "exec"), namespace)
    for i, source in enumerate(grading_cells(notebooks[0])):
        exec(compile(source, f"{notebooks[0].name}:cell[{i}]", "exec"), namespace)
    return SimpleNamespace(**namespace)


def not_implemented(*args, **kwargs):
    """What a released stub does."""
    raise NotImplementedError()
