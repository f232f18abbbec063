"""Checks declared as data, run in two separable steps.

A :class:`Check` says, for one graded exercise:

* which seeded input cases to try (visible ones run in the test cell, hidden ones only when grading),
* how to call an implementation on a case (``call``) and what the right answer is (``reference``,
  a real library wherever one exists),
* how outputs are compared (a :class:`Tolerance` with the reason for its size),
* which classic mistakes to recognise (:class:`Mistake`: a wrong implementation and the hint to give
  when the student's output matches it).

Grading is split in two steps that can run in different processes:

1. :func:`produce` calls the student's implementation on the inputs and returns plain numpy arrays
   (or the error it raised) -- this step runs untrusted code;
2. :func:`judge` rebuilds the same inputs from the seed, computes the reference and the mistakes, and
   compares -- this step never touches student code.

In a notebook both steps run in the kernel through :meth:`CheckSet.check`.
"""

from __future__ import annotations

import secrets
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

Inputs = dict[str, Any]


class CheckFailed(AssertionError):
    """A graded check found a wrong answer; the message says what is wrong."""


@dataclass(frozen=True)
class Case:
    """One input case. ``make_inputs`` builds the inputs from a seeded torch generator."""

    name: str
    make_inputs: Callable[[torch.Generator], Inputs]
    hidden: bool = False


@dataclass(frozen=True)
class Tolerance:
    """Element-wise ``|got - expected| <= atol + rtol * |expected|``, and why these sizes."""

    atol: float
    rtol: float
    reason: str

    def describe(self) -> str:
        return f"atol={self.atol:g}, rtol={self.rtol:g} ({self.reason})"


EXACT = Tolerance(0.0, 0.0, "integer or boolean results must match exactly")


@dataclass(frozen=True)
class Mistake:
    """A plausible wrong implementation and the hint to show when the student's output matches it."""

    name: str
    impl: Any
    hint: str


@dataclass(frozen=True)
class Check:
    name: str
    cases: tuple[Case, ...]
    reference: Callable[[Inputs], Any]
    tolerance: Tolerance
    call: Callable[[Any, Inputs], Any] = field(default=lambda impl, inputs: impl(**inputs))
    mistakes: tuple[Mistake, ...] = ()
    output_names: tuple[str, ...] = ("output",)
    describe_inputs: Callable[[Inputs], str] | None = None

    def __post_init__(self) -> None:
        names = [c.name for c in self.cases]
        if len(set(names)) != len(names):
            raise ValueError(f"check {self.name!r}: case names must be unique, got {names}")
        if not any(not c.hidden for c in self.cases):
            raise ValueError(f"check {self.name!r} needs at least one visible case")

    def select(self, hidden: bool | None) -> tuple[Case, ...]:
        """Visible cases (``hidden=False``), hidden ones (``True``) or all (``None``)."""
        return tuple(c for c in self.cases if hidden is None or c.hidden == hidden)


# ---------------------------------------------------------------------------------------------
# Step 1: produce outputs (runs student code)


@dataclass(frozen=True)
class Produced:
    """What an implementation gave on one case: arrays, or the error it raised."""

    arrays: tuple[np.ndarray, ...] | None
    error: str | None = None


def make_inputs(case: Case, seed: int) -> Inputs:
    # Each case gets its own stream so that adding a case never changes another case's inputs.
    generator = torch.Generator().manual_seed((seed * 1_000_003 + _stable_hash(case.name)) % 2**63)
    return case.make_inputs(generator)


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode())


def to_arrays(value: Any, n_outputs: int) -> tuple[np.ndarray, ...]:
    """Turn an implementation's return value into plain numpy arrays (detached, on the CPU)."""
    items = value if n_outputs > 1 else (value,)
    if n_outputs > 1 and not isinstance(value, (tuple, list)):
        raise TypeError(f"expected a tuple of {n_outputs} results, got a {type(value).__name__}")
    if len(items) != n_outputs:
        raise TypeError(f"expected {n_outputs} results, got {len(items)}")
    arrays = []
    for item in items:
        if isinstance(item, torch.Tensor):
            # Plain tensor data only: a subclass's overridden methods are not consulted.
            with torch._C.DisableTorchFunctionSubclass():
                data = item.detach().cpu()
                if data.dtype in (torch.bfloat16, torch.float16):
                    data = data.float()
                arrays.append(np.array(data.numpy(), copy=True))
        elif isinstance(item, np.ndarray):
            arrays.append(np.array(item, copy=True))
        elif isinstance(item, (bool, int, float, np.number)):
            arrays.append(np.array(item))
        else:
            raise TypeError(f"expected a tensor or a number, got a {type(item).__name__}")
    return tuple(arrays)


