"""The Jupyter Book builds offline with warnings as errors, and a raising chapter fails it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import nbformat
import pytest
import yaml

import importlib.util

from course import ROOT, chapter_names, notebook_of, SOLUTIONS

pytestmark = pytest.mark.slow
def _load_tool(name: str):
    """A script of tools/, loaded by path (tools/ on sys.path would shadow packages such as hub/)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_book = _load_tool("build_book")


def toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [c["file"] for part in toc["parts"] for c in part["chapters"]]


def test_toc_lists_every_chapter_in_order():
    expected = [str(notebook_of(SOLUTIONS / ch).relative_to(ROOT).with_suffix("")) for ch in chapter_names()]
    assert toc_files() == expected, "_toc.yml must list every solutions/ chapter, in order"


def _solution_lines(page: str) -> list[str]:
    """Lines that only the solution cells of a chapter have (what the student edition must not show)."""
    nb = nbformat.read(ROOT / f"{page}.ipynb", as_version=4)
    chapter = page.split("/")[1]
    release = nbformat.read(ROOT / "chapters" / chapter / f"{page.split('/')[-1]}.ipynb", as_version=4)
    given = "\n".join(c.source for c in release.cells)  # code the release itself shows (prose hints too)
    lines = []
    for cell in nb.cells:
        if cell.metadata.get("nbgrader", {}).get("solution") and "### BEGIN SOLUTION" in cell.source:
            inside = cell.source.split("### BEGIN SOLUTION", 1)[1].split("### END SOLUTION", 1)[0]
            lines += [l.strip() for l in inside.splitlines() if len(l.strip()) > 25 and l.strip() not in given]
    # (a substring test: a line the prose quotes as a hint is not a leak)
    return lines


def test_book_builds_offline_in_two_editions(tmp_path):
    editions = build_book.build(tmp_path)
    for edition, html in editions.items():
        for page in toc_files():
            path = html / f"{page}.html"
            assert path.is_file(), f"the {edition} book has no page for {page}"
            text = path.read_text()
            assert "Traceback" not in text, f"{page} shows a traceback"
            assert re.search(r'<img [^>]*src="[^"]*_images/', text), f"{page} shows no executed plot"
            external = re.findall(r'<script[^>]+src="(https?://[^"]+)"', text)
            assert not external, f"{page} loads scripts from the network: {external}"
            assert '_static/mathjax/tex-chtml.js' in text, f"{page} does not use the bundled MathJax"
            import html as _html

            plain = _html.unescape(re.sub(r"<[^>]+>", "", text))
            solution = [l for l in _solution_lines(page) if l in plain]
            if edition == "student":
                assert not solution, f"the student book shows solution code on {page}: {solution[:2]}"
                assert "NotImplementedError" in plain and "BEGIN HIDDEN TESTS" not in plain
            else:
                assert "toggle" in text, f"{page}: solution cells are not folded"
                assert solution, f"the instructor book has no solution code on {page}"
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
