"""Peak memory of one call, measured in a fresh process.

Why a fresh process: a process's peak resident memory only ever grows, and ``ru_maxrss`` is inherited
across ``fork`` and ``exec``, so asking "how much memory did this call need?" inside a notebook that
has already done other work gives the peak of everything so far. Here every measurement gets a new
process (forked from a small server that has imported torch and nothing else), which

1. runs ``setup`` (imports, function definitions, allocation of the inputs) and an optional
   ``warmup`` (e.g. the same call on tiny inputs, so that libraries allocate their lazy buffers),
2. resets the kernel's high-water mark of resident memory (writing ``5`` to ``/proc/self/clear_refs``
   sets ``VmHWM`` back to the current ``VmRSS``) and reads it: the *baseline*,
3. runs ``stmt`` once and reads ``VmHWM`` again: the *peak*.

``extra = peak - baseline`` is the memory the call needed on top of its inputs, including its output
if ``stmt`` keeps it (``out = f(x)``). On a CUDA device the same steps use
``torch.cuda.reset_peak_memory_stats`` and ``torch.cuda.max_memory_allocated`` instead.

Functions defined in a notebook cannot be imported by another process, so they travel as source code:
pass them in ``functions=`` (their source is taken with :mod:`inspect`, classes defined in a notebook
included) or write them into ``setup``.
"""

from __future__ import annotations

import ast
import atexit
import gc
import inspect
import json
import linecache
import os
import select
import signal
import subprocess
import sys
import textwrap
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class PeakMemory:
    """Memory of one call: resident (or allocated, on a GPU) before it, and the peak during it."""

    baseline: int
    peak: int
    device: str

    @property
    def extra(self) -> int:
        """Bytes needed on top of what was resident before the call (never negative)."""
        return max(0, self.peak - self.baseline)

    def __str__(self) -> str:
        return (f"peak extra memory {format_bytes(self.extra)} on {self.device} "
                f"(baseline {format_bytes(self.baseline)}, peak {format_bytes(self.peak)})")


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------
# Source code of functions and classes (to define them again in the fresh process)


def source_of(obj: Any) -> str:
    """The source code of a function or class, also when it was defined in a notebook cell."""
    if not (inspect.isfunction(obj) or inspect.isclass(obj)):
        raise TypeError(f"source_of expects a function or a class, got {type(obj).__name__} {obj!r}")
    try:
        return textwrap.dedent(inspect.getsource(obj))
    except (OSError, TypeError):
        if not inspect.isclass(obj):
            raise
    # Python 3.11 cannot find a class defined in a notebook cell (its module has no file); its methods
    # still know their cell, so we look the class up there.
    for member in vars(obj).values():
        func = getattr(member, "__func__", member)
        code = getattr(func, "__code__", None)
        if code is None:
            continue
        lines = linecache.getlines(code.co_filename)
        if not lines:
            continue
        tree = ast.parse("".join(lines))
        for node in ast.walk(tree):
            if (isinstance(node, ast.ClassDef) and node.name == obj.__name__
                    and node.lineno <= code.co_firstlineno <= node.end_lineno):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                return textwrap.dedent("".join(lines[start - 1:node.end_lineno]))
    raise OSError(f"could not find the source code of class {obj.__name__}: define it in a file or a "
                  f"notebook cell, or put its source into `setup`")


# ---------------------------------------------------------------------------------------------
# The measuring process


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB (KiB)
    raise RuntimeError(f"/proc/self/status has no {key} line: peak memory needs Linux")


def _reset_high_water_mark() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _measure(job: dict) -> dict:
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    namespace: dict = {"__name__": "__measured__", "device": device}
    exec(compile(job["setup"], "<setup>", "exec"), namespace)
    if job["warmup"]:
        exec(compile(job["warmup"], "<warmup>", "exec"), namespace)
    stmt = compile(job["stmt"], "<stmt>", "exec")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        exec(stmt, namespace)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        _reset_high_water_mark()
        baseline = _status_bytes("VmHWM")
        exec(stmt, namespace)
        peak = _status_bytes("VmHWM")
    return {"baseline": baseline, "peak": peak}


