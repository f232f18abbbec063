"""Every chapter's checks are split in two: ``autograders/harness/<name>.py`` (the Tasks: inputs, calls,
rules -- the only chapter code the grading sandbox sees) and ``autograders/<name>.py`` (the Checks:
reference, tolerance, mistakes, given versions of earlier exercises).

These tests find the chapter modules by globbing ``autograders/*.py``, so a new chapter is covered
without editing this file.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import subprocess
import sys

import pytest

from course import ROOT

CHAPTERS = sorted(p.stem for p in (ROOT / "autograders").glob("*.py") if p.stem != "__init__")

# What a harness module may import (the README's rule): nothing that could compute an answer.
ALLOWED_IMPORTS = {"__future__", "torch", "numpy", "math", "functools", "coursekit"}
ALLOWED_AUTOGRADERS = {"autograders.engine.core"}


def test_chapters_are_found():
    assert "self_attention" in CHAPTERS and len(CHAPTERS) >= 9, CHAPTERS


@pytest.mark.parametrize("name", CHAPTERS)
def test_every_check_uses_the_task_of_its_harness(name):
    chapter = importlib.import_module(f"autograders.{name}")
    harness = importlib.import_module(f"autograders.harness.{name}")
    assert harness.CHAPTER == chapter.CHAPTER == harness.TASKS.chapter == chapter.CHECKS.chapter
    assert set(harness.TASKS.tasks) == set(chapter.CHECKS.checks), "every task needs a check and vice versa"
    for check in chapter.CHECKS:
        assert check.task is harness.TASKS[check.name], (
            f"check {check.name!r} of {name} builds its own task: use Check(H.<TASK>, reference=..., ...)")
        missing = set(check.task.uses) - set(check.given)
        assert not missing, f"check {check.name!r} uses {sorted(missing)} without a given version"


_PROBE = """
import json, sys
sys.path.insert(0, {root!r})
import autograders.harness.{name}
print(json.dumps(sorted(m for m in sys.modules if m == "autograders" or m.startswith("autograders."))))
"""


@pytest.mark.parametrize("name", CHAPTERS)
def test_importing_the_harness_imports_no_chapter_code(name):
    """In a fresh, isolated interpreter the harness pulls in only the engine's core, never its chapter
    module (references, mistakes) nor any other chapter."""
    proc = subprocess.run([sys.executable, "-I", "-c", _PROBE.format(root=str(ROOT), name=name)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    allowed = {"autograders", "autograders.harness", f"autograders.harness.{name}"}
    extra = sorted(m for m in loaded - allowed if m != "autograders.engine" and not m.startswith("autograders.engine."))
    assert not extra, f"importing autograders.harness.{name} also imported {extra}"
    assert f"autograders.{name}" not in loaded


@pytest.mark.parametrize("name", CHAPTERS)
def test_harness_source_holds_no_answers(name):
    """A simple guard: the sandbox side never names a reference or a mistake, and imports only what
    the README allows."""
    path = ROOT / "autograders" / "harness" / f"{name}.py"
    source = path.read_text()
    assert not re.search(r"reference", source, re.IGNORECASE), f"{path} mentions a reference"
    assert not re.search(r"\bMistake", source), f"{path} mentions Mistake"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            modules = [node.module]
        else:
            continue
        for module in modules:
            top = module.split(".")[0]
            ok = module in ALLOWED_AUTOGRADERS if top == "autograders" else top in ALLOWED_IMPORTS
            assert ok, f"{path} imports {module}: a harness imports only {sorted(ALLOWED_IMPORTS)} and core"


def _course_twins() -> dict[str, list[str]]:
    """coursekit's public functions and classes by lower-case name, as "module:name"."""
    import inspect
    import pkgutil

    import coursekit

    twins: dict[str, list[str]] = {}
    for info in pkgutil.iter_modules(coursekit.__path__):
        module = importlib.import_module(f"coursekit.{info.name}")
        for name, value in vars(module).items():
            if ((inspect.isfunction(value) or inspect.isclass(value)) and value.__module__ == module.__name__
                    and not name.startswith("_")):
                twins.setdefault(name.lower(), []).append(f"{module.__name__}:{name}")
    return twins


@pytest.mark.parametrize("name", CHAPTERS)
def test_an_exercise_with_a_twin_in_coursekit_forbids_it(name):
    """A coursekit function or class named like an exercise computes its answer inside the sandbox: the
    exercise's task must forbid calling it (``no_course_version``), however it is reached."""
    from autograders.engine.core import Forbid

    harness = importlib.import_module(f"autograders.harness.{name}")
    twins = _course_twins()
    missing = []
    for task_name, task in harness.TASKS.tasks.items():
        forbidden = {c for r in task.rules if isinstance(r, Forbid) for c in r.callables}
        missing += [f"{task_name}: {t}" for t in twins.get(task_name.lower(), []) if t not in forbidden]
    assert not missing, "exercises that do not forbid their coursekit twin: " + "; ".join(missing)
