"""Execute every solution notebook top to bottom and record how long each takes.

    python benchmarks/notebooks.py [CHAPTER ...]

Writes benchmarks/results/notebooks.json and notebooks.md: seconds per chapter, the total, and the
machine (cores, torch version, the thread count the notebooks use). The course's budget is 60 s
per chapter on a 2-core CPU; chapters over it are flagged.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import nbformat
import torch
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BUDGET_S = 60.0


def chapters(selected: list[str]) -> list[Path]:
    folders = sorted(p for p in (ROOT / "solutions").iterdir() if p.is_dir() and p.name[:2].isdigit())
    if selected:
        unknown = set(selected) - {f.name for f in folders}
        if unknown:
            raise SystemExit(f"unknown chapter(s): {sorted(unknown)}")
        folders = [f for f in folders if f.name in selected]
    return [nb for f in folders for nb in sorted(f.glob("*.ipynb"))]


def run_one(path: Path) -> dict:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    error = None
    try:
        client.execute()
    except CellExecutionError as exc:
        error = str(exc).strip().splitlines()[-1][:300]
    seconds = time.perf_counter() - start
    return {"chapter": path.parent.name, "seconds": round(seconds, 2), "ok": error is None, "error": error,
            "within_budget": seconds <= BUDGET_S}


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "notebook_threads": int(os.environ.get("COURSE_THREADS", "1")),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def markdown(rows: list[dict], info: dict) -> str:
    lines = [f"# Solution notebooks: execution time",
             "",
             f"Machine: {info['cpu_count']} cores ({info['processor']}), torch {info['torch']}, "
             f"{info['notebook_threads']} torch thread(s) per notebook, GPU: {info['cuda'] or 'none'}; {info['date']}.",
             f"Budget: {BUDGET_S:.0f} s per chapter.",
             "",
             "| chapter | seconds | status |",
             "|---|---:|---|"]
    for r in rows:
        status = "ok" if r["ok"] else f"FAILED: {r['error']}"
        if r["ok"] and not r["within_budget"]:
            status = "over budget"
        lines.append(f"| {r['chapter']} | {r['seconds']:.1f} | {status} |")
    lines.append(f"| **total** | **{sum(r['seconds'] for r in rows):.1f}** | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chapters", nargs="*")
    args = parser.parse_args(argv)
    rows = []
    for path in chapters(args.chapters):
        row = run_one(path)
        print(f"{row['chapter']:<32} {row['seconds']:7.1f} s  {'ok' if row['ok'] else 'FAILED'}", flush=True)
        rows.append(row)
    info = machine()
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if not args.chapters else "_partial"
    (RESULTS / f"notebooks{suffix}.json").write_text(json.dumps({"machine": info, "budget_s": BUDGET_S,
                                                                 "notebooks": rows}, indent=2) + "\n")
    (RESULTS / f"notebooks{suffix}.md").write_text(markdown(rows, info))
    print(markdown(rows, info))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
