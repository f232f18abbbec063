"""A sandbox for running students' code while grading.

With bubblewrap (Linux, Debian package ``bubblewrap``) the code runs:

* in new network, PID, IPC and UTS namespaces (no network at all; it sees only its own processes and
  all of them die with the sandbox),
* on a file system made of read-only binds of only what Python needs (``/usr``, the Python
  installation, the virtual environment, and from this repository only the files of ``autograders/``
  that define the checks plus ``coursekit/``): no ``solutions/``, no gradebook, no other submission,
  no home directory; ``/tmp`` is a small private tmpfs and ``/scratch`` a private writable folder,
* with a cleared environment,
* as an unprivileged user: when the grader runs as root, bubblewrap keeps ``CAP_SETUID``/``CAP_SETGID``
  only long enough for ``setpriv`` to switch to a uid of its own per worker (``61000 + slot``), with no
  capabilities left and ``no_new_privs`` set; as a normal user, bubblewrap's user namespace is used,
* with resource limits the sandboxed process cannot raise (CPU time, address space, processes,
  file size, open files; set by :mod:`autograders.engine.runner` before any student code runs) and
  a wall-clock limit per step enforced from outside with SIGKILL.

Without bubblewrap (macOS, or a container that forbids namespaces) :class:`Sandbox` falls back to the
same limits with no namespace isolation, and says so loudly: student code can then read whatever the
grading user can read and use the network.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Each grading process gets its own block of uids, so that two graders running at once (two
# instructors, or parallel test workers) never kill or read each other's student processes.
BASE_UID = 61000 + (os.getpid() % 4096) * 64
FALLBACK_WARNING = (
    "WARNING: bubblewrap (bwrap) is not available: student code runs WITHOUT namespace isolation "
    "(it can read files this user can read and reach the network); only resource limits and timeouts "
    "apply. Install it (Debian/Ubuntu: apt-get install bubblewrap) before grading for real.")


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandbox run."""

    step_wall_s: float = 20.0  # one student cell, or producing the outputs of one exercise
    start_wall_s: float = 60.0  # starting Python and importing torch
    cpu_s: int = 300
    memory_bytes: int = 2 << 30  # address space; torch and a chapter-01 notebook map ~0.8 GiB
    nproc: int = 32  # processes and threads of the sandbox user (the runner uses 3)
    file_bytes: int = 64 << 20
    open_files: int = 256
    tmp_bytes: int = 64 << 20  # size of the private /tmp


@dataclass
class RunResult:
    progress: list[str]  # the steps the runner reported, in order
    returncode: int | None
    timed_out: bool
    seconds: float
    log_tail: str

    @property
    def finished(self) -> bool:
        return bool(self.progress) and self.progress[-1] == "end" and not self.timed_out

    def last_step(self) -> str | None:
        return self.progress[-1] if self.progress else None


def describe_exit(result: RunResult, limits: Limits) -> str:
    """Why a run ended before its end, in words for the student."""
    if result.timed_out:
        return f"it ran longer than the {limits.step_wall_s:g} s allowed per cell and was stopped"
    rc = result.returncode
    if rc is not None and rc < 0:
        sig = -rc
        names = {signal.SIGSEGV: "it crashed (segmentation fault)", signal.SIGKILL: "it was killed "
                 "(out of memory or too many processes)", signal.SIGXCPU: f"it used more than "
                 f"{limits.cpu_s} s of CPU time", signal.SIGABRT: "it aborted", signal.SIGBUS: "it crashed (bus error)",
                 signal.SIGFPE: "it crashed (floating-point exception)"}
        return names.get(sig, f"it was ended by signal {signal.Signals(sig).name if sig in signal.valid_signals() else sig}")
    return f"the Python process exited (exit status {rc}: os._exit, a crash or a killed kernel)"


