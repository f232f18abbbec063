"""The course hub end to end, over HTTP on 127.0.0.1, the way a class uses it.

A fresh copy of the course (what a clone has, plus the installed environment) starts its hub on free
ports (`python tools/hub.py`, what `make hub` runs). The instructor and two students log in through
the login form; the instructor records and releases chapter 01 (formgrader's REST API in the
instructor's own server); each student fetches it from their Assignment List (the assignment_list
REST API of their own server), answers it through the contents API -- alice with the solution's
answers, bob with a wrong SelfAttention -- and submits; the instructor collects (formgrader), grades
with the sandboxed grader (`make grade`'s command), releases the feedback (formgrader), and both students fetch
it. Then the gradebook holds 10/10 and 7/10, each student's home holds the grader's page for them,
and (when the hub runs as root) no student can read another's home, solutions/, the gradebook or
the hub's secrets. The hub and every process it started are stopped afterwards, also on failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import grading_corpus as gc
from course import ROOT

pytestmark = pytest.mark.slow

requests = pytest.importorskip("requests")

COURSE_ID = "attention-to-sora"
CHAPTER, NOTEBOOK = gc.CHAPTER, gc.NOTEBOOK
STUDENTS = ("alice", "bob")
EXPECTED = {"alice": 10.0, "bob": 7.0}  # bob's SelfAttention has no 1/sqrt(d) scale: 3 points lost
TIMINGS: dict[str, float] = {}


def fresh_copy(dest: Path) -> Path:
    """The repository's files (tracked and untracked-not-ignored: what a clone has) and the installed
    virtual environment (a link: it is large and read-only here)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / name.decode()
        if src.is_file() and not src.is_symlink():
            target = dest / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    return dest


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def marked_processes(marker: str) -> list[int]:
    """Every live process whose environment carries COURSE_HUB_ID=<marker>: the hub, its proxy, the
    servers it spawned and what they started (kernels), whatever session or process group they use."""
    needle = f"COURSE_HUB_ID={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    with open(f"/proc/{entry}/stat") as st:
                        if st.read().rsplit(")", 1)[1].split()[0] != "Z":
                            found.append(int(entry))
        except OSError:
            continue
    return found


def server_memory(marker: str) -> dict[str, float]:
    """Resident memory of each user's server (jupyterhub-singleuser and what it started), in MiB."""
    out: dict[str, float] = {}
    for pid in marked_processes(marker):
        try:
            env = dict(item.split("=", 1) for item in open(f"/proc/{pid}/environ").read().split("\0") if "=" in item)
            rss = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            continue
        if "JUPYTERHUB_USER" in env:
            out[env["JUPYTERHUB_USER"]] = out.get(env["JUPYTERHUB_USER"], 0.0) + rss / 1024
    return out


