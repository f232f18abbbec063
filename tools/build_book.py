"""Build the Jupyter Book offline, warnings as errors, in two editions from one execution.

    python tools/build_book.py [OUT]        # OUT defaults to _build/

* ``OUT/student/index.html``: the public book. Every chapter is executed as the instructor wrote it
  (so prose, outputs and figures are all there), then each solution cell's code is replaced by the
  stub students get and the hidden tests are removed, exactly as in ``chapters/``.
* ``OUT/instructor/index.html``: the same pages with the solutions folded (click to show).

Every notebook is executed once (nbclient; a raising cell fails the build) and both editions are built
from the executed copies. MathJax comes from the django-static-mathjax wheel (a pinned dependency) and
is copied into ``_book_static/mathjax`` so that the pages render math without any network access.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]


def copy_mathjax() -> Path:
    spec = importlib.util.find_spec("mathjax")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("MathJax is missing: install the pinned requirements (make setup)")
    source = Path(next(iter(spec.submodule_search_locations))) / "static" / "mathjax" / "es5"
    if not (source / "tex-chtml.js").is_file():
        raise SystemExit(f"MathJax's tex-chtml.js was not found under {source}")
    target = ROOT / "_book_static" / "mathjax"
    if not (target / "tex-chtml.js").is_file():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.map"))
    return target


def toc_pages() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [c["file"] for part in toc["parts"] for c in part["chapters"]]


def execute(page: str) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    path = ROOT / f"{page}.ipynb"
    nb = nbformat.read(path, as_version=4)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except Exception as exc:  # noqa: BLE001 - the page's own error, with its chapter
        raise SystemExit(f"{page} raised while the book was built:\n{exc}") from None
    return nb


def student_edition(executed: nbformat.NotebookNode, page: str) -> nbformat.NotebookNode:
    """The executed notebook with solution code and hidden tests as the students' release has them."""
    chapter = Path(page).parent.name
    release = nbformat.read(ROOT / "chapters" / chapter / f"{Path(page).name}.ipynb", as_version=4)
    released = {c.metadata.get("nbgrader", {}).get("grade_id"): c.source for c in release.cells
                if c.metadata.get("nbgrader", {}).get("grade_id")}
    nb = copy.deepcopy(executed)
    for cell in nb.cells:
        grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
        if grade_id in released:
            cell.source = released[grade_id]
            tags = [t for t in cell.metadata.get("tags", []) if t != "hide-input"]
            cell.metadata["tags"] = tags
    return nb


def _jupyter_book(stage: Path, out: Path) -> None:
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb), "build", str(stage), "--path-output", str(stage), "--warningiserror", "--all"]
    print(" ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=stage)
    if proc.returncode != 0:
        raise SystemExit(f"the book build failed (exit {proc.returncode}); see the log above")
    shutil.rmtree(out, ignore_errors=True)
    shutil.move(str(stage / "_build" / "html"), out)


def _stage(folder: Path, notebooks: dict[str, nbformat.NotebookNode]) -> Path:
    folder.mkdir(parents=True)
    for name in ("_toc.yml", "intro.md"):
        shutil.copy(ROOT / name, folder / name)
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["execute"]["execute_notebooks"] = "off"  # executed once, above
    config["exclude_patterns"] = [p for p in config.get("exclude_patterns", []) if p != "chapters/*"]
    (folder / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    (folder / "_book_static").symlink_to(ROOT / "_book_static")
    for page, nb in notebooks.items():
        target = folder / f"{page}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, target)
    return folder


def build(out: Path | None = None, workers: int | None = None) -> dict[str, Path]:
    copy_mathjax()
    out = Path(out or ROOT / "_build")
    pages = toc_pages()
    workers = workers or min(2, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        executed = dict(zip(pages, pool.map(execute, pages)))
    editions = {}
    with tempfile.TemporaryDirectory(prefix="book-") as tmp:
        for edition in ("student", "instructor"):
            notebooks = {p: (student_edition(nb, p) if edition == "student" else nb) for p, nb in executed.items()}
            stage = _stage(Path(tmp) / edition, notebooks)
            _jupyter_book(stage, out / edition)
            editions[edition] = out / edition
    for edition, html in editions.items():
        print(f"{edition} book: {html / 'index.html'}")
    return editions


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