def produce(check: Check, impl: Any, seed: int, hidden: bool | None) -> dict[str, Produced]:
    """Run ``impl`` on every selected case; never raises for the implementation's own errors."""
    results: dict[str, Produced] = {}
    for case in check.select(hidden):
        inputs = make_inputs(case, seed)
        try:
            with torch.no_grad():
                value = check.call(impl, inputs)
            results[case.name] = Produced(to_arrays(value, len(check.output_names)))
        except NotImplementedError:
            results[case.name] = Produced(None, "NotImplementedError: the exercise is not implemented yet")
        except Exception as exc:  # the student's error is a result to report, not a crash
            results[case.name] = Produced(None, f"{type(exc).__name__}: {exc}")
    return results


# ---------------------------------------------------------------------------------------------
# Step 2: judge outputs (never runs student code)


@dataclass(frozen=True)
class CaseResult:
    case: str
    passed: bool
    message: str


@dataclass(frozen=True)
class Report:
    check: str
    seed: int
    results: tuple[CaseResult, ...]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if not r.passed]

    def summary(self) -> str:
        n = len(self.results)
        if self.passed:
            return f"PASS {self.check}: all {n} case(s) correct"
        lines = [f"FAIL {self.check}: {len(self.failures())} of {n} case(s) wrong (seed {self.seed})"]
        lines += [f"- {r.message}" for r in self.failures()]
        return "\n".join(lines)


def _shape(a: np.ndarray) -> str:
    return "(" + ", ".join(str(s) for s in a.shape) + ")" if a.ndim else "scalar"


def _describe_inputs(check: Check, inputs: Inputs) -> str:
    if check.describe_inputs is not None:
        return check.describe_inputs(inputs)
    parts = []
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            parts.append(f"{key}: {tuple(value.shape)}")
        elif isinstance(value, (int, float, bool, str)) or value is None:
            parts.append(f"{key}={value!r}")
    return ", ".join(parts)


def _close(got: np.ndarray, expected: np.ndarray, tol: Tolerance) -> bool:
    if got.shape != expected.shape:
        return False
    g = got.astype(np.float64)
    e = expected.astype(np.float64)
    if not np.array_equal(np.isnan(g), np.isnan(e)):
        return False
    finite = ~np.isnan(e)
    g, e = g[finite], e[finite]
    if not np.array_equal(np.isinf(g), np.isinf(e)) or not np.array_equal(g[np.isinf(e)], e[np.isinf(e)]):
        return False
    ok = np.isfinite(e)
    return bool(np.all(np.abs(g[ok] - e[ok]) <= tol.atol + tol.rtol * np.abs(e[ok])))


def _compare(name: str, got: np.ndarray, expected: np.ndarray, tol: Tolerance) -> str | None:
    """``None`` when equal within tolerance, else what is wrong."""
    if got.shape != expected.shape:
        hint = ""
        if got.ndim == expected.ndim and sorted(got.shape) == sorted(expected.shape):
            hint = " (the same sizes in another order: a transposed result or a wrong axis?)"
        return f"{name} has shape {_shape(got)}, expected {_shape(expected)}{hint}"
    if got.dtype.kind not in "biufc":
        return f"{name} has dtype {got.dtype}, expected numbers"
    g = got.astype(np.float64)
    e = expected.astype(np.float64)
    bad_nan = np.isnan(g) & ~np.isnan(e)
    if bad_nan.any():
        where = tuple(int(i) for i in np.argwhere(bad_nan)[0])
        return (f"{name} contains NaN at index {where} where a number was expected "
                f"({int(bad_nan.sum())} NaN value(s)): overflow or 0/0 -- e.g. exp() of large values "
                f"without subtracting the maximum first, or a row that is masked out entirely")
    if _close(got, expected, tol):
        return None
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(g) & np.isfinite(e)
        diff = np.abs(np.where(finite, g - e, 0.0))
        diff = np.where(finite | (g == e), diff, np.inf)  # a mismatched infinity is the worst error
    diff = np.nan_to_num(diff, nan=np.inf, posinf=np.inf)
    idx = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.ndim else ()
    where = tuple(int(i) for i in idx)
    size = "an infinite mismatch" if np.isinf(diff[idx]) else f"largest error {float(diff[idx]):.3g}"
    return (f"{name} values differ: {size} at index {where} "
            f"(got {float(g[idx]):.6g}, expected {float(e[idx]):.6g}); tolerance {tol.describe()}")


