"""Unit tests of the check framework (autograders.engine.core)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autograders.engine.core import (EXACT, Case, Check, CheckFailed, CheckSet, Forbid, Mistake, Produced, Task,
                                     Tolerance, evaluate, judge, make_inputs, produce, randn, to_arrays)

TOL = Tolerance(1e-6, 1e-6, "test")


def double_ref(inputs):
    return inputs["x"] * 2


CHECK = Check(
    name="double",
    cases=(Case("vector", lambda g: {"x": randn(g, 4)}),
           Case("matrix", lambda g: {"x": randn(g, 2, 3)}, hidden=True)),
    reference=double_ref,
    tolerance=TOL,
    mistakes=(Mistake("triple", lambda x: x * 3, "you multiplied by 3"),),
)


def test_inputs_are_deterministic_per_seed_and_case():
    a = make_inputs(CHECK.cases[0], 5)["x"]
    assert torch.equal(a, make_inputs(CHECK.cases[0], 5)["x"])
    assert not torch.equal(a, make_inputs(CHECK.cases[0], 6)["x"])


def test_produce_then_judge_separately():
    produced = produce(CHECK, lambda x: x * 2, seed=1, hidden=None)
    assert set(produced) == {"vector", "matrix"}
    assert all(isinstance(p.arrays[0], np.ndarray) for p in produced.values())
    report = judge(CHECK, produced, seed=1, hidden=None)
    assert report.passed and len(report.results) == 2


def test_outputs_forged_for_another_seed_fail():
    produced = produce(CHECK, lambda x: x * 2, seed=1, hidden=False)
    assert not judge(CHECK, produced, seed=2, hidden=False).passed


def test_missing_output_fails():
    report = judge(CHECK, {}, seed=0, hidden=False)
    assert not report.passed and "no output" in report.summary()


def test_hidden_selection():
    assert [c.name for c in CHECK.select(False)] == ["vector"]
    assert [c.name for c in CHECK.select(True)] == ["matrix"]
    assert len(CHECK.select(None)) == 2


def test_messages_name_shape_value_and_hint():
    text = evaluate(CHECK, lambda x: x * 3, seed=0).summary()
    assert "values differ" in text and "largest error" in text and "you multiplied by 3" in text
    text = evaluate(CHECK, lambda x: x.reshape(-1)[:1], seed=0).summary()
    assert "shape (1)" in text and "expected (4)" in text
    text = evaluate(CHECK, lambda x: x.T.contiguous() * 2 if x.ndim == 2 else x * 2, seed=0).summary()
    assert "transposed" in text
    text = evaluate(CHECK, lambda x: x * float("nan"), seed=0).summary()
    assert "NaN" in text


def test_errors_are_reported_not_raised():
    def boom(x):
        raise ValueError("bad input")
    text = evaluate(CHECK, boom, seed=0).summary()
    assert "ValueError: bad input" in text
    with pytest.raises(CheckFailed, match="not implemented"):
        CheckSet("t", [CHECK]).check("double", lambda x: (_ for _ in ()).throw(NotImplementedError()))


def test_wrong_return_types():
    assert "expected a tensor" in evaluate(CHECK, lambda x: "text", seed=0).summary()
    two = Check("two", (Case("c", lambda g: {"x": randn(g, 2)}),), lambda i: (i["x"], i["x"]), TOL,
                output_names=("a", "b"))
    assert "tuple of 2" in evaluate(two, lambda x: x, seed=0).summary()
    assert evaluate(two, lambda x: (x, x), seed=0).passed


def test_lying_tensor_subclass_is_read_as_plain_data():
    class Liar(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            return torch.zeros(4) + 1e9  # whatever is asked, claim something else

    out = torch.arange(4.0).as_subclass(Liar)
    arrays = to_arrays(out, 1)
    np.testing.assert_array_equal(arrays[0], np.arange(4.0))


def test_checkset_lookup_and_visible_seed(capsys):
    cs = CheckSet("t", [CHECK])
    cs.check("double", lambda x: x * 2)
    assert "PASS double: 1 visible" in capsys.readouterr().out
    with pytest.raises(KeyError, match="has no check 'nope'; it has: double"):
        cs["nope"]
    with pytest.raises(ValueError, match="unique"):
        Check("d", (Case("a", lambda g: {}), Case("a", lambda g: {})), double_ref, TOL)
    with pytest.raises(ValueError, match="visible"):
        Check("d", (Case("a", lambda g: {}, hidden=True),), double_ref, TOL)


def test_exact_tolerance_and_infinities():
    ints = Check("ints", (Case("c", lambda g: {"x": torch.tensor([1, 2, 3])}),), lambda i: i["x"], EXACT)
    assert evaluate(ints, lambda x: x.clone(), seed=0).passed
    assert not evaluate(ints, lambda x: x + 1, seed=0).passed
    infs = Check("inf", (Case("c", lambda g: {"x": torch.tensor([1.0, float("-inf")])}),), lambda i: i["x"], TOL)
    assert evaluate(infs, lambda x: x.clone(), seed=0).passed
    assert not evaluate(infs, lambda x: torch.tensor([1.0, 0.0]), seed=0).passed
    assert not evaluate(infs, lambda x: torch.tensor([1.0, float("inf")]), seed=0).passed


def test_produced_error_dataclass():
    p = Produced(None, "X: y")
    assert p.arrays is None and p.error == "X: y"


# --- Forbid(callables=...): a forbidden Python function is seen whichever way it is reached -------------

_LIBRARY = '''
import torch

def answer(x):
    return x * 2

class Helper(torch.nn.Module):
    def forward(self, x):
        return x * 2

class Tool:
    @staticmethod
    def answer(x):
        return x * 2
'''


@pytest.fixture()
def library(tmp_path, monkeypatch):
    import importlib
    import sys

    (tmp_path / "fake_library.py").write_text(_LIBRARY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("fake_library", None)
    yield importlib.import_module("fake_library")
    sys.modules.pop("fake_library", None)


def _call_watch_check():
    rule = Forbid("write it yourself: fake_library is not allowed",
                  callables=("fake_library:answer", "fake_library:Helper", "fake_library:Tool.answer"))
    task = Task("double", cases=(Case("four", lambda g: {"x": torch.arange(4.0)}),), rules=(rule,))
    return Check(task, reference=lambda inputs: inputs["x"] * 2, tolerance=EXACT)


def _routes(lib):
    import threading
    import types

    def imported_inside(x):
        from fake_library import answer as hidden
        return hidden(x)

    copy = types.FunctionType(lib.answer.__code__, lib.answer.__globals__)
    replaced = types.FunctionType(lib.answer.__code__.replace(co_consts=lib.answer.__code__.co_consts),
                                  lib.answer.__globals__)

    def in_a_thread(x):
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("y", lib.answer(x)))
        t.start()
        t.join()
        return out["y"]

    return {"alias": lib.answer, "import inside": imported_inside, "FunctionType copy": copy,
            "code.replace copy": replaced, "module": lambda x: lib.Helper()(x),
            "static method": lib.Tool.answer, "thread": in_a_thread,
            "getattr": lambda x: getattr(__import__("fake_library"), "an" + "swer")(x)}


def test_forbidden_callables_are_seen_on_every_route(library):
    check = _call_watch_check()
    for label, impl in _routes(library).items():
        report = evaluate(check, impl, seed=0)
        assert not report.passed, label
        assert "fake_library is not allowed" in report.summary(), label
    assert evaluate(check, lambda x: x + x, seed=0).passed


def test_a_library_imported_only_inside_the_exercise_is_seen(tmp_path, monkeypatch):
    import sys

    (tmp_path / "fake_library.py").write_text(_LIBRARY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("fake_library", None)

    def imported_inside(x):
        import fake_library
        return fake_library.Helper()(x) + fake_library.answer(x) - fake_library.answer(x)

    try:
        report = evaluate(_call_watch_check(), imported_inside, seed=0)
    finally:
        sys.modules.pop("fake_library", None)
    assert not report.passed and "fake_library is not allowed" in report.summary()


def test_removing_the_call_watch_breaks_the_rule(library):
    import sys

    def tamper(x):
        sys.setprofile(None)
        return library.answer(x)

    report = evaluate(_call_watch_check(), tamper, seed=0)
    assert not report.passed and "removed the grader's call watch" in report.summary()
    assert sys.getprofile() is None


def test_a_callable_that_is_not_a_function_is_a_clear_error():
    from autograders.engine.core import resolve_callable

    with pytest.raises(ValueError, match="does not name a Python function"):
        resolve_callable("math:pi")
