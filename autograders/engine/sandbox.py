"""A sandbox for running students' code while grading.

With bubblewrap (Linux, Debian package ``bubblewrap``) the code runs:

* in new network, PID, IPC and UTS namespaces (no network at all; it sees only its own processes and
  all of them die with the sandbox),
* on a file system made of read-only binds of only what Python needs (``/usr``, the Python
  installation, the virtual environment, and from this repository only the runner side of the engine,
  the chapter's *harness* -- inputs and calls, no reference -- and ``coursekit/``): no check module, no
  ``solutions/``, no gradebook, no other submission, no home directory; ``/tmp`` and ``/scratch`` are
  small private tmpfs mounts, ``/job`` the read-only job,
* with a cleared environment,
* as an unprivileged user: when the grader runs as root, bubblewrap keeps ``CAP_SETUID``/``CAP_SETGID``
  only long enough for ``setpriv`` to switch to a uid of its own per worker, with no capabilities left
  and ``no_new_privs`` set; as a normal user, bubblewrap's user namespace is used,
* in a cgroup of its own (as root, where the cgroup file system is writable) that caps the memory and
  the number of processes of everything in the sandbox together and counts its CPU time,
* with per-process limits it cannot raise (CPU time, address space, processes, file size, open
  files; set by :mod:`autograders.engine.runner` before any student code runs), and limits per step
  enforced from outside with SIGKILL: CPU time (load on the machine does not count against a
  student), wall-clock time (sleeping or waiting code), and a total for the whole notebook.

Outputs leave only through a pipe (:mod:`autograders.engine.protocol`) that the grader reads with
bounds; nothing the sandbox writes to a file is read back.

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
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Each grading process gets its own block of uids, so that two graders running at once (two
# instructors, or parallel test workers) never kill or read each other's student processes.
BASE_UID = 61000 + (os.getpid() % 4096) * 64
UIDS_PER_GRADER = 64  # slots per grading process: BASE_UID .. BASE_UID + 63
SANDBOX_UID_RANGE = range(61000, 61000 + 4096 * UIDS_PER_GRADER)  # every uid a sandbox may ever use
FALLBACK_WARNING = (
    "WARNING: bubblewrap (bwrap) is not available: student code runs WITHOUT namespace isolation "
    "(it can read files this user can read and reach the network); only resource limits and timeouts "
    "apply. Install it (Debian/Ubuntu: apt-get install bubblewrap) before grading for real.")


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandbox run. Steps (a student cell, or producing one exercise's outputs)
    are limited by CPU time, so that a busy machine does not cost a student points; the wall-clock
    limit only catches code that sleeps or waits, and a step stopped by it is retried once."""

    step_cpu_s: float = 20.0  # CPU seconds per step (all the sandbox's processes and threads)
    step_wall_s: float = 60.0  # wall-clock seconds per step
    start_wall_s: float = 120.0  # starting Python and importing torch
    total_wall_s: float = 600.0  # everything one student's notebook may take, retries included
    cpu_s: int = 300  # per process (RLIMIT_CPU)
    memory_bytes: int = 2 << 30  # address space per process; torch and a chapter-01 notebook map ~0.8 GiB
    group_memory_bytes: int = 3 << 30  # all the sandbox's processes together, its /tmp and /scratch included
    nproc: int = 32  # processes and threads of the sandbox user (the runner uses 3)
    group_pids: int = 64
    file_bytes: int = 64 << 20
    open_files: int = 256
    tmp_bytes: int = 64 << 20  # size of the private /tmp and of /scratch, each


@dataclass
class RunResult:
    progress: list[str]  # the planned steps the runner reached, in order
    returncode: int | None
    timed_out: str | None  # None, or "cpu", "wall", "total": which limit stopped it
    seconds: float
    log_tail: str
    protocol_error: str | None = None

    @property
    def finished(self) -> bool:
        return bool(self.progress) and self.progress[-1] == "end" and not self.timed_out

    def last_step(self) -> str | None:
        return self.progress[-1] if self.progress else None


