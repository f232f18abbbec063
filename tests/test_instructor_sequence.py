"""The README's instructor sequence, run verbatim in a fresh copy of the course, as an instructor would.

The copy holds the repository's files (tracked and untracked-not-ignored: what a clone has) and the
already-installed virtual environment. Two students hand in chapter 01: the solution and the stub.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import nbformat
import pytest

from course import CHAPTERS, ROOT, SOLUTIONS, notebook_of
from test_roundtrip import solved

pytestmark = pytest.mark.slow
CHAPTER = "01_self_attention"


def readme_block(marker: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {marker} -->\s*```bash\n(.*?)```", text, re.S)
    assert m, f"README.md has no ```bash block after <!-- {marker} -->"
    return [line.split("  #")[0].strip() for line in m.group(1).splitlines() if line.strip() and not line.startswith("#")]


def fresh_copy(dest):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / name.decode()
        if src.is_file():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    # the environment is the one already installed: make must not see its inputs as newer than its stamp
    stamp = (ROOT / ".venv" / ".installed").stat().st_mtime
    for name in ("requirements.txt", "pyproject.toml"):
        os.utime(dest / name, (stamp - 1, stamp - 1))
    return dest


def test_readme_instructor_sequence_works_verbatim(tmp_path):
    course = fresh_copy(tmp_path / "course")
    release_nb = nbformat.read(notebook_of(CHAPTERS / CHAPTER), as_version=4)
    for student, nb in (("alice", solved(release_nb, nbformat.read(notebook_of(SOLUTIONS / CHAPTER), as_version=4))),
                        ("bob", release_nb)):
        folder = course / "submitted" / student / CHAPTER
        folder.mkdir(parents=True)
        nbformat.write(nb, folder / notebook_of(CHAPTERS / CHAPTER).name)
    before = {p: p.read_bytes() for p in (course / "chapters").rglob("*.ipynb")}
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    for command in readme_block("instructor-sequence"):
        proc = subprocess.run(["bash", "-c", command], cwd=course, capture_output=True, text=True, env=env,
                              timeout=900)
        assert proc.returncode == 0, f"`{command}` failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    import csv

    rows = {r["student_id"]: r for r in csv.DictReader((course / "graded" / "grades.csv").open())
            if r["assignment"] == CHAPTER}
    assert float(rows["alice"]["score"]) == float(rows["alice"]["max_score"]) > 0, rows
    assert float(rows["bob"]["score"]) == 0, rows
    assert (course / "feedback" / "alice" / CHAPTER).is_dir() and (course / "feedback" / "bob" / CHAPTER).is_dir()
    assert not (course / "grades.csv").exists(), "nbgrader export left grades.csv at the root"
    assert {p: p.read_bytes() for p in (course / "chapters").rglob("*.ipynb")} == before, "chapters/ changed"
    # plain nbgrader on the same course directory: autograde restores hidden tests without warnings
    env["PYTHONPATH"] = str(course)
    proc = subprocess.run([sys.executable, "-m", "nbgrader", "autograde", CHAPTER, "--force"], cwd=course,
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checksum" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
