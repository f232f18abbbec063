"""Check a notebook before handing it in: run it top to bottom and report every graded test cell.

    python -m autograders.engine.validate work/01_self_attention/self_attention.ipynb [...]
    make validate NOTEBOOK=work/01_self_attention/self_attention.ipynb

Prints one line per exercise (PASS or FAIL, with the check's whole message, not cut) and exits with
status 1 when any test cell fails or any cell raises, 2 when the notebook cannot be read -- so it can
run in a student's own CI. Only the visible checks run here; hidden checks run when the work is graded.
The notebook file is never modified.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat


def _nbgrader(cell) -> dict:
    md = cell.get("metadata", {}).get("nbgrader", {})
    return md if isinstance(md, dict) else {}


def _error_text(cell) -> str | None:
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            return f"{out.get('ename', 'Error')}: {out.get('evalue', '')}".strip()
    return None


def validate(path: Path, timeout: int = 600) -> tuple[bool, list[str]]:
    from nbclient import NotebookClient

    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as exc:  # noqa: BLE001 - say why, do not show a stack
        raise SystemExit(f"{path}: not a readable notebook ({type(exc).__name__}: {exc})") from None
    client = NotebookClient(nb, timeout=timeout, allow_errors=True, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent.resolve())}})
    client.execute()
    lines, ok = [], True
    tests = 0
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        md = _nbgrader(cell)
        error = _error_text(cell)
        if md.get("grade") and not md.get("solution"):
            tests += 1
            name = md.get("grade_id", f"cell {i + 1}")
            points = md.get("points", 0)
            if error is None:
                lines.append(f"PASS {name} ({points:g} point(s))")
            else:
                ok = False
                lines.append(f"FAIL {name} ({points:g} point(s))\n" + "\n".join("    " + l for l in error.splitlines()))
        elif error is not None:
            ok = False
            first = error.splitlines()[0] if error else "error"
            lines.append(f"ERROR in cell {i + 1} (not a test cell): {first}")
    if tests == 0:
        ok = False
        lines.append("no graded test cell found: is this a course notebook?")
    return ok, lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m autograders.engine.validate", description=__doc__.split("\n\n")[0])
    p.add_argument("notebooks", nargs="+", type=Path)
    p.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    args = p.parse_args(argv)
    status = 0
    for path in args.notebooks:
        if not path.is_file():
            print(f"{path}: no such notebook", file=sys.stderr)
            return 2
        ok, lines = validate(path, args.timeout)
        print(f"== {path}")
        print("\n".join(lines))
        print(f"== {'all visible checks pass' if ok else 'NOT ready to hand in'}: {path}")
        status = status or (0 if ok else 1)
    return status


if __name__ == "__main__":
    sys.exit(main())
