"""Checks declared as data, in two halves that live in different places.

A graded exercise is described twice:

* a :class:`Task` (in ``autograders/harness/<chapter>.py``) says how to build its seeded input cases,
  how to call an implementation on a case, what comes back, and the :class:`Rule`\\ s about *how* the
  answer may be computed (operators it forbids or requires). Tasks hold nothing that computes an
  answer: they are the only chapter code the grading sandbox can see;
* a :class:`Check` (in ``autograders/<chapter>.py``) adds what the right answer is (``reference``, a
  real library wherever one exists), how outputs are compared (a :class:`Tolerance` with the reason
  for its size), the classic wrong answers to recognise (:class:`Mistake`), and the ``given``
  versions of earlier exercises that this one calls (so that each exercise is graded on its own).

Grading runs in two steps that can run in different processes:

1. :func:`produce` calls the student's implementation on the inputs, watching which operators it
   uses, and returns plain numpy arrays (or the error it raised, or the rule it broke) -- this step
   runs untrusted code and needs only the :class:`Task`;
2. :func:`judge` rebuilds the same inputs from the seed, computes the reference and the mistakes,
   and compares -- this step never runs student code. Outputs that come from another process are
   untrusted bytes (:class:`Blob`): their dtype and shape are checked against the reference's
   before any of their data is read.

In a notebook both steps run in the kernel through :meth:`CheckSet.check`.
"""

from __future__ import annotations

import ast
import secrets
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

Inputs = dict[str, Any]


class CheckFailed(AssertionError):
    """A graded check found a wrong answer; the message says what is wrong."""

    def _render_traceback_(self):  # IPython shows only the message, not the grader's stack
        return [f"CheckFailed: {self}"]


# ---------------------------------------------------------------------------------------------
# Rules about how an answer is computed


@dataclass(frozen=True)
class Trace:
    """The torch functions (by name) and ATen operators an implementation called on one case."""

    functions: Counter = field(default_factory=Counter)
    ops: Counter = field(default_factory=Counter)
    calls: Counter = field(default_factory=Counter)  # forbidden Python callables, by the name the rule gives

    def count(self, *names: str) -> int:
        return sum(self.functions[n] + self.ops[n] for n in names)


@dataclass(frozen=True)
class Forbid:
    """The exercise must not call these. ``functions`` are torch API names as seen through
    ``__torch_function__`` (``torch.softmax``, ``F.softmax``, ``Tensor.softmax`` and ``nn.Softmax`` are
    all ``"softmax"``); ``ops`` are ATen operators (``"aten._softmax"``), which every route to the
    same kernel goes through, aliases and private entry points included."""

    rule: str  # as the exercise text states it
    functions: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()
    # Python functions of a library or of coursekit that would hand the answer over, as
    # "package.module:Qualified.name" (a function, a method, a class's __call__/forward). A call is seen
    # however the function was reached (an alias, a method of a subclass, an import inside the exercise,
    # a copy made with types.FunctionType or code.replace): the watch matches the code being run, by its
    # file, first line and name, not the object's identity. "*" matches any part of the name
    # ("diffusers.pipelines.*:*.get_timesteps": every pipeline's get_timesteps).
    callables: tuple[str, ...] = ()

    def broken(self, trace: Trace, inputs: Inputs) -> str | None:
        seen = ([f for f in self.functions if trace.functions[f]] + [o for o in self.ops if trace.ops[o]]
                + [c.replace(":", ".") for c in (*self.callables, _UNWATCHED) if trace.calls[c]])
        return f"it called {', '.join(seen)}" if seen else None


_UNWATCHED = "sys.setprofile (it removed the grader's call watch)"


def no_course_version(*callables: str) -> Forbid:
    """The rule every exercise with a twin in ``coursekit`` carries: the course's own version (which a
    later chapter imports) may not stand in for the student's. ``callables`` as in :class:`Forbid`."""
    names = ", ".join(c.replace(":", ".") for c in callables)
    return Forbid(f"write it yourself: the course's own {names} may not be called here", callables=callables)


def _code_key(code) -> tuple[str, int, str]:
    return (code.co_filename, code.co_firstlineno, code.co_name)


