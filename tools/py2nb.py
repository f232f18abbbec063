"""Authoring aid: turn a percent-format draft into an nbgrader source notebook.

The notebook it writes (under ``solutions/``) is the source of truth; the draft is a convenience for
writing a new chapter and is not kept. Cell headers:

    # %% [markdown]                      prose (lines start with "# ")
    # %%                                 ordinary code
    # %% solution id=NAME                graded code to write (### BEGIN/END SOLUTION inside)
    # %% tests id=NAME points=N          a locked, graded test cell
    # %% ... tags=a,b                    any header may add cell tags (e.g. hide-input)

Usage: python tools/py2nb.py DRAFT.py solutions/NN_name/name.ipynb
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat

HEADER = re.compile(r"^# %%(?P<rest>.*)$")


def _meta(kind: str, opts: dict[str, str]) -> dict:
    grade_id = opts.get("id")
    if kind in ("solution", "tests") and not grade_id:
        raise SystemExit(f"a '{kind}' cell needs id=NAME")
    if kind == "solution":
        return {"nbgrader": {"grade": False, "grade_id": grade_id, "locked": False,
                             "schema_version": 3, "solution": True, "task": False}}
    if kind == "tests":
        return {"nbgrader": {"grade": True, "grade_id": grade_id, "locked": True,
                             "points": int(opts.get("points", 1)), "schema_version": 3,
                             "solution": False, "task": False}}
    return {}


def convert(text: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        m = HEADER.match(line)
        if m:
            cells.append((m.group("rest").strip(), []))
        elif cells:
            cells[-1][1].append(line)
    for header, lines in cells:
        while lines and not lines[-1].strip():
            lines.pop()
        while lines and not lines[0].strip():
            lines.pop(0)
        words = header.split()
        opts = dict(w.split("=", 1) for w in words if "=" in w)
        flags = [w for w in words if "=" not in w]
        if flags[:1] == ["[markdown]"]:
            body = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#") for l in lines)
            cell = nbformat.v4.new_markdown_cell(body)
            kind = "markdown"
        else:
            cell = nbformat.v4.new_code_cell("\n".join(lines))
            kind = flags[0] if flags else "code"
        cell.metadata.update(_meta(kind, opts))
        if "tags" in opts:
            cell.metadata["tags"] = opts["tags"].split(",")
        if kind == "solution" and "hide-input" not in cell.metadata.get("tags", []):
            cell.metadata.setdefault("tags", []).append("hide-input")  # folded in the book
        nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"c{i:03d}"
    nbformat.validate(nb)
    return nb


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    src, dst = Path(argv[0]), Path(argv[1])
    nb = convert(src.read_text())
    dst.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dst)
    print(f"wrote {dst} ({len(nb.cells)} cells)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
