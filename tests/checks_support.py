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


def chapter_tests(checks: CheckSet, tasks, names: list[str], sol, hidden_seeds=(11, 12, 13)) -> dict:
    """The tests every chapter's exercises get, for ``globals().update(chapter_tests(...))`` in its test
    file: the checks use the harness's tasks, the solution passes (over SEEDS, and the hidden cases over
    ``hidden_seeds`` with warnings as errors), the stub fails, and every listed mistake is caught with its
    hint. Fresh functions per call, so that pytest's marks stay per module."""
    import warnings

    import pytest

    from notebook_code import not_implemented

    def test_every_exercise_has_a_check_and_a_task():
        assert list(checks.checks) == names
        assert list(tasks.tasks) == names
        assert all(checks[n].task is tasks[n] for n in names), "checks must use the harness's tasks"

    @pytest.mark.parametrize("name", names)
    def test_solution_passes(name):
        assert_accepts(checks, name, getattr(sol, name))

    @pytest.mark.parametrize("name", names)
    def test_solution_passes_hidden_cases_without_warnings(name):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for seed in hidden_seeds:
                report = evaluate(checks[name], getattr(sol, name), seed=seed, hidden=True)
                assert report.passed, report.summary()

    @pytest.mark.parametrize("name", names)
    def test_stub_fails(name):
        assert "not implemented yet" in assert_rejects(checks, name, not_implemented)

    def test_every_mistake_is_caught_with_its_hint():
        for check in checks:
            for mistake in check.mistakes:
                report = evaluate(check, mistake.impl, seed=0, hidden=None)
                assert not report.passed, f"{check.name}: the mistake {mistake.name!r} passes"
                assert mistake.hint in report.summary(), f"{check.name}: no hint for {mistake.name!r}"

    return {n: f for n, f in locals().items() if n.startswith("test_")}