def resolve_callable(spec: str) -> list:
    """The code objects behind ``"package.module:Qualified.name"`` (a class gives its ``__call__`` and
    ``forward``). Raises ValueError if it does not name a Python function."""
    import importlib
    import inspect

    module_name, _, qualname = spec.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split(".") if qualname else ():
        obj = inspect.getattr_static(obj, part) if isinstance(obj, type) else getattr(obj, part)
    if isinstance(obj, type):  # its own __call__ / forward, not torch's or object's
        owners = [next((k for k in obj.__mro__ if m in vars(k)), object) for m in ("__call__", "forward")]
        members = [vars(k)[m] for k, m in zip(owners, ("__call__", "forward"))
                   if k is not object and not k.__module__.startswith(("torch.", "builtins"))]
    else:
        members = [obj]
    codes = []
    for member in members:
        member = getattr(member, "__func__", member)           # staticmethod, classmethod, bound method
        member = inspect.unwrap(member) if callable(member) else member
        code = getattr(member, "__code__", None)
        if code is not None:
            codes.append(code)
    if not codes:
        raise ValueError(f"{spec!r} does not name a Python function")
    return codes


class _CallWatch:
    """A profile hook (``sys.setprofile``, every thread) that counts calls into forbidden Python code."""

    def __init__(self, trace: Trace, state: dict, specs: Sequence[str]):
        self.trace, self.state = trace, state
        self.keys: dict[tuple[str, int, str], str] = {}
        self.names: dict[tuple[str, str], str] = {}
        self.patterns = [spec for spec in specs if "*" in spec]   # e.g. "diffusers.pipelines.*:*.get_timesteps"
        self.memo: dict = {}
        for spec in specs:
            if "*" in spec:
                continue
            module_name, _, qualname = spec.partition(":")
            for q in (qualname, f"{qualname}.forward", f"{qualname}.__call__"):
                self.names[(module_name, q)] = spec
            # A module not imported yet is not imported here (a library can take seconds): its code is
            # then matched by module and qualified name when it runs.
            if module_name in sys.modules:
                for code in resolve_callable(spec):
                    self.keys[_code_key(code)] = spec
        self.hook = self._hook  # one bound method, so that sys.getprofile() is it

    def _hook(self, frame, event, arg):
        if event == "call" and not self.state["paused"]:
            code = frame.f_code
            where = (code, frame.f_globals.get("__name__"))
            spec = self.memo.get(where, _MISSING)
            if spec is _MISSING:
                spec = self.memo[where] = self._match(code, where[1])
            if spec is not None:
                self.trace.calls[spec] += 1

    def _match(self, code, module_name) -> str | None:
        import fnmatch

        spec = self.keys.get(_code_key(code)) or self.names.get((module_name, code.co_qualname))
        if spec is None and isinstance(module_name, str):
            name = f"{module_name}:{code.co_qualname}"
            spec = next((p for p in self.patterns if fnmatch.fnmatchcase(name, p)), None)
        return spec

    def __enter__(self):
        import threading

        self._before = (sys.getprofile(), threading.getprofile())
        threading.setprofile(self.hook)
        sys.setprofile(self.hook)
        return self

    def __exit__(self, *exc):
        import threading

        if sys.getprofile() is not self.hook:
            self.trace.calls[_UNWATCHED] += 1
        sys.setprofile(self._before[0])
        threading.setprofile(self._before[1])


@dataclass(frozen=True)
class Require:
    """The exercise must compute its answer in a stated way; ``test`` reads the trace."""

    rule: str
    test: Callable[[Trace, Inputs], bool]
    found: Callable[[Trace, Inputs], str] | None = None  # what was seen instead, for the message

    def broken(self, trace: Trace, inputs: Inputs) -> str | None:
        if self.test(trace, inputs):
            return None
        return self.found(trace, inputs) if self.found else "it did not"


Rule = Forbid | Require


class _FunctionWatch(TorchFunctionMode):
    def __init__(self, trace: Trace, state: dict):
        super().__init__()
        self.trace, self.state = trace, state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.state["paused"]:
            self.trace.functions[getattr(func, "__name__", str(func))] += 1
        return func(*args, **(kwargs or {}))