def describe_exit(result: RunResult, limits: Limits) -> str:
    """Why a run ended before its end, in words for the student."""
    if result.timed_out == "cpu":
        return f"it used more than the {limits.step_cpu_s:g} s of CPU time allowed per cell and was stopped"
    if result.timed_out == "wall":
        return (f"it waited or slept for more than {limits.step_wall_s:g} s in one cell (twice) and was stopped")
    if result.timed_out == "total":
        return f"the notebook used up its {limits.total_wall_s:g} s of grading time"
    if result.protocol_error:
        return f"it wrote garbage to the grader's channel ({result.protocol_error})"
    rc = result.returncode
    if rc is not None and rc < 0:
        sig = -rc
        names = {signal.SIGSEGV: "it crashed (segmentation fault)", signal.SIGKILL: "it was killed "
                 "(out of memory or too many processes)", signal.SIGXCPU: f"it used more than "
                 f"{limits.cpu_s} s of CPU time", signal.SIGABRT: "it aborted", signal.SIGBUS: "it crashed (bus error)",
                 signal.SIGFPE: "it crashed (floating-point exception)"}
        return names.get(sig, f"it was ended by signal {signal.Signals(sig).name if sig in signal.valid_signals() else sig}")
    return f"the Python process exited (exit status {rc}: os._exit, a crash or a killed kernel)"


class Session:
    """What the grader does with the frames of one run: records outputs, answers given functions."""

    def on_record(self, header: dict, blobs: list[bytes]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def on_call(self, header: dict, blobs: list[bytes]) -> tuple[dict, list[bytes]]:  # pragma: no cover
        raise NotImplementedError


class _Cgroup:
    """A cgroup (v1 or v2) per sandbox slot capping memory and processes, and counting CPU time.
    Only as root where the cgroup file system is writable; otherwise ``ok`` is False."""

    ROOT = Path("/sys/fs/cgroup")

    def __init__(self, name: str, limits: Limits):
        self.dirs: list[Path] = []
        self.cpu_file: Path | None = None
        self.v2 = (self.ROOT / "cgroup.controllers").exists()
        try:
            if self.v2:
                d = self.ROOT / "attention-to-sora" / name
                d.mkdir(parents=True, exist_ok=True)
                (d / "memory.max").write_text(str(limits.group_memory_bytes))
                (d / "memory.swap.max").exists() and (d / "memory.swap.max").write_text("0")
                (d / "pids.max").write_text(str(limits.group_pids))
                self.dirs, self.cpu_file = [d], d / "cpu.stat"
            else:
                for ctrl, settings in (("memory", {"memory.limit_in_bytes": limits.group_memory_bytes}),
                                       ("pids", {"pids.max": limits.group_pids}), ("cpuacct", {})):
                    d = self.ROOT / ctrl / "attention-to-sora" / name
                    d.mkdir(parents=True, exist_ok=True)
                    for key, value in settings.items():
                        (d / key).write_text(str(value))
                    self.dirs.append(d)
                self.cpu_file = self.dirs[-1] / "cpuacct.usage"
            self.ok = True
        except OSError:
            self.ok = False
            self.remove()

    def wrap(self, argv: list[str]) -> list[str]:
        """A command that joins the cgroup before it becomes ``argv`` (so no child escapes it)."""
        joins = "; ".join(f'echo $$ > "{d}/cgroup.procs"' for d in self.dirs)
        return ["/bin/sh", "-c", f'{joins} || exit 97; exec "$@"', "sandbox"] + argv

    def cpu_seconds(self) -> float | None:
        try:
            text = self.cpu_file.read_text()
        except (OSError, AttributeError):
            return None
        if self.v2:
            for line in text.splitlines():
                if line.startswith("usage_usec"):
                    return int(line.split()[1]) / 1e6
            return None
        return int(text.strip()) / 1e9

    def pids(self) -> list[int]:
        out = []
        for d in self.dirs[:1]:
            try:
                out += [int(x) for x in (d / "cgroup.procs").read_text().split()]
            except (OSError, ValueError):
                pass
        return out

    def kill_all(self) -> None:
        for _ in range(20):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.05)

    def remove(self) -> None:
        for d in self.dirs:
            try:
                d.rmdir()
            except OSError:
                pass


