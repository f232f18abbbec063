"""The pip pins and the conda environment agree, and torch stays the CPU build on disk."""

import re

import yaml

from course import ROOT


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==([^\s;]+)", line)
        assert m, f"requirements.txt: {line!r} is not an exact pin (name==version)"
        pins[m.group(1).lower()] = m.group(2)
    return pins


def environment_pins() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = [d for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_section) == 1, "environment.yml needs exactly one pip: section"
    pins = {}
    for line in pip_section[0]["pip"]:
        name, _, version = line.partition("==")
        assert version, f"environment.yml: {line!r} is not an exact pin"
        pins[name.strip().lower()] = version.strip()
    return pins


def test_every_requirement_is_pinned_and_torch_is_exact():
    pins = requirement_pins()
    assert pins.get("torch") == "2.13.0", "torch must be pinned to 2.13.0 exactly (the CPU wheel on disk)"
    for needed in ("nbgrader", "jupyterlab", "jupyter-book", "nbval", "pytest", "django-static-mathjax"):
        assert needed in pins, f"{needed} is missing from requirements.txt"
    assert pins["jupyter-book"].startswith("1."), "Jupyter Book 2 cannot build offline; keep 1.x"


def test_environment_yml_matches_requirements():
    req, env = requirement_pins(), environment_pins()
    only_req = sorted(set(req) - set(env))
    only_env = sorted(set(env) - set(req))
    differ = sorted(n for n in set(req) & set(env) if req[n] != env[n])
    assert not (only_req or only_env or differ), (
        f"environment.yml and requirements.txt disagree: only in requirements.txt {only_req}; "
        f"only in environment.yml {only_env}; different versions {[(n, req[n], env[n]) for n in differ]}"
    )
    python = [d for d in yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
              if isinstance(d, str) and d.startswith("python")]
    assert python == ["python=3.11"], f"environment.yml must ask for python=3.11, has {python}"