class _OpWatch(TorchDispatchMode):
    def __init__(self, trace: Trace, state: dict):
        super().__init__()
        self.trace, self.state = trace, state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.state["paused"]:
            self.trace.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class Watch:
    """Records what an implementation calls while it computes one case (only when a rule needs it)."""

    def __init__(self, rules: Sequence[Rule]):
        self.rules = tuple(rules)
        self.trace = Trace()
        self.state = {"paused": False}
        self._stack: ExitStack | None = None

    def __enter__(self) -> Watch:
        self._stack = ExitStack()
        if self.rules:
            self._stack.enter_context(_FunctionWatch(self.trace, self.state))
            self._stack.enter_context(_OpWatch(self.trace, self.state))
        specs = [c for r in self.rules if isinstance(r, Forbid) for c in r.callables]
        if specs:
            self._stack.enter_context(_CallWatch(self.trace, self.state, specs))
        return self

    def __exit__(self, *exc) -> None:
        assert self._stack is not None
        self._stack.close()

    @contextmanager
    def paused(self):
        """Given implementations (earlier exercises) are not the student's: their calls do not count."""
        before = self.state["paused"]
        self.state["paused"] = True
        try:
            yield
        finally:
            self.state["paused"] = before

    def broken(self, inputs: Inputs) -> list[str]:
        return [f"{r.rule} -- {why}" for r in self.rules if (why := r.broken(self.trace, inputs))]


# ---------------------------------------------------------------------------------------------
# Tasks: what the sandbox may see


@dataclass(frozen=True)
class Case:
    """One input case. ``make_inputs`` builds the inputs from a seeded torch generator."""

    name: str
    make_inputs: Callable[[torch.Generator], Inputs]
    hidden: bool = False


def _default_call(impl, inputs):
    return impl(**inputs)


@dataclass(frozen=True)
class Task:
    """How to exercise one implementation: cases, the call, the outputs, the rules, and the names
    of earlier exercises whose given versions replace the student's while this one is produced."""

    name: str
    cases: tuple[Case, ...]
    call: Callable[[Any, Inputs], Any] = _default_call
    output_names: tuple[str, ...] = ("output",)
    rules: tuple[Rule, ...] = ()
    uses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = [c.name for c in self.cases]
        if len(set(names)) != len(names):
            raise ValueError(f"task {self.name!r}: case names must be unique, got {names}")
        if not any(not c.hidden for c in self.cases):
            raise ValueError(f"task {self.name!r} needs at least one visible case")

    def select(self, hidden: bool | None) -> tuple[Case, ...]:
        """Visible cases (``hidden=False``), hidden ones (``True``) or all (``None``)."""
        return tuple(c for c in self.cases if hidden is None or c.hidden == hidden)


