"""Suite-wide guard: a full run (`make test`) must execute every solution notebook and the tests."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent


def pytest_collection_finish(session):
    if not session.items:
        raise pytest.UsageError("no tests were collected: the suite must never pass by running nothing")
    full_run = [Path(a).resolve() for a in session.config.args] in (
        [ROOT], [ROOT / "tests", ROOT / "solutions"])
    if not full_run or not session.config.getoption("nbval_lax", default=False):
        return
    notebooks = {p.resolve() for p in (ROOT / "solutions").glob("[0-9][0-9]_*/*.ipynb")}
    executed = {Path(str(item.fspath)).resolve() for item in session.items}
    missing = sorted(str(p.relative_to(ROOT)) for p in notebooks - executed)
    if missing:
        raise pytest.UsageError(f"these solution notebooks were not collected for execution: {missing}")
    if not any(Path(str(i.fspath)).parent == ROOT / "tests" for i in session.items):
        raise pytest.UsageError("no tests from tests/ were collected")

