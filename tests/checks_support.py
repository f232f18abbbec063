"""Shared assertions for the per-chapter check tests."""

from __future__ import annotations

from autograders.engine.core import CheckSet, evaluate

SEEDS = range(8)


def assert_accepts(checks: CheckSet, name: str, impl) -> None:
    for seed in SEEDS:
        report = evaluate(checks[name], impl, seed=seed)
        assert report.passed, f"the solution of {name} fails its own check:\n{report.summary()}"


def assert_rejects(checks: CheckSet, name: str, impl, hint: str | None = None) -> str:
    report = evaluate(checks[name], impl, seed=0)
    assert not report.passed, f"check {name} accepted a wrong implementation"
    text = report.summary()
    if hint is not None:
        assert hint in text, f"expected the hint {hint!r} in:\n{text}"
    return text


def assert_graded_on_its_own(checks: CheckSet, name: str, namespace: dict, wrong: dict, monkeypatch) -> None:
    """Put wrong earlier functions where the notebook's own code looks them up (``namespace``, the globals
    its cells ran in), then check ``name``: it passes with the given versions of those functions and fails
    without them."""
    from autograders.engine.core import judge, produce

    check = checks[name]
    for earlier, impl in wrong.items():
        assert earlier in check.task.uses, (name, earlier)
        monkeypatch.setitem(namespace, earlier, impl)
    report = evaluate(check, namespace[name], seed=0, namespace=namespace)
    assert report.passed, report.summary()
    alone = judge(check, produce(check.task, namespace[name], 0, None, given={}, namespace=namespace), 0, None)
    assert not alone.passed, "the wrong earlier functions should have failed this exercise without the given ones"