class TaskSet:
    """A chapter's tasks (``TASKS`` in its harness module), looked up by exercise name."""

    def __init__(self, chapter: str, tasks: Sequence[Task]):
        self.chapter = chapter
        self.tasks = {t.name: t for t in tasks}
        if len(self.tasks) != len(tasks):
            raise ValueError(f"chapter {chapter!r}: two tasks share a name")

    def __getitem__(self, name: str) -> Task:
        return self.tasks[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tasks


# ---------------------------------------------------------------------------------------------
# Checks: a task plus how it is judged (never inside the sandbox)


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


class Check:
    """One graded exercise: its :class:`Task` and how its outputs are judged.

    ``Check(task, reference=..., tolerance=...)`` is the form the grader accepts (the task comes from
    the chapter's harness module); ``Check(name=..., cases=..., reference=..., ...)`` builds a task on
    the spot (fine in a notebook or a test, refused by the sandboxed grader)."""

    def __init__(self, task: Task | str | None = None, cases: Sequence[Case] | None = None,
                 reference: Callable[[Inputs], Any] | None = None, tolerance: Tolerance | None = None, *,
                 mistakes: Sequence[Mistake] = (), describe_inputs: Callable[[Inputs], str] | None = None,
                 given: Mapping[str, Callable] | None = None, name: str | None = None,
                 call: Callable | None = None, output_names: Sequence[str] | None = None,
                 rules: Sequence[Rule] = (), uses: Sequence[str] = ()):
        if isinstance(task, str):
            task, name = None, task
        if task is None:
            if name is None or cases is None:
                raise TypeError("Check needs a task, or a name and cases")
            task = Task(name, tuple(cases), call or _default_call, tuple(output_names or ("output",)),
                        tuple(rules), tuple(uses))
        if reference is None or tolerance is None:
            raise TypeError(f"check {task.name!r} needs a reference and a tolerance")
        self.task = task
        self.reference = reference
        self.tolerance = tolerance
        self.mistakes = tuple(mistakes)
        self.describe_inputs = describe_inputs
        self.given = dict(given or {})
        missing = set(task.uses) - set(self.given)
        if missing:
            raise ValueError(f"check {task.name!r} uses {sorted(missing)} but gives no implementation of them")

    name = property(lambda self: self.task.name)
    cases = property(lambda self: self.task.cases)
    call = property(lambda self: self.task.call)
    output_names = property(lambda self: self.task.output_names)
    rules = property(lambda self: self.task.rules)

    def select(self, hidden: bool | None) -> tuple[Case, ...]:
        return self.task.select(hidden)


# ---------------------------------------------------------------------------------------------
# Step 1: produce outputs (runs student code)


@dataclass(frozen=True)
class Blob:
    """An array as untrusted ``.npy`` bytes from another process: decoded only against an expectation."""

    data: bytes


@dataclass(frozen=True)
class Produced:
    """What an implementation gave on one case: arrays (or blobs), or the error it raised.
    ``kind`` is ``"error"`` (it raised) or ``"rule"`` (it broke a rule of the exercise)."""

    arrays: tuple[np.ndarray | Blob, ...] | None
    error: str | None = None
    kind: str = "error"


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
        elif type(item) is np.ndarray:
            arrays.append(np.array(item, copy=True))
        elif isinstance(item, (bool, int, float, np.number)):
            arrays.append(np.array(item))
        else:
            raise TypeError(f"expected a tensor or a number, got a {type(item).__name__}")
    for a in arrays:
        if a.dtype.kind not in "biuf":
            raise TypeError(f"expected numbers, got an array of dtype {a.dtype}")
    return tuple(arrays)


def default_namespace(impl: Any) -> dict | None:
    """Where an implementation looks up the other exercises' names: its module's globals."""
    globs = getattr(impl, "__globals__", None)
    if isinstance(globs, dict):
        return globs
    if isinstance(impl, type):  # a class: the globals its own methods see
        for value in vars(impl).values():
            globs = getattr(value, "__globals__", None)
            if isinstance(globs, dict):
                return globs
    module = sys.modules.get(getattr(impl, "__module__", "") or "")
    return getattr(module, "__dict__", None)


@contextmanager
def _swapped(namespace: dict | None, given: Mapping[str, Callable], watch: Watch):
    """Put the given versions of earlier exercises in place of the student's, then restore them."""
    saved = {}
    if namespace is not None:
        for name, impl in given.items():
            def paused(*args, _impl=impl, **kwargs):
                with watch.paused():
                    return _impl(*args, **kwargs)

            saved[name] = namespace.get(name, _MISSING)
            namespace[name] = paused
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is _MISSING:
                namespace.pop(name, None)
            else:
                namespace[name] = value


_MISSING = object()


def produce(task: Task | Check, impl: Any, seed: int, hidden: bool | None, *,
            given: Mapping[str, Callable] | None = None, namespace: dict | None = None) -> dict[str, Produced]:
    """Run ``impl`` on every selected case; never raises for the implementation's own errors.

    While it runs, the names in ``task.uses`` (in ``namespace``, by default the implementation's
    globals) are bound to ``given`` implementations, and the task's rules watch what it calls."""
    task = task.task if isinstance(task, Check) else task
    given = {n: given[n] for n in task.uses if given and n in given}
    if namespace is None:
        namespace = default_namespace(impl)
    results: dict[str, Produced] = {}
    for case in task.select(hidden):
        inputs = make_inputs(case, seed)
        try:
            watch = Watch(task.rules)
            with torch.no_grad(), _swapped(namespace, given, watch), watch:
                value = task.call(impl, inputs)
            arrays = to_arrays(value, len(task.output_names))
            broken = watch.broken(inputs)
            if broken:
                results[case.name] = Produced(None, "broke a rule of the exercise: " + "; ".join(broken), "rule")
            else:
                results[case.name] = Produced(arrays)
        except NotImplementedError:
            results[case.name] = Produced(None, "NotImplementedError: the exercise is not implemented yet")
        except Exception as exc:  # the student's error is a result to report, not a crash
            results[case.name] = Produced(None, f"{type(exc).__name__}: {exc}")
    return results


# ---------------------------------------------------------------------------------------------
# Arrays across a process boundary: plain .npy bytes, never pickle


def encode_array(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    a = np.asarray(a)
    np.lib.format.write_array(buf, np.ascontiguousarray(a).reshape(a.shape), allow_pickle=False)  # 0-d stays 0-d
    return buf.getvalue()


def decode_array(blob: Blob, expected: np.ndarray | None = None, max_bytes: int = 256 << 20) -> np.ndarray:
    """Decode untrusted ``.npy`` bytes. The header is read first; a dtype that is not a plain number,
    a shape other than ``expected``'s, or a size that does not match the bytes is refused before any
    data is touched."""
    import io

    data = blob.data
    if not isinstance(data, bytes) or len(data) > max_bytes:
        raise ValueError("the array is larger than allowed")
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=10_000)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=10_000)
    else:
        raise ValueError("not an .npy array of a known version")
    if dtype.hasobject or dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"dtype {dtype} is not a plain number type")
    if not isinstance(shape, tuple) or len(shape) > 32 or any((not isinstance(s, int)) or s < 0 for s in shape):
        raise ValueError("malformed shape")
    if expected is not None and tuple(shape) != expected.shape:
        return _ShapeOnly(shape, dtype)  # judged as a shape mismatch without reading the data
    n = 1
    for s in shape:
        n *= s
    if n * dtype.itemsize != len(data) - f.tell():
        raise ValueError("the data does not match the array's header")
    arr = np.frombuffer(data, dtype=dtype, offset=f.tell()).reshape(shape, order="F" if fortran else "C")
    return np.array(arr, copy=True)


