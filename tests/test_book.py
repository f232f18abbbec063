"""The Jupyter Book builds offline with warnings as errors, and a raising chapter fails it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import nbformat
import pytest
import yaml

from course import ROOT, chapter_names, notebook_of, SOLUTIONS

pytestmark = pytest.mark.slow
sys.path.insert(0, str(ROOT / "tools"))
import build_book  # noqa: E402


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [c["file"] for part in toc["parts"] for c in part["chapters"]]


def test_toc_lists_every_chapter_in_order():
    expected = [str(notebook_of(SOLUTIONS / ch).relative_to(ROOT).with_suffix("")) for ch in chapter_names()]
    assert toc_files() == expected, "_toc.yml must list every solutions/ chapter, in order"


def test_book_builds_offline(tmp_path):
    html = build_book.build(tmp_path)
    for page in toc_files():
        path = html / f"{page}.html"
        assert path.is_file(), f"the book has no page for {page}"
        text = path.read_text()
        assert "Traceback" not in text, f"{page} shows a traceback"
        assert re.search(r'<img [^>]*src="[^"]*_images/', text), f"{page} shows no executed plot"
        external = re.findall(r'<script[^>]+src="(https?://[^"]+)"', text)
        assert not external, f"{page} loads scripts from the network: {external}"
        assert '_static/mathjax/tex-chtml.js' in text, f"{page} does not use the bundled MathJax"
        assert "toggle" in text, f"{page}: solution cells are not folded"
    assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file()


def test_raising_chapter_fails_the_build(tmp_path):
    book = tmp_path / "book"
    book.mkdir()
    shutil.copy(ROOT / "_config.yml", book / "_config.yml")
    (book / "_book_static").symlink_to(build_book.copy_mathjax().parent)
    (book / "intro.md").write_text("# Intro\n")
    (book / "_toc.yml").write_text("format: jb-book\nroot: intro\nchapters:\n  - file: broken\n")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell("# Broken"), nbformat.v4.new_code_cell("raise ValueError('boom')")]
    nbformat.write(nb, book / "broken.ipynb")
    proc = subprocess.run([sys.executable, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())",
                           "build", str(book), "--warningiserror"], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, "a chapter that raises must fail the book build"
    assert "boom" in proc.stdout + proc.stderr
