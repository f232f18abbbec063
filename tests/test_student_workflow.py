"""The student's side as documented: own copies that nothing overwrites, student tools only in the
student lab, instructor tools in the instructor lab, and a validate command with full messages and an
exit status."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import nbformat
import pytest

import importlib.util

from course import CHAPTERS, ROOT, SOLUTIONS, notebook_of
from test_roundtrip import solved

def _load_tool(name: str):
    """A script of tools/, loaded by path (tools/ on sys.path would shadow packages such as hub/)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


workspace = _load_tool("workspace")


def test_work_folder_is_created_once_and_never_overwritten(tmp_path):
    release, work = tmp_path / "chapters", tmp_path / "work"
    (release / "01_a").mkdir(parents=True)
    (release / "01_a" / "a.ipynb").write_text("v1")
    assert len(workspace.sync(release, work)) == 1 and (work / "01_a" / "a.ipynb").read_text() == "v1"
    (work / "01_a" / "a.ipynb").write_text("my answers")
    (release / "01_a" / "a.ipynb").write_text("v2")  # a course update
    (release / "02_b").mkdir()
    (release / "02_b" / "b.ipynb").write_text("new chapter")
    messages = workspace.sync(release, work)
    assert (work / "01_a" / "a.ipynb").read_text() == "my answers"
    assert (work / "02_b" / "b.ipynb").read_text() == "new chapter"
    assert any("updated upstream" in m for m in messages) and any(m.startswith("new:") for m in messages)


def test_work_folder_is_ignored_by_git():
    proc = subprocess.run(["git", "check-ignore", "-q", "work/01_self_attention/self_attention.ipynb"], cwd=ROOT)
    assert proc.returncode == 0, "work/ must be git-ignored so that a pull never conflicts with a student's work"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str) -> int:
    try:
        return urllib.request.urlopen(url, timeout=10).status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow
@pytest.mark.parametrize("role,formgrader", [("student", 404), ("instructor", 200)])
def test_labs_show_each_role_its_own_tools(role, formgrader, tmp_path):
    port, token = _free_port(), "t0ken"
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(ROOT / "config" / role), "JUPYTER_RUNTIME_DIR": str(tmp_path)}
    jupyter = ROOT / ".venv" / "bin" / "jupyter"
    proc = subprocess.Popen([str(jupyter), "lab", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
                             "--no-browser", "--allow-root", f"--ServerApp.root_dir={ROOT}",
                             f"--IdentityProvider.token={token}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            if proc.poll() is not None:
                pytest.fail("jupyter lab exited")
            try:
                if _status(f"{base}/api/status?token={token}") == 200:
                    break
            except OSError:
                time.sleep(0.5)
        assert _status(f"{base}/formgrader?token={token}") == formgrader
        page = urllib.request.urlopen(f"{base}/lab?token={token}", timeout=10).read().decode()
        disabled = "@jupyter/nbgrader:formgrader" in page.split("disabledExtensions", 1)[-1][:600]
        assert disabled == (role == "student")
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_validate_gives_full_messages_and_an_exit_status(tmp_path):
    chapter = "01_self_attention"
    release_nb = nbformat.read(notebook_of(CHAPTERS / chapter), as_version=4)
    stub, good = tmp_path / "stub.ipynb", tmp_path / "good.ipynb"
    nbformat.write(release_nb, stub)
    nbformat.write(solved(release_nb, nbformat.read(notebook_of(SOLUTIONS / chapter), as_version=4)), good)
    cmd = [sys.executable, "-m", "autograders.engine.validate"]
    bad = subprocess.run(cmd + [str(stub)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert bad.returncode == 1 and "FAIL test_stable_softmax" in bad.stdout and "not implemented yet" in bad.stdout
    assert "Traceback" not in bad.stdout
    ok = subprocess.run(cmd + [str(good)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert ok.returncode == 0, ok.stdout[-3000:]
    assert ok.stdout.count("PASS test_") == 5
    missing = subprocess.run(cmd + [str(tmp_path / "nope.ipynb")], capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 2 and "no such notebook" in missing.stderr