def _run_job(job: dict) -> dict:
    try:
        return {"ok": _measure(job)}
    except BaseException as exc:  # every failure goes back to the caller, which raises it again
        return {"error": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}


def _serve() -> None:
    """The server: reads one job per line on stdin, forks a fresh child for it, answers on stdout.

    It has imported torch but never runs a torch operation, so no thread pool exists when it forks.
    """
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stray prints must not corrupt the answers
    for line in sys.stdin:
        job = json.loads(line)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the fresh process
            os.close(read_end)
            with os.fdopen(write_end, "w") as out:
                out.write(json.dumps(_run_job(job)))
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end) as answer:
            text = answer.read()
        _, status = os.waitpid(pid, 0)
        if not text:
            code = os.waitstatus_to_exitcode(status)
            text = json.dumps({"error": "ChildProcessError", "traceback": "",
                               "message": f"the measuring process died (exit code {code}); a negative "
                                          f"code is a signal, e.g. -9 when it ran out of memory"})
        protocol.write(text + "\n")
        protocol.flush()


class _Server:
    """One long-lived server per process, started on first use."""

    process: subprocess.Popen | None = None
    registered = False

    @classmethod
    def start(cls) -> None:
        if cls.process is None or cls.process.poll() is not None:
            root = str(Path(__file__).resolve().parents[1])
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
            cls.process = subprocess.Popen(
                [sys.executable, "-c", "import torch, coursekit.memory as m; m._serve()"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                env=env, start_new_session=True)
            if not cls.registered:
                atexit.register(cls.stop)
                cls.registered = True

    @classmethod
    def ask(cls, job: dict, timeout: float) -> dict:
        cls.start()
        process = cls.process
        process.stdin.write(json.dumps(job) + "\n")
        process.stdin.flush()
        ready, _, _ = select.select([process.stdout], [], [], timeout)
        if not ready:
            cls.stop()
            raise TimeoutError(f"the measurement did not finish within {timeout:g} s")
        line = process.stdout.readline()
        if not line:
            cls.stop()
            raise RuntimeError("the memory-measuring server stopped unexpectedly")
        return json.loads(line)

    @classmethod
    def stop(cls) -> None:
        process, cls.process = cls.process, None
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the server and a child it may be waiting for
            process.wait()


def start_server() -> None:
    """Start the measuring server now, without waiting: it imports torch while other work goes on."""
    _Server.start()


def peak_memory(stmt: str, setup: str = "", *, functions: Sequence[Any] = (), warmup: str | None = None,
                threads: int | None = None, device: str | torch.device = "cpu",
                timeout: float = 600.0) -> PeakMemory:
    """Run ``setup`` and then ``stmt`` once in a fresh process; return the memory ``stmt`` needed.

    ``functions`` are functions or classes whose source is defined (in order) before ``setup``;
    ``warmup`` runs after ``setup`` and before the baseline is taken; the names ``torch`` and
    ``device`` are available. ``threads`` defaults to this process's torch thread count.
    Errors raised by the measured code are raised here again (``NotImplementedError`` as itself).
    """
    for name, value in (("stmt", stmt), ("setup", setup)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be Python source code as a string, got {type(value).__name__}")
    if warmup is not None and not isinstance(warmup, str):
        raise TypeError(f"warmup must be source code as a string or None, got {type(warmup).__name__}")
    if not stmt.strip():
        raise ValueError("stmt is empty: give the statement to measure, e.g. 'out = f(x)'")
    threads = torch.get_num_threads() if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"peak_memory measures cpu or cuda devices, got {device}")
    sources = [source_of(obj) for obj in functions]
    job = {"stmt": stmt, "setup": "import torch\n" + "\n\n".join(sources + [setup]),
           "warmup": warmup, "threads": threads, "device": str(device)}

    result = _Server.ask(job, timeout)
    if "error" in result:
        if result["error"] == "NotImplementedError":
            raise NotImplementedError(result["message"])
        raise RuntimeError(f"the measured code raised {result['error']}: {result['message']}\n"
                           f"--- traceback in the measuring process ---\n{result['traceback']}")
    return PeakMemory(result["ok"]["baseline"], result["ok"]["peak"], str(device))
