"""Sandboxed grading of a class vs executing the same notebooks once, sequentially.

    python benchmarks/grading.py [--students 50] [--chapter 01_self_attention] [--workers 2]

Generates a class of submissions of chapter 01 (mixed: correct, wrong answers, untouched stubs and
broken ones -- a crash, os._exit, an empty file, invalid JSON), grades them with
``autograders.engine.grade`` (sandboxed, ``--workers`` in parallel), then executes the same notebooks one
after the other with nbclient (all cells, errors allowed, as ``nbgrader autograde`` would) for the
baseline. Target: grading the class takes <= 2x the sequential execution.
Writes benchmarks/results/grading.json and grading.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
RESULTS = ROOT / "benchmarks" / "results"

import grading_corpus as gc  # noqa: E402

from autograders.engine import grade  # noqa: E402
from autograders.engine.sandbox import Limits  # noqa: E402

MIX = ["correct", "correct", "wrong_answer", "correct", "untouched_stub", "stderr_noise_correct", "correct",
       "segfault", "wrong_answer", "os_exit_in_answer", "correct", "empty_file", "correct", "invalid_json",
       "patch_torch_allclose", "correct", "stripped_metadata_correct", "deleted_test_cells", "correct", "untouched_stub"]


def make_class(folder: Path, n: int) -> list[str]:
    kinds = {k.name: k for k in gc.corpus("/nonexistent/gradebook.db", "/nonexistent/file")}
    names = []
    for i in range(n):
        kind = kinds[MIX[i % len(MIX)]]
        student = f"s{i:03d}_{kind.name}"
        path = folder / f"{student}.ipynb"
        if kind.raw is not None:
            path.write_bytes(kind.raw)
        else:
            nbformat.write(kind.notebook, path)
        names.append(student)
    return names


def execute_sequentially(folder: Path) -> tuple[float, int]:
    from nbclient import NotebookClient

    start = time.perf_counter()
    executed = 0
    for path in sorted(folder.glob("*.ipynb")):
        try:
            nb = nbformat.read(path, as_version=4)
        except Exception:  # noqa: BLE001 - nothing to execute
            continue
        client = NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=True,
                                resources={"metadata": {"path": str(ROOT / "chapters" / gc.CHAPTER)}})
        try:
            client.execute()
        except Exception:  # noqa: BLE001 - a dead kernel (os._exit, segfault) ends that notebook
            pass
        executed += 1
    return time.perf_counter() - start, executed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--students", type=int, default=50)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--chapter", default=gc.CHAPTER)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="grading-bench-") as tmp:
        tmp = Path(tmp)
        subs = tmp / "submissions"
        subs.mkdir()
        make_class(subs, args.students)
        grader = grade.Grader(args.chapter, course_dir=tmp, source_dir=ROOT / "solutions",
                              release_dir=ROOT / "chapters", workers=args.workers,
                              db_url=f"sqlite:///{tmp / 'gradebook.db'}", out=tmp / "out", limits=Limits())
        start = time.perf_counter()
        results = grader.run(subs)
        grading_s = time.perf_counter() - start
        scores = {r.student: r.score for r in results}
        sequential_s, executed = execute_sequentially(subs)
    ratio = grading_s / sequential_s if sequential_s else float("inf")
    info = {"cpu_count": os.cpu_count(), "python": platform.python_version(),
            "load_average_1min": round(os.getloadavg()[0], 2),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    out = {"chapter": args.chapter, "students": args.students, "workers": args.workers, "sandbox": grader.sandbox.mode,
           "grading_seconds": round(grading_s, 1), "sequential_execution_seconds": round(sequential_s, 1),
           "notebooks_executed": executed, "ratio": round(ratio, 2), "target_ratio": 2.0, "met": ratio <= 2.0,
           "machine": info, "scores": scores}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "grading.json").write_text(json.dumps(out, indent=1) + "\n")
    md = [f"# Grading a class of {args.students} ({args.chapter})", "",
          f"Machine: {info['cpu_count']} cores, load average {info['load_average_1min']} at the end; {info['date']}. "
          f"Sandbox: {grader.sandbox.mode}.", "",
          "| what | seconds |", "|---|---:|",
          f"| sandboxed grading, {args.workers} workers (generation of the gradebook, feedback, reports included) "
          f"| {grading_s:.1f} |",
          f"| executing the {executed} readable notebooks once, sequentially (nbclient, errors allowed) | {sequential_s:.1f} |",
          f"| **ratio** (target <= 2) | **{ratio:.2f}** |", ""]
    (RESULTS / "grading.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
