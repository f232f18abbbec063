import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest

# `make test` distributes with --dist loadgroup. The per-chapter tests of these files share nothing but
# their own tmp_path, so each may run on either worker (18 chapters x 30-90 s balance well that way);
# every other file keeps all its tests on one worker, as --dist loadfile would (module fixtures, files).
PER_TEST_FILES = {"test_roundtrip.py", "test_grading_chapters.py", "test_release.py"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name not in PER_TEST_FILES:
            item.add_marker(pytest.mark.xdist_group(item.path.name))