class _ShapeOnly(np.ndarray):
    """Stands in for an array whose shape is wrong: it has the shape, no data."""

    def __new__(cls, shape, dtype):
        obj = np.lib.stride_tricks.as_strided(np.zeros(1, dtype=dtype), shape=shape, strides=(0,) * len(shape))
        return obj.view(cls)


# ---------------------------------------------------------------------------------------------
# Step 2: judge outputs (never runs student code)


@dataclass(frozen=True)
class CaseResult:
    case: str
    passed: bool
    message: str  # the whole story (the instructor's)
    public: str = ""  # what a student may see: hidden cases say that and where they failed, not what they are

    def __post_init__(self):
        if not self.public:
            object.__setattr__(self, "public", self.message)


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

    def summary(self, public: bool = False) -> str:
        n = len(self.results)
        if self.passed:
            return f"PASS {self.check}: all {n} case(s) correct"
        seed = "" if public else f" (seed {self.seed})"
        lines = [f"FAIL {self.check}: {len(self.failures())} of {n} case(s) wrong{seed}"]
        lines += [f"- {r.public if public else r.message}" for r in self.failures()]
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
    if got.shape != expected.shape or isinstance(got, _ShapeOnly):
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


def _compare(name: str, got: np.ndarray, expected: np.ndarray, tol: Tolerance) -> tuple[str, str] | None:
    """``None`` when equal within tolerance, else (what is wrong, the same without expected values)."""
    if got.shape != expected.shape:
        hint = ""
        if got.ndim == expected.ndim and sorted(got.shape) == sorted(expected.shape):
            hint = " (the same sizes in another order: a transposed result or a wrong axis?)"
        return (f"{name} has shape {_shape(got)}, expected {_shape(expected)}{hint}",
                f"{name} has the wrong shape{hint}")
    if got.dtype.kind not in "biufc":
        return f"{name} has dtype {got.dtype}, expected numbers", f"{name} is not numeric"
    g = got.astype(np.float64)
    e = expected.astype(np.float64)
    bad_nan = np.isnan(g) & ~np.isnan(e)
    if bad_nan.any():
        where = tuple(int(i) for i in np.argwhere(bad_nan)[0])
        why = ("overflow or 0/0 -- e.g. exp() of large values without subtracting the maximum first, "
               "or a row that is masked out entirely")
        return (f"{name} contains NaN at index {where} where a number was expected "
                f"({int(bad_nan.sum())} NaN value(s)): {why}", f"{name} contains NaN where a number was expected: {why}")
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
            f"(got {float(g[idx]):.6g}, expected {float(e[idx]):.6g}); tolerance {tol.describe()}",
            f"{name} values differ by more than the tolerance ({tol.describe()})")


