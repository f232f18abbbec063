"""Choose the device and the CPU thread count on purpose, seed everything, and say what was chosen.

On a busy 2-core machine two OpenMP threads made loops of small operations 10-90x slower than one
thread, while large matrix products gained at most 2x. The course therefore runs on one CPU thread
unless ``COURSE_THREADS`` (or the ``threads`` argument) says otherwise.
"""

from __future__ import annotations

import os
import platform
import random
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_THREADS = 1


@dataclass(frozen=True)
class RuntimeInfo:
    device: torch.device
    threads: int
    torch_version: str
    cpu_count: int
    device_name: str

    def __str__(self) -> str:
        return (
            f"device={self.device} ({self.device_name}) | torch threads={self.threads} "
            f"of {self.cpu_count} cores | torch {self.torch_version}"
        )


def _threads_from_env(threads: int | None) -> int:
    if threads is not None:
        value = threads
    else:
        raw = os.environ.get("COURSE_THREADS", str(DEFAULT_THREADS))
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"COURSE_THREADS must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"the thread count must be at least 1, got {value}")
    return value


def pick_device(prefer: str | None = None) -> torch.device:
    """The GPU when one is present (or ``COURSE_DEVICE``/``prefer`` names a device), else the CPU."""
    name = prefer or os.environ.get("COURSE_DEVICE")
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} was asked for, but CUDA is not available here")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe(device: torch.device | None = None) -> RuntimeInfo:
    device = device or pick_device()
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    return RuntimeInfo(
        device=device,
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        cpu_count=os.cpu_count() or 1,
        device_name=device_name,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(seed: int = 0, threads: int | None = None, device: str | None = None,
          quiet: bool = False) -> RuntimeInfo:
    """Seed, fix the thread count, pick the device; print (and return) what was chosen."""
    n = _threads_from_env(threads)
    torch.set_num_threads(n)
    # numpy's and scipy's BLAS (FID's eigh, sklearn) keep to the same count: on a shared machine extra
    # BLAS threads made FID's eigh 3x slower.
    # The variables cover libraries loaded later (scipy's own OpenBLAS), threadpoolctl those loaded now.
    from threadpoolctl import threadpool_limits

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    threadpool_limits(limits=n)
    # Tiny (denormal) floats make some CPU kernels several times slower (seen in GELU's backward);
    # flushing them to zero changes nothing the course measures.
    torch.set_flush_denormal(True)
    seed_everything(seed)
    info = describe(pick_device(device))
    if not quiet:
        print(info)
    return info
