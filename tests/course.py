"""Where things are, for the test suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "solutions"
CHAPTERS = ROOT / "chapters"


def chapter_names() -> list[str]:
    names = sorted(p.name for p in SOLUTIONS.iterdir() if p.is_dir() and p.name[:2].isdigit())
    if not names:
        raise RuntimeError("no chapters found under solutions/")
    return names


def notebook_of(folder: Path) -> Path:
    notebooks = sorted(folder.glob("*.ipynb"))
    if len(notebooks) != 1:
        raise FileNotFoundError(f"expected exactly one notebook in {folder}, found {[n.name for n in notebooks]}")
    return notebooks[0]


def run(cmd: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a command; on failure the assertion shows its output."""
    # nbgrader runs helper programs (alembic) by name: the environment's bin/ must be on PATH.
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, (
        f"command failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n"
        f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
    )
    return proc


def nbgrader(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "nbgrader", *args], cwd=cwd)
