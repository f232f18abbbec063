"""The program that runs inside the grading sandbox (see :mod:`autograders.engine.sandbox`).

    python -I -m autograders.engine.runner /scratch/job.json

It is trusted code that runs untrusted code: it first lowers its own resource limits (the sandboxed
user cannot raise them again), then executes the student's code cells one by one in an IPython shell
and, at each checkpoint the grader placed after an exercise's solution cell, calls
:func:`autograders.engine.core.produce` on the object the student defined. Outputs leave the sandbox only as
``.npz`` files of plain numeric arrays plus JSON (never pickle); the grader judges them in its own
process. Progress goes to ``progress`` one line per step (``cell <i>``, ``produce <exercise>``,
``done <exercise>``, ``end``) so that the grader, which watches from outside, knows which step a
crash or a hang happened in. Everything the student can write is treated by the grader as untrusted.
"""

from __future__ import annotations

import io
import json
import os
import resource
import signal
import sys

LOG_CAP = 256 * 1024  # characters of the student's printed output kept (the rest is dropped)


class _CappedText(io.TextIOBase):
    """A text stream that keeps the first ``cap`` characters and drops the rest (output floods)."""

    def __init__(self, fd: int, cap: int):
        self._fd = fd
        self._left = cap

    def writable(self) -> bool:
        return True

    def write(self, text) -> int:
        text = str(text)
        if self._left > 0:
            chunk = text[: self._left]
            self._left -= len(chunk)
            try:
                os.write(self._fd, chunk.encode("utf-8", "replace"))
            except OSError:
                self._left = 0
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:
        return "utf-8"


def _limit(limits: dict) -> None:
    def set_limit(kind, value):
        if value is None:
            return
        try:
            resource.setrlimit(kind, (int(value), int(value)))
        except (ValueError, OSError):
            pass

    set_limit(resource.RLIMIT_CORE, 0)
    set_limit(resource.RLIMIT_CPU, limits.get("cpu_s"))
    set_limit(resource.RLIMIT_AS, limits.get("memory_bytes"))
    set_limit(resource.RLIMIT_FSIZE, limits.get("file_bytes"))
    set_limit(resource.RLIMIT_NOFILE, limits.get("open_files"))
    if limits.get("nproc") and os.getuid() != 0:  # not enforced for root; the sandbox drops root first
        set_limit(resource.RLIMIT_NPROC, limits["nproc"])
    # A write past the file-size limit fails with EFBIG instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def main(job_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    _limit(job["limits"])
    out = job["out"]
    progress = open(os.path.join(out, "progress"), "a", buffering=1)

    def mark(line: str) -> None:
        progress.write(line + "\n")
        progress.flush()

    mark("start")
    import importlib

    import numpy as np
    import torch

    torch.set_num_threads(1)
    from IPython.core.interactiveshell import InteractiveShell

    from autograders import core

    produce = core.produce  # the student may rebind core.produce; outputs are judged outside anyway
    modules = {m: importlib.import_module(m) for m in job["modules"]}

    log_fd = os.open(os.path.join(out, "student.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    sys.stdout = _CappedText(log_fd, LOG_CAP)
    sys.stderr = _CappedText(log_fd, LOG_CAP)
    shell = InteractiveShell.instance(colors="nocolor")
    shell.display_pub.publish = lambda *a, **k: None  # rich outputs are not kept
    mark("ready")

    checkpoints = {int(k): v for k, v in job["checkpoints"].items()}
    for cell in job["cells"]:
        index = cell["index"]
        mark(f"cell {index}")
        try:
            shell.run_cell(cell["source"], store_history=False, silent=False)
        except BaseException:  # noqa: BLE001 - SystemExit, KeyboardInterrupt from student code
            pass
        for exercise in checkpoints.get(index, []):
            mark(f"produce {exercise['exercise']}")
            record = {}
            arrays = {}
            for n, item in enumerate(exercise["checks"]):
                check = modules[item["module"]].CHECKS[item["check"]]
                impl = shell.user_ns.get(item["impl"])
                if item["impl"] not in shell.user_ns:
                    record[item["check"]] = {"missing": f"name '{item['impl']}' is not defined"}
                    continue
                try:
                    produced = produce(check, impl, job["seed"], None)
                except BaseException as exc:  # noqa: BLE001
                    record[item["check"]] = {"missing": f"{type(exc).__name__} while running it"}
                    continue
                cases = {}
                for c, (case, result) in enumerate(produced.items()):
                    entry = {"error": None if result.error is None else str(result.error)[:2000], "arrays": []}
                    if result.error is None and result.arrays is not None:
                        for a, value in enumerate(result.arrays):
                            value = np.asarray(value)
                            if value.dtype.kind not in "biuf":
                                entry = {"error": f"output {a} is not numeric (dtype {value.dtype})",
                                         "arrays": []}
                                break
                            key = f"c{n}_{c}_{a}"
                            arrays[key] = value
                            entry["arrays"].append(key)
                    cases[str(case)] = entry
                record[item["check"]] = {"cases": cases}
            name = exercise["exercise"]
            np.savez(os.path.join(out, f"{name}.npz"), **arrays)
            with open(os.path.join(out, f"{name}.json"), "w") as f:
                json.dump(record, f)
            mark(f"done {name}")
    mark("end")
    progress.close()
    os._exit(0)  # student threads or atexit hooks do not get to run after this


if __name__ == "__main__":
    main(sys.argv[1])