def stop_hub(proc: subprocess.Popen, marker: str, grace_s: float = 30.0) -> list[int]:
    """SIGTERM to the hub (it stops its servers and proxy), then SIGKILL to whatever is left of its
    process group and of every marked process. Returns the processes that needed SIGKILL."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()
        if proc.returncode is not None and not marked_processes(marker):
            return []
        time.sleep(0.5)
    killed = marked_processes(marker)
    for _ in range(3):
        for pid in marked_processes(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        time.sleep(0.5)
    proc.wait(10)
    return killed


@dataclass
class Hub:
    url: str
    course: Path
    state: Path
    passwords: dict[str, str]
    proc: subprocess.Popen
    log: Path
    marker: str
    sessions: dict = field(default_factory=dict)

    @property
    def python(self) -> list[str]:
        # `make assignment` and `make grade` run exactly these; make itself is not used here because a
        # stale .venv/.installed would make it reinstall the shared environment from this copy.
        return [str(self.course / ".venv" / "bin" / "python")]

    def log_tail(self, n: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-n:]


@pytest.fixture
def hub(tmp_path):
    course = fresh_copy(tmp_path / "course")
    roster = tmp_path / "roster.txt"
    roster.write_text("# the class\n" + "\n".join(STUDENTS) + "\n")
    port, api_port, hub_port = _free_ports(3)
    marker = f"test-{os.getpid()}-{port}"
    log = tmp_path / "hub.log"
    env = {**os.environ, "COURSE_HUB_ID": marker, "PYTHONWARNINGS": "ignore"}
    env.pop("JUPYTER_CONFIG_DIR", None)
    start = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(course / ".venv" / "bin" / "python"), str(course / "tools" / "hub.py"),
                                 "--port", str(port), "--api-port", str(api_port), "--hub-port", str(hub_port),
                                 "--roster", str(roster)], cwd=course, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"the hub exited ({proc.returncode}):\n{log.read_text()[-6000:]}"
            try:
                if requests.get(f"{url}/hub/api", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, f"the hub did not come up:\n{log.read_text()[-6000:]}"
            time.sleep(0.5)
        TIMINGS["hub start"] = time.monotonic() - start
        state = course / ".hub"
        passwords = dict(line.split() for line in (state / "passwords.txt").read_text().splitlines()
                         if line.strip() and not line.startswith("#"))
        yield Hub(url, course, state, passwords, proc, log, marker)
    finally:
        killed = stop_hub(proc, marker)
        left = marked_processes(marker)
        print("\nhub test timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in TIMINGS.items()))
        if killed:
            print(f"needed SIGKILL after SIGTERM: {killed}")
        assert not left, f"processes of the hub survived: {left}"


# ---------------------------------------------------------------------------------------------
# A browser's worth of HTTP


def log_in(hub: Hub, name: str, password: str | None = None) -> requests.Session:
    s = requests.Session()
    page = s.get(f"{hub.url}/hub/login", timeout=60)
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page.text).group(1)
    r = s.post(f"{hub.url}/hub/login", data={"username": name, "password": password or hub.passwords[name],
                                             "_xsrf": xsrf}, timeout=60, allow_redirects=False)
    if password is None:
        assert r.status_code == 302, f"{name} could not log in ({r.status_code}):\n{hub.log_tail()}"
    s.login_status = r.status_code
    return s


def start_server(hub: Hub, name: str) -> requests.Session:
    """Log in, start the server (as the home page's Start button does) and open JupyterLab."""
    s = log_in(hub, name)
    r = s.get(f"{hub.url}/hub/spawn/{name}", timeout=60, allow_redirects=False)
    assert r.status_code in (200, 302), r.status_code
    deadline = time.monotonic() + 240
    while True:
        info = s.get(f"{hub.url}/hub/api/users/{name}", timeout=60).json()
        server = info.get("servers", {}).get("")
        if server and server.get("ready"):
            break
        assert time.monotonic() < deadline, f"{name}'s server did not start:\n{hub.log_tail()}"
        time.sleep(1)
    lab = s.get(f"{hub.url}/user/{name}/lab", timeout=120)  # the OAuth round trip sets the server's cookies
    assert lab.status_code == 200 and lab.url.endswith(f"/user/{name}/lab"), (lab.status_code, lab.url)
    s.lab_page = lab.text
    s.user = name
    return s


def call(hub: Hub, s: requests.Session, method: str, path: str, **kw):
    """A request to the user's own server, with the XSRF header a browser's JupyterLab sends."""
    xsrf = s.cookies.get("_xsrf", path=f"/user/{s.user}/")
    return s.request(method, f"{hub.url}/user/{s.user}/{path}", headers={"X-XSRFToken": xsrf or ""},
                     timeout=600, **kw)


def ok(r, what: str) -> dict:
    assert r.status_code == 200, f"{what}: HTTP {r.status_code}: {r.text[:2000]}"
    body = r.json()
    if isinstance(body, dict):
        assert body.get("success", True), f"{what} failed:\n{body.get('log', '')}\n{body.get('error', body)}"
    return body


def answers_of(nb) -> dict[str, str]:
    return {c.metadata["nbgrader"]["grade_id"]: c.source for c in nb.cells
            if c.metadata.get("nbgrader", {}).get("solution")}


def run(cmd: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout,
                          start_new_session=True)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def as_user(hub: Hub, uid: int, code: str):
    """Run Python as a student's uid, seeing the file system as that student's server sees it."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from hub.state import Settings, server_mounts
    plan = server_mounts(Settings(course_dir=hub.course, state_dir=hub.state))
    cmd = [sys.executable, "-I", str(hub.course / "hub" / "launch.py"), "--uid", str(uid), "--gid", str(uid),
           *[f"--cover={c}" for c in plan.cover], *[f"--expose={e}" for e in plan.expose],
           *[f"--expose-ro={e}" for e in plan.expose_ro], "--", sys.executable, "-I", "-c", code]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


PROBE = """
import json, sys
out = {}
for path in sys.argv[1:] if len(sys.argv) > 1 else PATHS:
    try:
        with open(path, 'rb') as f:
            f.read(1)
        out[path] = 'read'
    except OSError as exc:
        out[path] = type(exc).__name__
print(json.dumps(out))
"""


# ---------------------------------------------------------------------------------------------


def test_a_class_round_trip_through_the_hub(hub):
    t0 = time.monotonic()
    isolated = os.geteuid() == 0
    out = hub.log_tail(20000)
    assert ("a Unix uid per student" in out) if isolated else ("NOT ISOLATED" in out or "NONE" in out), out[-3000:]
    assert f"http://127.0.0.1:" in out and "0.0.0.0" not in out

    # the instructor records the chapter in the gradebook (make assignment) while everyone logs in
    with ThreadPoolExecutor(4) as pool:
        recorded = pool.submit(run, [*hub.python, "-m", "autograders.engine.assignment", CHAPTER], hub.course)
        futures = {name: pool.submit(start_server, hub, name) for name in ("instructor", *STUDENTS)}
        sessions = {name: f.result() for name, f in futures.items()}
        recorded.result()
    TIMINGS["log in + servers"] = time.monotonic() - t0
    print("\nidle server memory (RSS, MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in server_memory(hub.marker).items()))
    teacher, students = sessions["instructor"], {n: sessions[n] for n in STUDENTS}

    # each role sees its own tools
    assert call(hub, teacher, "GET", "formgrader/api/status").status_code == 200
    for s in students.values():
        assert call(hub, s, "GET", "formgrader").status_code == 404
        assert call(hub, s, "GET", "formgrader/api/assignments").status_code == 404
        config = json.loads(re.search(r'id="jupyter-config-data"[^>]*>\s*(\{.*?\})\s*</script>',
                                      s.lab_page, re.S).group(1))
        disabled = config.get("disabledExtensions", [])
        disabled = list(disabled) if not isinstance(disabled, dict) else [k for k, v in disabled.items() if v]
        for plugin in ("@jupyter/nbgrader:formgrader", "@jupyter/nbgrader:create-assignment"):
            assert plugin in disabled, disabled
        assert "@jupyter/nbgrader:assignment-list" not in disabled
    # a student cannot open a classmate's server, nor log in as someone else with their own password
    r = students["alice"].get(f"{hub.url}/user/bob/lab", timeout=60)
    assert r.status_code == 403, (r.status_code, r.url)
    assert log_in(hub, "bob", hub.passwords["alice"]).login_status != 302
    assert log_in(hub, "instructor", hub.passwords["alice"]).login_status != 302

    # release (formgrader), fetch (Assignment List)
    t = time.monotonic()
    ok(call(hub, teacher, "POST", f"formgrader/api/assignment/{CHAPTER}/release"), "release")
    uids = json.loads((hub.state / "uids.json").read_text()) if isolated else {}
    for name, s in students.items():
        listed = ok(call(hub, s, "GET", "assignments", params={"course_id": COURSE_ID}), "list")["value"]
        assert [(a["assignment_id"], a["status"]) for a in listed] == [(CHAPTER, "released")], listed
        fetched = ok(call(hub, s, "POST", "assignments/fetch",
                          data={"course_id": COURSE_ID, "assignment_id": CHAPTER}), "fetch")["value"]
        assert any(a["status"] == "fetched" for a in fetched), fetched
        path = hub.state / "homes" / name / CHAPTER / NOTEBOOK
        assert path.is_file()
        if isolated:
            assert path.stat().st_uid == uids[name] and path.parent.parent.stat().st_mode & 0o777 == 0o700

    # answer in the browser (contents API) and submit
    wrong = gc.set_answer(gc.solved(), "SelfAttention", gc.WRONG_MODULE)
    for name, s, nb in (("alice", students["alice"], gc.solved()), ("bob", students["bob"], wrong)):
        where = f"api/contents/{CHAPTER}/{NOTEBOOK}"
        model = ok(call(hub, s, "GET", where, params={"content": 1}), "open notebook")
        answers = answers_of(nb)
        for cell in model["content"]["cells"]:
            grade_id = cell["metadata"].get("nbgrader", {}).get("grade_id")
            if cell["metadata"].get("nbgrader", {}).get("solution"):
                cell["source"] = answers[grade_id]
        ok(call(hub, s, "PUT", where, json={"type": "notebook", "format": "json", "content": model["content"]}),
           "save notebook")
        ok(call(hub, s, "POST", "assignments/submit", data={"course_id": COURSE_ID, "assignment_id": CHAPTER}),
           "submit")
    TIMINGS["release, fetch, answer, submit"] = time.monotonic() - t

    # bob, after submitting, adds to his submission a link to the solution and a FIFO: the instructor's
    # collect (which can read solutions/) must copy neither, and still collect everyone
    (inbound,) = (hub.state / "exchange" / COURSE_ID / "inbound").glob(f"bob+{CHAPTER}+*")
    solution = hub.course / "solutions" / CHAPTER / NOTEBOOK
    tamper = (f"import json, os\nos.symlink({str(solution)!r}, {str(inbound / 'stolen.ipynb')!r})\n"
              f"os.mkfifo({str(inbound / 'pipe.ipynb')!r})\nprint(json.dumps('ok'))")
    if isolated:
        assert as_user(hub, uids["bob"], tamper) == "ok"
    else:
        exec(tamper)

    # collect (formgrader), grade (sandboxed grader, as documented), release feedback (formgrader)
    t = time.monotonic()
    log = ok(call(hub, teacher, "POST", f"formgrader/api/assignment/{CHAPTER}/collect"), "collect")["log"]
    assert "cheating" not in log and "Skipping" not in log, log
    for name in STUDENTS:
        assert (hub.course / "submitted" / name / CHAPTER / NOTEBOOK).is_file(), log
    assert "Not collected" in log and "stolen.ipynb is a symbolic link" in log, log
    assert {p.name for p in (hub.course / "submitted" / "bob" / CHAPTER).iterdir()} == {
        NOTEBOOK, "timestamp.txt", "submission_secret.txt"}
    TIMINGS["collect"] = time.monotonic() - t
    t = time.monotonic()
    graded = run([*hub.python, "-m", "autograders.engine.grade", "--submissions", "submitted", "--chapter", CHAPTER,
                  "--workers", "2"], hub.course)
    TIMINGS["grade (2 students, 2 workers)"] = time.monotonic() - t
    if shutil.which("bwrap"):
        assert "sandbox: bwrap" in graded.stdout, graded.stdout[-2000:]
    t = time.monotonic()
    log = ok(call(hub, teacher, "POST", f"formgrader/api/assignment/{CHAPTER}/release_feedback"),
             "release feedback")["log"]
    for name in STUDENTS:
        assert f"Released feedback for student '{name}'" in log, log

    # each student fetches their feedback
    for name, s in students.items():
        listed = ok(call(hub, s, "POST", "assignments/fetch_feedback",
                         data={"course_id": COURSE_ID, "assignment_id": CHAPTER}), "fetch feedback")["value"]
        submitted = [a for a in listed if a["status"] == "submitted"]
        assert submitted and submitted[0]["submissions"][0]["has_local_feedback"], listed
    TIMINGS["release + fetch feedback"] = time.monotonic() - t

    # the gradebook, as nbgrader (and formgrader) read it
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{hub.course / 'gradebook.db'}") as gb:
        scores = {name: gb.find_submission(CHAPTER, name).score for name in STUDENTS}
        per_exercise = {name: {g.name: g.score for g in
                               gb.find_submission_notebook(NOTEBOOK[:-6], CHAPTER, name).grades} for name in STUDENTS}
    assert scores == EXPECTED, scores
    assert per_exercise["alice"] == {k: float(v) for k, v in gc.FULL.items()}
    assert per_exercise["bob"] == {k: float(v) for k, v in gc.but(SelfAttention=0).items()}
    rows = ok(call(hub, teacher, "GET", f"formgrader/api/submissions/{CHAPTER}"), "formgrader submissions")
    assert {r["student"]: r["score"] for r in rows} == EXPECTED, rows  # what formgrader's pages show

    # the grader's page for each student, in their own home, byte for byte
    for name in STUDENTS:
        pages = list((hub.state / "homes" / name / CHAPTER / "feedback").glob(f"*/{NOTEBOOK[:-6]}.html"))
        assert len(pages) == 1, pages
        page = pages[0].read_bytes()
        assert page == (hub.course / "feedback" / name / CHAPTER / f"{NOTEBOOK[:-6]}.html").read_bytes()
        assert f"Student: <b>{name}</b>".encode() in page
        assert f"Score: <b>{EXPECTED[name]:g} / 10</b>".encode() in page
        if isolated:
            assert pages[0].stat().st_uid == uids[name]

    if isolated:  # what a student's code can open, seen from inside their server's view of the disk
        c = hub.course
        paths = {"own": hub.state / "homes" / "alice" / CHAPTER / NOTEBOOK,
                 "public": c / "autograders" / "self_attention.py",
                 "classmate": hub.state / "homes" / "bob" / CHAPTER / NOTEBOOK,
                 "solutions": c / "solutions" / CHAPTER / NOTEBOOK, "gradebook": c / "gradebook.db",
                 "submitted": c / "submitted" / "bob" / CHAPTER / NOTEBOOK,
                 "feedback": c / "feedback" / "bob" / CHAPTER / f"{NOTEBOOK[:-6]}.html",
                 "passwords": hub.state / "passwords.txt", "hub database": hub.state / "jupyterhub.sqlite",
                 "tools": c / "tools" / "hub.py",
                 "tests": c / "tests" / "grading_corpus.py"}
        seen = as_user(hub, uids["alice"], f"PATHS = {[str(p) for p in paths.values()]!r}\n" + PROBE)
        result = {k: seen[str(p)] for k, p in paths.items()}
        assert result["own"] == "read" and result["public"] == "read", result
        assert all(v == "PermissionError" for k, v in result.items() if k not in ("own", "public")), result
        assert not (hub.state / "exchange").stat().st_mode & 0o002, "the exchange root is world-writable"
    TIMINGS["whole test body"] = time.monotonic() - t0
