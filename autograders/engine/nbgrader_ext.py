"""nbgrader customisations the course's nbgrader_config.py loads.

:class:`OverwriteCellsQuietly`: nbgrader's release removes hidden tests from the test cells, so when
``nbgrader autograde`` restores a test cell from the gradebook it reports "checksum has changed" for
every cell that had hidden tests -- on every correct, untouched submission. This version restores
the hidden tests silently when the submitted cell is exactly the released one, and still reports (and
overwrites) any other change.
"""

from __future__ import annotations

from nbgrader import utils
from nbgrader.api import MissingEntry
from nbgrader.preprocessors import ClearHiddenTests, OverwriteCells


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
