"""Build the Jupyter Book offline, warnings as errors.

MathJax comes from the django-static-mathjax wheel (a pinned dependency) and is copied into
_static/mathjax so that the built pages render math without any network access.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

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


def build(out: Path | None = None) -> Path:
    copy_mathjax()
    out = out or ROOT / "_build"
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb), "build", str(ROOT), "--path-output", str(out), "--warningiserror", "--all"]
    print(" ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"the book build failed (exit {proc.returncode}); see the log above")
    html = out / "_build" / "html"
    print(f"book built: {html / 'index.html'}")
    return html


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
