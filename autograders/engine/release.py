"""Generate the student notebooks (chapters/) from the instructor notebooks (solutions/) with nbgrader.

    python -m autograders.engine.release                 # every chapter, into chapters/
    python -m autograders.engine.release 01_self_attention
    python -m autograders.engine.release --into DIR      # elsewhere (used by the up-to-date test)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOLUTIONS = ROOT / "solutions"


def chapters() -> list[str]:
    return sorted(p.name for p in SOLUTIONS.iterdir() if p.is_dir() and p.name[:2].isdigit())


def release(chapter: str, into: Path) -> Path:
    """Run nbgrader generate_assignment for one chapter; return the released folder."""
    if not (SOLUTIONS / chapter).is_dir():
        raise SystemExit(f"no such chapter: solutions/{chapter} (chapters: {', '.join(chapters())})")
    into = into.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        # Generate into a scratch folder, then replace the target: a failed run leaves it untouched.
        cmd = [sys.executable, "-m", "nbgrader", "generate_assignment", chapter, "--no-db", "--force",
               f"--CourseDirectory.root={ROOT}", f"--CourseDirectory.release_directory={tmp}",
               "--log-level=WARN"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0:
            raise SystemExit(f"nbgrader could not release {chapter}:\n{proc.stdout}\n{proc.stderr}")
        out = into / chapter
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(Path(tmp) / chapter, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chapters", nargs="*", help="chapter folders (default: all)")
    parser.add_argument("--into", type=Path, default=ROOT / "chapters")
    args = parser.parse_args(argv)
    for chapter in args.chapters or chapters():
        out = release(chapter, args.into)
        print(f"released {chapter} -> {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
