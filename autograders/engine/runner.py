"""The program that runs inside the grading sandbox (see :mod:`autograders.engine.sandbox`).

    python -I -m autograders.engine.runner /job/job.json OUT_FD IN_FD

It lowers its own resource limits (the sandboxed user cannot raise them again), then executes the
student's code cells one by one in an IPython shell and, right after each exercise's solution cell,
calls :func:`autograders.engine.core.produce` with that exercise's :class:`~autograders.engine.core.Task`
from the chapter's harness module -- the only chapter code in here: inputs and calls, no reference.

Everything goes to the grader as frames on the pipe ``OUT_FD`` (:mod:`autograders.engine.protocol`):
progress steps, each exercise's outputs (``.npy`` bytes), and calls of *given* functions (earlier
exercises that this one uses), which the grader answers on ``IN_FD`` from its own process. The student
can write to the same pipe; the grader treats every frame as a claim: it judges outputs against its own
reference, takes the first record per exercise, and answers a given function only after the exercise
it belongs to has been handed in.
"""

from __future__ import annotations

import io
import json
import os
import resource
import signal
import sys

LOG_CAP = 256 * 1024  # characters of the student's printed output kept (the rest is dropped)


class _Sink(io.TextIOBase):
    """Where the student's prints go: the first ``cap`` characters to a file descriptor, the rest nowhere."""

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


def main(job_path: str, out_fd: int, in_fd: int) -> None:
    with open(job_path) as f:
        job = json.load(f)
    _limit(job["limits"])
    from autograders.engine import protocol

    send = protocol.write_frame

    def mark(step: str) -> None:
        send(out_fd, {"t": "step", "step": step})

    mark("start")
    import importlib

    import torch

    torch.set_num_threads(1)
    from IPython.core.interactiveshell import InteractiveShell

    from autograders.engine import core

    produce, encode_array = core.produce, core.encode_array
    harness = {m: importlib.import_module(m) for m in job["modules"]}
    reader = protocol.FrameReader(in_fd)

    def given_function(name: str):
        def call(*args, **kwargs):
            blobs: list[bytes] = []
            tree = protocol.encode_value((tuple(args), tuple(sorted(kwargs.items()))), blobs)
            send(out_fd, {"t": "call", "name": name, "value": tree}, blobs)
            header, rblobs = reader.read()
            if header.get("error"):
                raise RuntimeError(f"the given {name} could not be computed: {header['error']}")
            return protocol.decode_value(header["value"], rblobs)
        call.__name__ = name
        return call

    sink = _Sink(2, LOG_CAP)
    sys.stdout = sink
    sys.stderr = sink
    shell = InteractiveShell.instance(colors="nocolor")
    shell.display_pub.publish = lambda *a, **k: None  # rich outputs are not kept
    import builtins

    builtin_names = vars(builtins)
    pristine = dict(builtin_names)  # a student's patched builtins must not break the engine's own code
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
            name = exercise["exercise"]
            builtin_names.update(pristine)  # restore what was replaced (names a student added stay)
            mark(f"produce {name}")
            record, blobs = {}, []
            for item in exercise["checks"]:
                task = harness["autograders.harness." + item["module"].rsplit(".", 1)[-1]].TASKS[item["check"]]
                if item["impl"] not in shell.user_ns:
                    record[item["check"]] = {"missing": f"name '{item['impl']}' is not defined"}
                    continue
                impl = shell.user_ns[item["impl"]]
                given = {n: given_function(n) for n in task.uses}
                try:
                    produced = produce(task, impl, job["seed"], None, given=given, namespace=shell.user_ns)
                except BaseException as exc:  # noqa: BLE001
                    record[item["check"]] = {"missing": f"{type(exc).__name__} while running it"}
                    continue
                cases = {}
                for case, result in produced.items():
                    entry = {"error": None if result.error is None else str(result.error)[:2000],
                             "kind": result.kind, "arrays": []}
                    if result.error is None and result.arrays is not None:
                        for value in result.arrays:
                            blobs.append(encode_array(value))
                            entry["arrays"].append(len(blobs) - 1)
                    cases[str(case)] = entry
                record[item["check"]] = {"cases": cases}
            send(out_fd, {"t": "record", "exercise": name, "checks": record}, blobs)
            mark(f"done {name}")
    mark("end")
    os._exit(0)  # student threads or atexit hooks do not get to run after this


if __name__ == "__main__":
    args = sys.argv[-3:]  # run as -m or through runpy from -c
    main(args[0], int(args[1]), int(args[2]))
