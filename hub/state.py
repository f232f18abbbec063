"""The hub's state folder, accounts and the permissions that keep the course's secrets from students.

Everything the hub keeps lives in one git-ignored folder (default ``<course>/.hub/``)::

    .hub/                  0711 (only traversed, never listed, by the students' servers)
      jupyterhub.sqlite    0600  the hub's database
      jupyterhub_cookie_secret, proxy_token   0600
      passwords.txt        0600  "<name> <password>" per account (generated; give each student theirs)
      roster.txt           0600  the class, one user name per line (edit it, restart the hub)
      uids.json            0644  name -> Unix uid of each student (not a secret; collect checks owners)
      homes/<name>/        0700  each user's home, owned by that user's uid
      exchange/            0755  nbgrader's exchange, owned by the instructor (never world-writable)
      config/<role>/       0755  the servers' Jupyter configuration, copied from hub/config/ at start

When the hub runs as root every student gets a Unix uid of their own (no /etc/passwd entry needed)
and :func:`protect_course` makes every top-level entry of the course directory that students do not
need (``solutions/``, ``.git/``, ``tests/``, the gradebook and grading folders, ...) unreadable to them.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import secrets
import shutil
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

HUB_DIR = Path(__file__).resolve().parent
COURSE_DIR = HUB_DIR.parent

# A user name is a JupyterHub name, an nbgrader student id (no "+" or "*") and a plain id of the
# grader (so gradebook ids equal hub names): lower case letters, digits, "_", "-", "." inside.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,31}$")

# What a student's server needs from the course directory (imports, the released chapters, the
# hub's exchange classes and configuration). Every other top-level entry is made private.
PUBLIC = frozenset({".venv", "autograders", "coursekit", "hub", "chapters", "README.md", "pyproject.toml",
                    "requirements.txt", "environment.yml"})
# Grading state that nbgrader or the grader creates later under well-known names: created private
# now, so that what is written into it later is private too.
PRIVATE_DIRS = ("submitted", "autograded", "feedback", "graded")
PRIVATE_FILES = ("gradebook.db",)

# uids the grading sandbox hands to student code; it kills whatever runs under them, so hub accounts
# must never get one.
from autograders.engine.sandbox import SANDBOX_UID_RANGE  # noqa: E402

SANDBOX_UIDS = (SANDBOX_UID_RANGE.start, SANDBOX_UID_RANGE.stop)
DEFAULT_UID_BASE = 400_000


class HubError(RuntimeError):
    """A problem with the hub's set-up, with a message that says what to do."""


@dataclass
class Settings:
    course_dir: Path = COURSE_DIR
    state_dir: Path | None = None
    instructor: str = "instructor"
    roster_file: Path | None = None
    uid_base: int = DEFAULT_UID_BASE
    hub_id: str = ""

    def __post_init__(self):
        self.course_dir = Path(self.course_dir).resolve()
        self.state_dir = Path(self.state_dir or self.course_dir / ".hub").absolute()
        self.roster_file = Path(self.roster_file or self.state_dir / "roster.txt").absolute()
        if not NAME_RE.match(self.instructor):
            raise HubError(f"instructor name {self.instructor!r}: use lower-case letters, digits, '_', '-', '.'")

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ
        return cls(course_dir=Path(env.get("COURSE_DIR") or COURSE_DIR),
                   state_dir=Path(env["COURSE_HUB_STATE"]) if env.get("COURSE_HUB_STATE") else None,
                   instructor=env.get("COURSE_HUB_INSTRUCTOR") or "instructor",
                   roster_file=Path(env["COURSE_HUB_ROSTER"]) if env.get("COURSE_HUB_ROSTER") else None,
                   uid_base=int(env.get("COURSE_HUB_UID_BASE") or DEFAULT_UID_BASE),
                   hub_id=env.get("COURSE_HUB_ID", ""))

    @property
    def isolated(self) -> bool:
        """Per-user uids: only when the hub runs as root."""
        return os.geteuid() == 0

    exchange = property(lambda self: self.state_dir / "exchange")
    homes = property(lambda self: self.state_dir / "homes")
    config_root = property(lambda self: self.state_dir / "config")
    passwords_file = property(lambda self: self.state_dir / "passwords.txt")
    uids_file = property(lambda self: self.state_dir / "uids.json")

    def owner(self) -> tuple[int, int]:
        """uid and gid of the course directory's owner: the instructor's server runs as them."""
        st = os.stat(self.course_dir)
        return st.st_uid, st.st_gid

    def course_id(self) -> str:
        return course_id_of(self.course_dir)