def judge(check: Check, produced: Mapping[str, Produced], seed: int, hidden: bool | None) -> Report:
    """Compare produced outputs with the reference on the same seeded inputs."""
    results = []
    for case in check.select(hidden):
        inputs = make_inputs(case, seed)
        label = f"case '{case.name}' [{_describe_inputs(check, inputs)}]"
        got = produced.get(case.name)
        if got is None:
            results.append(CaseResult(case.name, False, f"{label}: no output was produced"))
            continue
        if got.error is not None:
            results.append(CaseResult(case.name, False, f"{label}: raised {got.error}"))
            continue
        with torch.no_grad():
            expected = to_arrays(check.reference(make_copy(inputs)), len(check.output_names))
        if got.arrays is None or len(got.arrays) != len(expected):
            results.append(CaseResult(case.name, False, f"{label}: expected {len(expected)} result(s)"))
            continue
        problems = [p for p in (_compare(n, g, e, check.tolerance)
                                for n, g, e in zip(check.output_names, got.arrays, expected)) if p]
        if not problems:
            results.append(CaseResult(case.name, True, f"{label}: correct"))
            continue
        message = f"{label}: " + "; ".join(problems)
        hint = _matching_mistake(check, inputs, got.arrays)
        if hint:
            message += f"\n  Hint: {hint}"
        results.append(CaseResult(case.name, False, message))
    return Report(check.name, seed, tuple(results))


def _matching_mistake(check: Check, inputs: Inputs, got: Sequence[np.ndarray]) -> str | None:
    for mistake in check.mistakes:
        try:
            with torch.no_grad():
                wrong = to_arrays(check.call(mistake.impl, make_copy(inputs)), len(check.output_names))
        except Exception:
            continue
        if len(wrong) == len(got) and all(_close(g, w, check.tolerance) for g, w in zip(got, wrong)):
            return mistake.hint
    return None


def make_copy(inputs: Inputs) -> Inputs:
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def evaluate(check: Check, impl: Any, seed: int | None = None, hidden: bool | None = None) -> Report:
    """Both steps in this process (notebooks and the test suite)."""
    seed = fresh_seed() if seed is None else seed
    return judge(check, produce(check, impl, seed, hidden), seed, hidden)


def fresh_seed() -> int:
    return secrets.randbelow(2**31)


# ---------------------------------------------------------------------------------------------
# What a chapter module exposes to its notebook


class CheckSet:
    """The graded checks of one chapter, looked up by exercise name."""

    def __init__(self, chapter: str, checks: Sequence[Check]):
        self.chapter = chapter
        self.checks = {c.name: c for c in checks}
        if len(self.checks) != len(checks):
            raise ValueError(f"chapter {chapter!r}: two checks share a name")

    def __getitem__(self, name: str) -> Check:
        try:
            return self.checks[name]
        except KeyError:
            raise KeyError(f"chapter {self.chapter!r} has no check {name!r}; "
                           f"it has: {', '.join(self.checks)}") from None

    def __iter__(self):
        return iter(self.checks.values())

    def check(self, name: str, impl: Any, *, hidden: bool = False, seed: int | None = None) -> None:
        """Run the visible (or hidden) cases of one exercise; raise :class:`CheckFailed` if any is wrong.

        Visible cases use seed 0 so a student sees the same numbers every run; hidden cases use a
        fresh seed each run (printed on failure, so a failure can be reproduced).
        """
        check = self[name]
        if seed is None:
            seed = fresh_seed() if hidden else 0
        report = evaluate(check, impl, seed=seed, hidden=hidden)
        if not report.passed:
            # Raised from None: the student needs the message, not the grader's stack.
            raise CheckFailed(report.summary()) from None
        kind = "hidden" if hidden else "visible"
        # Returns nothing, so a notebook cell shows only this line (use `evaluate` for the report).
        print(f"PASS {name}: {len(report.results)} {kind} case(s) correct")


def randn(generator: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    """Standard-normal test data (float32) from a case's generator."""
    return torch.randn(*shape, generator=generator) * scale
