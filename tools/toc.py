"""Write _toc.yml from the chapters in solutions/ (in course order, grouped into the course's parts).

    python tools/toc.py
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = [("Part I: attention and the Transformer", range(1, 5)),
         ("Part II: faster and bigger", range(5, 9)),
         ("Part III: vision and multimodal Transformers", range(9, 12)),
         ("Part IV: from diffusion to Sora", range(12, 16)),
         ("Part V: serving and retrieval", range(16, 19))]


def main() -> None:
    chapters = sorted(p for p in (ROOT / "solutions").iterdir() if p.is_dir() and p.name[:2].isdigit())
    lines = ["# Book contents: the instructor notebooks, executed once at build time (tools/build_book.py);",
             "# written by tools/toc.py from solutions/.", "format: jb-book", "root: intro", "parts:"]
    for caption, numbers in PARTS:
        entries = [c for c in chapters if int(c.name[:2]) in numbers]
        if not entries:
            continue
        lines += [f'  - caption: "{caption}"', "    chapters:"]
        for c in entries:
            notebook = next(c.glob("*.ipynb"))
            lines.append(f"      - file: solutions/{c.name}/{notebook.stem}")
    (ROOT / "_toc.yml").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