@dataclass
class Prepared:
    settings: Settings
    students: list[str]
    passwords: dict[str, str]
    uids: dict[str, int]
    new_passwords: list[str] = field(default_factory=list)
    created_roster: bool = False
    warnings: list[str] = field(default_factory=list)


def course_id_of(course_dir: Path) -> str:
    text = (Path(course_dir) / "nbgrader_config.py").read_text()
    m = re.search(r"""^c\.CourseDirectory\.course_id\s*=\s*["']([^"']+)["']""", text, re.M)
    if not m:
        raise HubError(f"{course_dir}/nbgrader_config.py sets no c.CourseDirectory.course_id")
    return m.group(1)


# ---------------------------------------------------------------------------------------------
# Files written atomically with their final mode


def write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Write ``text`` to ``path`` through a temporary file created with ``mode`` (never wider)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _ensure_dir(path: Path, mode: int, owner: tuple[int, int] | None = None) -> None:
    if path.is_symlink():
        raise HubError(f"{path} is a symbolic link; the hub's state must be real folders")
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    if owner is not None and os.geteuid() == 0:
        os.chown(path, *owner)
    os.chmod(path, mode)


# ---------------------------------------------------------------------------------------------
# Roster and passwords

ROSTER_HEADER = """# The class: one user name per line (lower-case letters, digits, '_', '-', '.'); '#' comments.
# Restart the hub after editing; new names get a password in passwords.txt.
"""


def read_roster(path: Path, instructor: str) -> list[str]:
    names: list[str] = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        if not NAME_RE.match(name):
            raise HubError(f"{path}:{number}: {name!r} is not a valid user name (lower-case letters, digits, "
                           "'_', '-', '.' inside, at most 32 characters)")
        if name == instructor:
            raise HubError(f"{path}:{number}: {name!r} is the instructor's account, not a student")
        if name in names:
            raise HubError(f"{path}:{number}: {name!r} is listed twice")
        names.append(name)
    return names


