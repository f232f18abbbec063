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
