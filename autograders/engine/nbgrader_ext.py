"""nbgrader customisations the course's nbgrader_config.py loads.

:class:`OverwriteCellsQuietly`: nbgrader's release removes hidden tests from the test cells, so when
``nbgrader autograde`` restores a test cell from the gradebook it reports "checksum has changed" for
every cell that had hidden tests -- on every correct, untouched submission. This version restores
the hidden tests silently when the submitted cell is exactly the released one, and still reports (and
overwrites) any other change.

:class:`SkipDemoCells`: cells tagged ``skip-in-grading`` (training runs, timing demos that no check
needs) are not run by ``nbgrader autograde`` either, as in ``make grade``: a class is graded in seconds
per student, not a minute.
"""

from __future__ import annotations

from nbgrader import utils
from nbgrader.api import MissingEntry
from nbgrader.preprocessors import ClearHiddenTests, NbGraderPreprocessor, OverwriteCells

SKIP_TAG = "skip-in-grading"
SKIPPED = "# not run by the grader: this cell is tagged skip-in-grading (a training run or demo no check needs)"


class OverwriteCellsQuietly(OverwriteCells):
    def preprocess_cell(self, cell, resources, cell_index):
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id is not None and utils.is_locked(cell):
            try:
                source_cell = self.gradebook.find_source_cell(grade_id, self.notebook_id, self.assignment_id)
            except MissingEntry:
                source_cell = None
            if source_cell is not None and source_cell.source != cell.source:
                released = _without_hidden_tests(source_cell.source)
                if released is not None and released.strip() == cell.source.strip():
                    cell.source = source_cell.source  # exactly what the release removed: put it back
        return super().preprocess_cell(cell, resources, cell_index)


class SkipDemoCells(NbGraderPreprocessor):
    """Blank the code of plain cells tagged ``skip-in-grading``. Cells nbgrader knows (graded, solution or
    locked) always run, whatever their tags, so a tag added to a test cell cannot skip its tests."""

    def preprocess_cell(self, cell, resources, cell_index):
        if (cell.cell_type == "code" and SKIP_TAG in cell.metadata.get("tags", [])
                and not utils.is_grade(cell) and not utils.is_solution(cell) and not utils.is_locked(cell)):
            cell.source = SKIPPED
            cell.outputs = []
            cell.execution_count = None
        return cell, resources


def _without_hidden_tests(source: str) -> str | None:
    from nbformat.v4 import new_code_cell

    cell = new_code_cell(source)
    cell.metadata["nbgrader"] = {"grade": True, "solution": False, "locked": True, "grade_id": "x", "points": 0,
                                 "schema_version": 3}
    try:
        cell, _ = ClearHiddenTests().preprocess_cell(cell, {}, 0)
    except Exception:  # noqa: BLE001 - unbalanced markers: leave it to nbgrader
        return None
    return cell.source


# ---------------------------------------------------------------------------------------------
# nbgrader's feedback pages, offline: MathJax inlined instead of loaded from a CDN

_CONFIG = ("<script>window.MathJax = {tex: {inlineMath: [['$', '$'], ['\\\\(', '\\\\)']], "
           "displayMath: [['$$', '$$'], ['\\\\[', '\\\\]']], processEscapes: true}, svg: {fontCache: 'global'}};</script>")


def feedback_template_dirs() -> list[str]:
    """Template folders for ``nbgrader generate_feedback``: nbgrader's own, and ``course_feedback``,
    which extends nbgrader's feedback template with MathJax 3 (the pinned django-static-mathjax wheel's
    self-contained SVG build) inlined, so that a feedback page renders its math with no network."""
    import importlib.util
    import os
    from pathlib import Path

    import nbgrader

    nbgrader_templates = Path(nbgrader.__file__).parent / "server_extensions" / "formgrader" / "templates"
    spec = importlib.util.find_spec("mathjax")
    js_path = Path(next(iter(spec.submodule_search_locations))) / "static" / "mathjax" / "es5" / "tex-svg.js"
    ours = Path(__file__).resolve().parents[2] / "_book_static" / "nbgrader_templates"
    folder = ours / "course_feedback"
    template = folder / "index.html.j2"
    if not template.is_file() or template.stat().st_mtime < js_path.stat().st_mtime:
        folder.mkdir(parents=True, exist_ok=True)
        local = _CONFIG + "<script>" + js_path.read_text(encoding="utf-8") + "</script>"
        # nbgrader's own feedback template, read from the installed package, with its CDN MathJax swapped
        theirs = (nbgrader_templates / "feedback" / "index.html.j2").read_text(encoding="utf-8")
        if "{{ mathjax() }}" not in theirs:
            raise RuntimeError("nbgrader's feedback template changed: update autograders/engine/nbgrader_ext.py")
        text = theirs.replace("{{ mathjax() }}", "{% raw %}" + local + "{% endraw %}")
        tmp = template.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        (folder / "conf.json").write_text((nbgrader_templates / "feedback" / "conf.json").read_text())
        tmp.replace(template)
    return [str(nbgrader_templates), str(ours)]