def read_passwords(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if not Path(path).exists():
        return out
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#"):
            out[parts[0]] = parts[1]
    return out


def ensure_passwords(path: Path, names: list[str]) -> tuple[dict[str, str], list[str]]:
    """Every name gets a random password (kept across restarts); returns (all, newly generated)."""
    passwords = read_passwords(path)
    new = [n for n in names if n not in passwords]
    for n in new:
        passwords[n] = secrets.token_urlsafe(15)  # 20 characters, 120 bits
    if new or not Path(path).exists():
        lines = ["# Course hub accounts: <name> <password>. Secret: give each student only their own line.\n"]
        lines += [f"{n} {passwords[n]}\n" for n in names] + [f"{n} {p}\n" for n, p in passwords.items()
                                                             if n not in names]
        write_private(Path(path), "".join(lines))
    else:
        os.chmod(path, 0o600)
    return passwords, new


# ---------------------------------------------------------------------------------------------
# Unix ids without /etc/passwd entries


def _ranges(path: str) -> list[tuple[int, int]]:
    out = []
    try:
        for line in Path(path).read_text().splitlines():
            parts = line.strip().split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                out.append((int(parts[1]), int(parts[1]) + int(parts[2])))
    except OSError:
        pass
    return out


def _mapped(uid: int, map_file: str) -> bool:
    """Whether ``uid`` exists in this (possibly user-namespaced) system: /proc/self/uid_map."""
    try:
        lines = Path(map_file).read_text().split("\n")
    except OSError:
        return True
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and int(parts[0]) <= uid < int(parts[0]) + int(parts[2]):
            return True
    return False


def uid_is_free(uid: int) -> bool:
    """Not a user or group of this system, not a subordinate id of a container, not a sandbox uid."""
    try:
        pwd.getpwuid(uid)
        return False
    except KeyError:
        pass
    try:
        grp.getgrgid(uid)
        return False
    except KeyError:
        pass
    reserved = [SANDBOX_UIDS] + _ranges("/etc/subuid") + _ranges("/etc/subgid")
    if any(lo <= uid < hi for lo, hi in reserved):
        return False
    return _mapped(uid, "/proc/self/uid_map") and _mapped(uid, "/proc/self/gid_map")


def ensure_uids(path: Path, names: list[str], base: int) -> dict[str, int]:
    """A stable uid (= gid) per student, allocated once from ``base`` up and kept in ``path``."""
    uids: dict[str, int] = {}
    if Path(path).exists():
        uids = {str(k): int(v) for k, v in json.loads(Path(path).read_text()).items()}
    used = set(uids.values())
    candidate = base
    changed = False
    for name in names:
        if name in uids:
            continue
        while candidate in used or not uid_is_free(candidate):
            candidate += 1
            if candidate >= 2**31 - 2:
                raise HubError("no free uid left above the uid base (set COURSE_HUB_UID_BASE)")
        uids[name] = candidate
        used.add(candidate)
        changed = True
    if changed or not Path(path).exists():
        write_private(Path(path), json.dumps(uids, indent=1, sort_keys=True) + "\n", mode=0o644)
    return uids


# ---------------------------------------------------------------------------------------------
# The course directory


def protect_course(course_dir: Path, state_dir: Path, owner: tuple[int, int]) -> list[str]:
    """Make the course's secrets unreadable to the students' uids. Returns what was changed.

    Creates the grading state (``submitted/`` ... ``graded/``: 0700; ``gradebook.db``: 0600, empty,
    which sqlite and nbgrader take as a new database) owned by the course owner when missing; takes
    every permission for "others" away from each top-level entry that is not in :data:`PUBLIC`
    (group bits are left alone: student uids have private groups); and lets others read and traverse
    the course directory itself (``import`` lists it), not write to it. Symbolic links are never followed.
    """
    course_dir = Path(course_dir)
    changed: list[str] = []
    for name in PRIVATE_DIRS:
        path = course_dir / name
        if not os.path.lexists(path):
            path.mkdir(mode=0o700)
            os.chown(path, *owner)
            changed.append(f"created {name}/ (0700)")
    for name in PRIVATE_FILES:
        path = course_dir / name
        if not os.path.lexists(path):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.chown(path, *owner)
            changed.append(f"created {name} (0600)")
    state = Path(state_dir).absolute()
    for entry in os.scandir(course_dir):
        path = Path(entry.path)
        if entry.name in PUBLIC or path.absolute() == state:
            continue
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            continue
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o007:
            os.chmod(path, mode & ~0o007)
            changed.append(f"{entry.name}: {mode:04o} -> {mode & ~0o007:04o}")
    mode = stat.S_IMODE(os.stat(course_dir).st_mode)
    want = (mode & ~0o002) | 0o005  # Python's import system lists the folder: it must stay readable
    if want != mode:
        os.chmod(course_dir, want)
        changed.append(f"course directory: {mode:04o} -> {want:04o}")
    return changed


@dataclass
class MountPlan:
    """What :mod:`hub.launch` must do so that a user reaches ``needed`` paths (see there)."""

    cover: list[str] = field(default_factory=list)
    expose: list[str] = field(default_factory=list)
    expose_ro: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def mount_plan(read_only: list[Path], read_write: list[Path]) -> MountPlan:
    """For each path below a folder that others cannot traverse: cover the top-most such folder and
    expose the path. A path that others cannot traverse itself cannot be fixed that way: a problem."""
    plan = MountPlan()
    for ro, paths in ((True, read_only), (False, read_write)):
        for path in paths:
            path = Path(path).resolve()
            if not path.exists():
                continue
            blocked = [p for p in reversed(path.parents) if not os.stat(p).st_mode & stat.S_IXOTH]
            if not os.stat(path).st_mode & stat.S_IXOTH:
                plan.problems.append(f"{path} (mode {stat.S_IMODE(os.stat(path).st_mode):04o})")
            if not blocked:
                continue
            top = str(blocked[0])
            if not any(top == c or top.startswith(c.rstrip("/") + "/") for c in plan.cover):
                plan.cover = [c for c in plan.cover if not c.startswith(top.rstrip("/") + "/")] + [top]
            target = plan.expose_ro if ro else plan.expose
            if str(path) not in plan.expose + plan.expose_ro:
                target.append(str(path))
    return plan


def server_mounts(settings: Settings) -> MountPlan:
    """The paths every user's server needs: the Python installation and environment (read-only), the
    course directory and the state folder."""
    return mount_plan([Path(sys.base_prefix), Path(sys.prefix)], [settings.course_dir, settings.state_dir])


def install_configs(settings: Settings) -> None:
    """Copy hub/config/<role>/ to <state>/config/<role>/: read-only to the users, outside the repository
    (Jupyter writes a few files into its configuration folder; students must not edit theirs)."""
    root = settings.config_root
    _ensure_dir(root, 0o755)
    for role in ("student", "instructor"):
        dest = root / role
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(HUB_DIR / "config" / role, dest, ignore=shutil.ignore_patterns("__pycache__"))
        for dirpath, dirnames, filenames in os.walk(dest):
            os.chmod(dirpath, 0o755)
            for f in filenames:
                os.chmod(os.path.join(dirpath, f), 0o644)
        # jupyter_core migrates IPython-3 config unless this marker exists (and would write it here)
        (dest / "migrated").write_text("course hub\n")
        os.chmod(dest / "migrated", 0o644)


def prepare(settings: Settings) -> Prepared:
    """Create or update the state folder; idempotent (run at every start of the hub)."""
    s = settings
    owner = s.owner() if s.isolated else (os.getuid(), os.getgid())
    warnings: list[str] = []
    _ensure_dir(s.state_dir, 0o711)
    _ensure_dir(s.homes, 0o711)
    _ensure_dir(s.exchange, 0o755, owner)
    created_roster = False
    if not s.roster_file.exists():
        write_private(s.roster_file, ROSTER_HEADER + "student1\nstudent2\n")
        created_roster = True
    students = read_roster(s.roster_file, s.instructor)
    passwords, new = ensure_passwords(s.passwords_file, [s.instructor, *students])
    uids = ensure_uids(s.uids_file, students, s.uid_base) if s.isolated else {}
    install_configs(s)
    if s.isolated:
        if owner[0] == 0:
            warnings.append(f"the course directory {s.course_dir} is owned by root, so the instructor's server "
                            "runs as root; clone the course as an ordinary user and start the hub with sudo")
        changed = protect_course(s.course_dir, s.state_dir, owner)
        if changed:
            warnings.append("made private to students: " + "; ".join(changed))
        plan = server_mounts(s)
        if plan.problems:
            raise HubError("students' servers could not start: other users cannot traverse "
                           + ", ".join(sorted(set(plan.problems))) + ". Run `chmod o+x` on these folders "
                           "or move the course (and its .venv) to a path every user can reach.")
        if plan.cover:
            warnings.append(f"{', '.join(plan.cover)} cannot be traversed by other users: each student's server "
                            f"runs in a mount namespace where only {', '.join(plan.expose_ro + plan.expose)} "
                            "is visible inside it (hub/launch.py)")
    return Prepared(s, students, passwords, uids, new, created_roster, warnings)