class Sandbox:
    """Runs :mod:`autograders.engine.runner` on a job, isolated as well as this machine allows."""

    def __init__(self, limits: Limits | None = None, modules: tuple[str, ...] = (), allow_fallback: bool = True,
                 force_fallback: bool = False):
        self.limits = limits or Limits()
        self.modules = modules
        self.python = sys.executable
        self.bwrap = None if force_fallback else shutil.which("bwrap")
        self.is_root = os.geteuid() == 0
        self.setpriv = shutil.which("setpriv")
        self.mode = "fallback"
        self.problem = None
        if self.bwrap and (not self.is_root or self.setpriv):
            self.problem = self._probe()
            if self.problem is None:
                self.mode = "bwrap"
        elif self.bwrap:
            self.problem = "setpriv (util-linux) is missing"
        else:
            self.problem = "bwrap is not installed"
        if self.mode == "fallback" and not allow_fallback:
            raise RuntimeError(f"no sandbox: {self.problem}")

    @property
    def warning(self) -> str | None:
        return None if self.mode == "bwrap" else f"{FALLBACK_WARNING} ({self.problem})"

    # -- the bubblewrap command ---------------------------------------------------------------

    def _visible_paths(self) -> list[tuple[Path, Path]]:
        """(source, destination) read-only binds."""
        paths = []
        for p in ("/usr", "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
                  "/etc/alternatives", "/etc/fonts", "/etc/mime.types"):
            if os.path.exists(p):
                paths.append(Path(p))
        for p in {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve(), Path(sys.prefix),
                  Path(sys.executable).resolve().parents[1]}:
            if p.exists() and str(p) not in ("/", "/usr") and not str(p).startswith("/usr/"):
                paths.append(p)
        paths.append(REPO / "coursekit")
        pkg = REPO / "autograders"
        wanted = {"__init__.py", "core.py", "grading_runner.py"}
        wanted |= {m.split(".")[-1] + ".py" for m in self.modules}
        paths += [pkg / f for f in sorted(wanted) if (pkg / f).exists()]
        return [(p, p) for p in paths]

    def _bwrap_command(self, argv: list[str], scratch: Path, slot: int) -> list[str]:
        cmd = [self.bwrap, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
               "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--clearenv"]
        made: set[str] = {"/"}

        def parents(dest: Path) -> list[str]:
            out = []
            for parent in reversed(dest.parents):
                s = str(parent)
                if s not in made:
                    made.add(s)
                    out += ["--perms", "0755", "--dir", s]
            return out

        # The private /tmp comes first: binds made after it stay visible even when the repository or
        # the virtual environment lives under /tmp (a tmpfs mounted later would hide them).
        cmd += ["--size", str(self.limits.tmp_bytes), "--perms", "1777", "--tmpfs", "/tmp"]
        made.add("/tmp")
        for top in ("bin", "lib", "lib64", "sbin"):
            p = Path("/") / top
            if p.is_symlink():
                cmd += ["--symlink", os.readlink(p), str(p)]
                made.add(str(p))
        for src, dest in self._visible_paths():
            cmd += parents(dest) + ["--ro-bind", str(src), str(dest)]
            made.add(str(dest))
        cmd += ["--proc", "/proc", "--dev", "/dev", "--bind", str(scratch), "/scratch", "--chdir", "/scratch"]
        for key, value in self._env("/scratch").items():
            cmd += ["--setenv", key, value]
        if self.is_root:
            cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--"] + self._drop_privileges(slot)
        else:
            cmd += ["--unshare-user", "--"]
        return cmd + argv

    def _drop_privileges(self, slot: int) -> list[str]:
        uid = str(BASE_UID + slot)
        return [self.setpriv, "--reuid", uid, "--regid", uid, "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all", "--no-new-privs", "--"]

    def _env(self, home: str) -> dict[str, str]:
        return {"PATH": f"{Path(sys.prefix) / 'bin'}:/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8",
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COURSE_THREADS": "1", "MPLBACKEND": "Agg",
                "PYTHONDONTWRITEBYTECODE": "1", "MPLCONFIGDIR": f"{home}/.mpl", "TMPDIR": "/tmp"
                if self.mode == "bwrap" else home}

    def _probe(self) -> str | None:
        """None when a trivial command runs in the sandbox, else why not."""
        with tempfile.TemporaryDirectory(prefix="sandbox-probe-") as scratch:
            scratch_path = Path(scratch)
            self._own(scratch_path, 0)
            cmd = self._bwrap_command([self.python, "-I", "-c", "import autograders.engine.core"], scratch_path, 0)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"bwrap does not start: {exc}"
            if proc.returncode != 0:
                return f"bwrap does not work here: {proc.stderr.strip()[-500:]}"
        return None

    def _own(self, scratch: Path, slot: int) -> None:
        if self.is_root:
            os.chown(scratch, BASE_UID + slot, BASE_UID + slot)
        os.chmod(scratch, 0o700)

    # -- running ------------------------------------------------------------------------------

    def run(self, job: dict, slot: int = 0) -> tuple[RunResult, Path]:
        """Run one job; returns the result and the scratch folder holding the outputs (the caller
        removes it)."""
        scratch = Path(tempfile.mkdtemp(prefix="grading-"))
        self._own(scratch, slot)
        inside = "/scratch" if self.mode == "bwrap" else str(scratch)
        job = {**job, "out": inside, "limits": asdict(self.limits), "modules": list(self.modules)}
        (scratch / "job.json").write_text(json.dumps(job))
        (scratch / "progress").touch()
        (scratch / "student.log").touch()
        if self.is_root:
            for name in ("progress", "student.log"):
                os.chown(scratch / name, BASE_UID + slot, BASE_UID + slot)
        argv = [self.python, "-I", "-m", "autograders.engine.runner", f"{inside}/job.json"]
        if self.mode == "bwrap":
            cmd = self._bwrap_command(argv, scratch, slot)
            env = {}
            cwd = "/"
        else:
            # No namespaces, but never the grader's own user: as root, drop to the slot's uid.
            cmd = self._drop_privileges(slot) + argv if self.is_root and self.setpriv else argv
            env = self._env(str(scratch))
            env["PYTHONPATH"] = str(REPO)
            cwd = str(scratch)
        start = time.monotonic()
        with open(scratch / "sandbox.err", "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env, cwd=cwd,
                                    start_new_session=True)
        timed_out = False
        seen_size = -1
        step_started = time.monotonic()
        budget = self.limits.start_wall_s
        progress_file = scratch / "progress"
        while proc.poll() is None:
            time.sleep(0.05)
            try:
                size = progress_file.stat().st_size
            except OSError:
                size = seen_size
            now = time.monotonic()
            if size != seen_size:
                seen_size = size
                step_started = now
                last = _tail_lines(progress_file)
                budget = (self.limits.start_wall_s if last and last[-1] in ("start",)
                          else self.limits.step_wall_s)
            if now - step_started > budget:
                timed_out = True
                self._kill(proc, slot)
                break
        returncode = proc.wait()
        self._cleanup_uid(slot)
        seconds = time.monotonic() - start
        progress = _tail_lines(progress_file, keep=10_000)
        log_tail = _read_tail(scratch / "sandbox.err", 4000)
        return RunResult(progress, returncode, timed_out, seconds, log_tail), scratch

    def _kill(self, proc: subprocess.Popen, slot: int) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._cleanup_uid(slot)

    def _cleanup_uid(self, slot: int) -> None:
        """Kill anything left running as this slot's sandbox user (bubblewrap mode as root)."""
        if not (self.is_root and self.mode == "bwrap"):
            return
        uid = BASE_UID + slot
        for _ in range(3):
            found = False
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                try:
                    if os.stat(entry.path).st_uid == uid:
                        os.kill(int(entry.name), signal.SIGKILL)
                        found = True
                except (OSError, ProcessLookupError):
                    pass
            if not found:
                return
            time.sleep(0.05)


def _read_tail(path: Path, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _tail_lines(path: Path, keep: int = 5) -> list[str]:
    text = _read_tail(path, 64 * 1024)
    lines = [line for line in text.splitlines() if line]
    return lines[-keep:]
