"""Record a chapter in the course's gradebook, as ``nbgrader generate_assignment`` does, without
touching ``chapters/`` (the committed student release) or anyone's work.

    python -m autograders.engine.assignment 01_self_attention [--gradebook sqlite:///gradebook.db]

``nbgrader generate_assignment`` itself refuses ("Skipping existing assignment") because the release
folder already exists, and ``--force`` would regenerate it; this runs it on a scratch copy instead.
Afterwards ``nbgrader autograde``, ``generate_feedback``, ``export`` and formgrader work as usual.
"""

from __future__ import annotations

import argparse
import sys

from autograders.engine.grade import ensure_assignment
from autograders.engine.sandbox import REPO


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autograders.engine.assignment", description=__doc__.split("\n\n")[0])
    p.add_argument("chapters", nargs="+")
    p.add_argument("--gradebook", default=f"sqlite:///{REPO / 'gradebook.db'}")
    args = p.parse_args(argv)
    for chapter in args.chapters:
        folder = REPO / "solutions" / chapter
        if not folder.is_dir():
            p.error(f"no such chapter: solutions/{chapter}")
        ensure_assignment(args.gradebook, chapter, folder)
        print(f"recorded {chapter} in {args.gradebook}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