def _as_array(item, expected: np.ndarray) -> np.ndarray:
    if isinstance(item, Blob):
        return decode_array(item, expected)
    if type(item) is not np.ndarray and not isinstance(item, _ShapeOnly):
        raise ValueError("not an array")
    return item


def judge(check: Check, produced: Mapping[str, Produced], seed: int, hidden: bool | None) -> Report:
    """Compare produced outputs with the reference on the same seeded inputs.

    Each :class:`CaseResult` carries the full message and a public one: for a hidden case the public
    message says which hidden case (by number) failed and how, never its inputs or expected values."""
    results = []
    cases = check.select(hidden)
    n_hidden = sum(c.hidden for c in cases)
    k_hidden = 0
    for case in cases:
        inputs = make_inputs(case, seed)
        if case.hidden:
            k_hidden += 1
        label = f"case '{case.name}' [{_describe_inputs(check, inputs)}]"
        public_label = f"hidden case {k_hidden} of {n_hidden}" if case.hidden else label

        def fail(full: str, public: str | None = None, hint: str | None = None):
            pub = public if case.hidden and public is not None else full
            msg, pmsg = f"{label}: {full}", f"{public_label}: {pub}"
            if hint:
                msg += f"\n  Hint: {hint}"
                pmsg += f"\n  Hint: {hint}"
            results.append(CaseResult(case.name, False, msg, pmsg))

        got = produced.get(case.name)
        if got is None:
            fail("no output was produced")
            continue
        if got.error is not None:
            error = str(got.error)
            # a hidden case reports the exception type only: a message could carry the hidden inputs out
            public = error if got.kind == "rule" else "raised " + error.split(":", 1)[0][:80]
            fail(error if got.kind == "rule" else f"raised {error}", public)
            continue
        with torch.no_grad():
            expected = to_arrays(check.reference(make_copy(inputs)), len(check.output_names))
        if got.arrays is None or len(got.arrays) != len(expected):
            fail(f"expected {len(expected)} result(s)")
            continue
        try:
            arrays = tuple(_as_array(g, e) for g, e in zip(got.arrays, expected))
        except Exception as exc:  # noqa: BLE001 - malformed outputs are a wrong answer, nothing more
            fail(f"its output could not be read ({exc})")
            continue
        problems = [p for p in (_compare(n, g, e, check.tolerance)
                                for n, g, e in zip(check.output_names, arrays, expected)) if p]
        if not problems:
            results.append(CaseResult(case.name, True, f"{label}: correct", f"{public_label}: correct"))
            continue
        hint = _matching_mistake(check, inputs, arrays)
        fail("; ".join(p[0] for p in problems), "; ".join(p[1] for p in problems), hint)
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
    """Inputs that one call may change without changing another's (tensors cloned, modules deep-copied)."""
    import copy

    return {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) if isinstance(v, torch.nn.Module) else v)
            for k, v in inputs.items()}


def evaluate(check: Check, impl: Any, seed: int | None = None, hidden: bool | None = None,
             namespace: dict | None = None) -> Report:
    """Both steps in this process (notebooks and the test suite); earlier exercises that this one
    calls are replaced by their given versions, as in grading."""
    seed = fresh_seed() if seed is None else seed
    return judge(check, produce(check.task, impl, seed, hidden, given=check.given, namespace=namespace),
                 seed, hidden)


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
        fresh seed each run and say only which hidden case failed and how."""
        check = self[name]
        if seed is None:
            seed = fresh_seed() if hidden else 0
        report = evaluate(check, impl, seed=seed, hidden=hidden)
        if not report.passed:
            raise CheckFailed(report.summary(public=hidden)) from None
        kind = "hidden" if hidden else "visible"
        # Returns nothing, so a notebook cell shows only this line (use `evaluate` for the report).
        print(f"PASS {name}: {len(report.results)} {kind} case(s) correct")


def randn(generator: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    """Standard-normal test data (float32) from a case's generator."""
    return torch.randn(*shape, generator=generator) * scale


def defines(source: str, names: Sequence[str]) -> bool:
    """Whether a cell's code defines one of ``names`` at top level (linear time; no regular expressions)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    wanted = set(names)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name in wanted:
            return True
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and any(
                isinstance(t, ast.Name) and t.id in wanted for t in targets):
            return True
    return False
