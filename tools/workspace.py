"""The student's own copies of the chapters: ``work/<chapter>/<notebook>.ipynb`` (git-ignored).

    python tools/workspace.py            # copy every chapter that work/ does not have yet

A notebook that already exists in work/ is never touched, so no course command and no ``git pull``
of course updates can overwrite a student's work. New chapters (after a pull) are added; a chapter
whose released version changed since it was copied is reported, with where the new version is.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _show(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def sync(release: Path = ROOT / "chapters", work: Path = ROOT / "work") -> list[str]:
    messages = []
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        raise SystemExit(f"{work} exists and is not a folder; move it away first")
    for notebook in sorted(release.glob("*/*.ipynb")):
        target = work / notebook.parent.name / notebook.name
        stamp = target.with_name(f".{target.name}.released-sha256")
        if target.exists() or target.is_symlink():
            if stamp.is_file() and stamp.read_text().strip() != _digest(notebook):
                messages.append(f"updated upstream (your copy is untouched): {_show(notebook)}")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(notebook, target)
        stamp.write_text(_digest(notebook) + "\n")
        messages.append(f"new: {_show(target)}")
    return messages


if __name__ == "__main__":
    for line in sync():
        print(line)
    sys.exit(0)