class Sandbox:
    """Runs :mod:`autograders.engine.runner` on a job, isolated as well as this machine allows."""

    def __init__(self, limits: Limits | None = None, modules: tuple[str, ...] = (), allow_fallback: bool = True,
                 force_fallback: bool = False):
        self.limits = limits or Limits()
        self.modules = modules  # harness modules, e.g. "autograders.harness.self_attention"
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
        probe = _Cgroup(f"probe-{os.getpid()}", self.limits) if self.is_root else None
        self.cgroups = bool(probe and probe.ok)
        if probe:
            probe.remove()

    @property
    def warning(self) -> str | None:
        if self.mode != "bwrap":
            return f"{FALLBACK_WARNING} ({self.problem})"
        return None

    @property
    def caps(self) -> str:
        """How memory and processes are capped, for the report."""
        return ("a cgroup per sandbox caps memory and processes" if self.cgroups else
                "no cgroup (not root, or no writable cgroup file system): memory and processes are "
                "capped per process only")

    # -- the bubblewrap command ---------------------------------------------------------------

    def sandbox_files(self) -> list[Path]:
        """The files of this repository the sandbox sees: the engine's runner side, the harness
        modules of the chapter, coursekit. No chapter check module, no reference, no solution."""
        pkg = REPO / "autograders"
        files = [pkg / "__init__.py", pkg / "engine" / "__init__.py", pkg / "engine" / "core.py",
                 pkg / "engine" / "protocol.py", pkg / "engine" / "runner.py", pkg / "harness" / "__init__.py"]
        for m in self.modules:
            parts = m.split(".")
            if parts[:2] != ["autograders", "harness"] or len(parts) != 3:
                raise ValueError(f"only harness modules go into the sandbox, not {m}")
            files.append(pkg / "harness" / f"{parts[2]}.py")
        return [REPO / "coursekit"] + [f for f in files if f.exists()]

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
        paths += self.sandbox_files()
        return [(p, p) for p in paths]

    def _bwrap_command(self, argv: list[str], jobdir: Path, slot: int) -> list[str]:
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
        # /scratch: a size-limited tmpfs of its own (nothing the student writes reaches the host's disk)
        cmd += ["--proc", "/proc", "--dev", "/dev", "--ro-bind", str(jobdir), "/job",
                "--size", str(self.limits.tmp_bytes), "--perms", "1777", "--tmpfs", "/scratch", "--chdir", "/scratch"]
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
                "PYTHONDONTWRITEBYTECODE": "1", "MPLCONFIGDIR": f"{home}/.mpl", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "TMPDIR": "/tmp" if self.mode == "bwrap" else home}

    def _probe(self) -> str | None:
        """None when a trivial command runs in the sandbox, else why not."""
        with tempfile.TemporaryDirectory(prefix="sandbox-probe-") as jobdir:
            cmd = self._bwrap_command([self.python, "-I", "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                                       "import autograders.engine.core"], Path(jobdir), 0)
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"bwrap does not start: {exc}"
            if proc.returncode != 0:
                return f"bwrap does not work here: {proc.stderr.strip()[-500:]}"
        return None

    # -- running ------------------------------------------------------------------------------

    def run(self, job: dict, session: Session, slot: int = 0, wall_scale: float = 1.0,
            budget_s: float | None = None) -> RunResult:
        """Run one job; frames go to ``session``. ``job["steps"]`` lists the planned steps in order:
        progress is accepted only along that plan, so forged steps cannot extend a run."""
        limits = self.limits
        jobdir = Path(tempfile.mkdtemp(prefix="grading-job-"))
        scratch = jobdir if self.mode != "bwrap" else None
        out_r, out_w = os.pipe()
        in_r, in_w = os.pipe()
        cgroup = _Cgroup(f"{os.getpid()}-{slot}", limits) if self.cgroups else None
        try:
            os.chmod(jobdir, 0o755)
            inside = "/job" if self.mode == "bwrap" else str(jobdir)
            payload = {**job, "limits": asdict(limits), "modules": list(self.modules)}
            (jobdir / "job.json").write_text(json.dumps(payload))
            os.chmod(jobdir / "job.json", 0o644)
            # The repository's own files first on the path (not an editable install that may point elsewhere).
            argv = [self.python, "-I", "-c", f"import sys, runpy; sys.path.insert(0, {str(REPO)!r}); "
                    "runpy.run_module('autograders.engine.runner', run_name='__main__', alter_sys=True)",
                    f"{inside}/job.json", str(out_w), str(in_r)]
            if self.mode == "bwrap":
                cmd, env, cwd = self._bwrap_command(argv, jobdir, slot), {}, "/"
            else:
                # No namespaces, but never the grader's own user: as root, drop to the slot's uid.
                cmd = self._drop_privileges(slot) + argv if self.is_root and self.setpriv else argv
                env = self._env(str(scratch))
                env["PYTHONPATH"] = str(REPO)
                cwd = str(scratch)
                if self.is_root:
                    os.chown(jobdir, BASE_UID + slot, BASE_UID + slot)
            if cgroup is not None and cgroup.ok:
                cmd = cgroup.wrap(cmd)
            err_path = jobdir / "sandbox.err"
            start = time.monotonic()
            with open(err_path, "wb") as err:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env, cwd=cwd,
                                        start_new_session=True, pass_fds=(out_w, in_r))
            os.close(out_w)
            os.close(in_r)
            out_w = in_r = -1
            reader = _Reader(out_r, in_w, job.get("steps", []), session)
            reader.start()
            timed_out = self._watch(proc, reader, cgroup, slot, wall_scale, budget_s)
            returncode = proc.wait()
            self._kill(proc, cgroup, slot)
            reader.join(timeout=10)
            seconds = time.monotonic() - start
            log_tail = _read_tail(err_path, 4000)
            return RunResult(list(reader.progress), returncode, timed_out, seconds, log_tail, reader.error)
        finally:
            for fd in (out_r, out_w, in_r, in_w):
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            if cgroup is not None:
                cgroup.kill_all()
                cgroup.remove()
            shutil.rmtree(jobdir, ignore_errors=True)

    def _cpu(self, cgroup: _Cgroup | None, slot: int) -> float | None:
        if cgroup is not None and cgroup.ok:
            return cgroup.cpu_seconds()
        if self.is_root and self.mode == "bwrap":
            return _uid_cpu_seconds(BASE_UID + slot)
        return None

    def _watch(self, proc, reader: "_Reader", cgroup, slot: int, wall_scale: float, budget_s: float | None) -> str | None:
        limits = self.limits
        started = time.monotonic()
        total = min(limits.total_wall_s, budget_s if budget_s is not None else limits.total_wall_s)
        seen_step, step_started, cpu0 = None, started, self._cpu(cgroup, slot) or 0.0
        while proc.poll() is None:
            time.sleep(0.05)
            now = time.monotonic()
            step = len(reader.progress)
            if step != seen_step:
                seen_step, step_started = step, now
                cpu0 = self._cpu(cgroup, slot) or 0.0
            last = reader.progress[-1] if reader.progress else None
            wall_budget = (limits.start_wall_s if last in (None, "start") else limits.step_wall_s) * wall_scale
            why = None
            if reader.error:
                self._kill(proc, cgroup, slot)
                return None  # the run is over; RunResult.protocol_error says why
            if now - started > total:
                why = "total"
            elif now - step_started > wall_budget:
                why = "wall"
            else:
                cpu = self._cpu(cgroup, slot)
                if cpu is not None and cpu - cpu0 > limits.step_cpu_s and last not in (None, "start"):
                    why = "cpu"
                elif cpu is None and now - step_started > limits.step_cpu_s * wall_scale * 3:
                    why = "wall"  # no CPU accounting here: a wall limit of three times the CPU limit
            if why:
                self._kill(proc, cgroup, slot)
                return why
        return None

    def _kill(self, proc: subprocess.Popen, cgroup, slot: int) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if cgroup is not None and cgroup.ok:
            cgroup.kill_all()
        self._cleanup_uid(slot)

    def _cleanup_uid(self, slot: int) -> None:
        """Kill anything left running as this slot's sandbox user (as root)."""
        if not self.is_root:
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


class _Reader(threading.Thread):
    """Reads the runner's frames: accepts progress only along the planned steps, hands records and
    calls of given functions to the session. Anything malformed ends the reading (the run is lost for
    the exercises that have not been handed in, nothing else)."""

    def __init__(self, out_r: int, in_w: int, steps: list[str], session: Session):
        super().__init__(daemon=True)
        from autograders.engine.protocol import FrameReader

        self.frames = FrameReader(out_r)
        self.in_w = in_w
        self.plan: dict[str, int] = {}
        for i, step in enumerate(steps):
            self.plan.setdefault(step, i)
        self.at = -1
        self.progress: list[str] = []
        self.session = session
        self.error: str | None = None

    def run(self) -> None:
        from autograders.engine.protocol import ProtocolError, write_frame

        try:
            while True:
                header, blobs = self.frames.read()
                kind = header.get("t")
                if kind == "step":
                    # strictly the next step of the plan: a forged step can neither jump ahead nor go back
                    if self.plan.get(header.get("step")) == self.at + 1:
                        self.at += 1
                        self.progress.append(header["step"])
                elif kind == "record":
                    # only while the plan says this exercise is being produced
                    current = self.progress[-1] if self.progress else ""
                    if current == f"produce {header.get('exercise')}":
                        self.session.on_record(header, blobs)
                elif kind == "call":
                    reply, rblobs = self.session.on_call(header, blobs)
                    write_frame(self.in_w, reply, rblobs)
                else:
                    raise ProtocolError(f"unknown message {str(kind)[:40]!r}")
        except EOFError:
            pass
        except (ProtocolError, OSError, ValueError, TypeError) as exc:
            self.error = str(exc)[:200]


def _uid_cpu_seconds(uid: int) -> float:
    """CPU seconds of every live process of ``uid`` (all threads), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(entry.path).st_uid != uid:
                continue
            fields = open(f"{entry.path}/stat").read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / tick


def _read_tail(path: Path, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""
