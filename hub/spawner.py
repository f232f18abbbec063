"""Spawners of the course hub: a Unix uid per student when the hub runs as root, else one shared user.

:class:`CourseSpawner` (hub as root) starts each student's ``jupyterhub-singleuser`` with
``Popen(user=, group=, extra_groups=[])`` under the uid that :mod:`hub.state` allocated for them
(``.hub/uids.json``; gid = uid, no supplementary groups, no /etc/passwd entry needed) -- or, when the
Python installation sits below a folder other users cannot traverse (a pyenv in /root), through
:mod:`hub.launch`, which does the same in a mount namespace that exposes just that -- in a home
``.hub/homes/<name>`` of mode 0700 and with umask 077. The instructor's server runs as the owner of
the course directory, on the course directory (formgrader needs it as its root), with umask 022 so
that what nbgrader releases stays readable.

:class:`SharedUserSpawner` (hub not root) is JupyterHub's SimpleLocalProcessSpawner with the same
homes and configuration: every account runs as the user who started the hub, so students are NOT
isolated from each other or from solutions/ -- for trying the hub out, never for a class.
"""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from jupyterhub.spawner import LocalProcessSpawner, SimpleLocalProcessSpawner
from traitlets import Unicode
from traitlets.config import Configurable

from hub.state import HUB_DIR, HubError, Settings, course_id_of, protect_course, server_mounts

VENV_BIN = Path(sys.executable).parent
NOT_ISOLATED = ("ACCOUNTS ARE NOT ISOLATED: the hub does not run as root, so every user's server runs as "
                "the same Unix user; any student can read the other students' work, solutions/ and the "
                "gradebook. Fine for trying the hub out alone; for a class start it as root (sudo make hub).")


@dataclass(frozen=True)
class Account:
    uid: int
    gid: int
    home: Path
    instructor: bool


class _CourseSpawnerMixin(Configurable):
    """What both spawners share: accounts, homes, environment, the role's configuration."""

    course_dir = Unicode(config=True, help="The nbgrader course directory.")
    state_dir = Unicode(config=True, help="The hub's state folder (.hub/).")
    instructor = Unicode("instructor", config=True, help="The instructor's user name.")
    hub_id = Unicode("", config=True, help="Marks every process of this hub (COURSE_HUB_ID).")

    isolated = True

    @property
    def settings(self) -> Settings:
        return Settings(course_dir=Path(self.course_dir), state_dir=Path(self.state_dir), instructor=self.instructor)

    def account(self) -> Account:
        s = self.settings
        name = self.user.name
        home = s.homes / name
        if name == self.instructor:
            uid, gid = s.owner() if self.isolated else (os.getuid(), os.getgid())
            return Account(uid, gid, home, True)
        if not self.isolated:
            return Account(os.getuid(), os.getgid(), home, False)
        import json

        uids = json.loads(s.uids_file.read_text())
        if name not in uids:
            raise HubError(f"{name} has no uid in {s.uids_file} (not on the roster when the hub started?)")
        return Account(int(uids[name]), int(uids[name]), home, False)

    def prepare_home(self, acct: Account) -> None:
        home = acct.home
        if home.is_symlink():
            raise HubError(f"{home} is a symbolic link")
        if not home.exists():
            home.mkdir(mode=0o700)
            if os.geteuid() == 0:
                os.chown(home, acct.uid, acct.gid)
        st = os.lstat(home)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != acct.uid:
            raise HubError(f"{home} belongs to uid {st.st_uid}, not {self.user.name}'s uid {acct.uid}: "
                           "refusing to give one user another's files")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(home, 0o700)

    def user_env(self, env):
        acct = self._account
        s = self.settings
        role = "instructor" if acct.instructor else "student"
        env.update({
            "USER": self.user.name, "LOGNAME": self.user.name, "HOME": str(acct.home), "SHELL": "/bin/bash",
            "PATH": f"{VENV_BIN}{os.pathsep}/usr/local/bin{os.pathsep}/usr/bin{os.pathsep}/bin",
            # the course's packages (autograders, coursekit, hub) from this course directory
            "PYTHONPATH": str(s.course_dir),
            "JUPYTER_CONFIG_DIR": str(s.config_root / role),
            "JUPYTERLAB_WORKSPACES_DIR": str(acct.home / ".jupyter" / "lab" / "workspaces"),
            "JUPYTERLAB_SETTINGS_DIR": str(acct.home / ".jupyter" / "lab" / "user-settings"),
            "COURSE_EXCHANGE": str(s.exchange),
            "COURSE_ID": course_id_of(s.course_dir),
            "COURSE_DIR": str(s.course_dir),
            "COURSE_HUB_ISOLATED": "1" if self.isolated else "0",
        })
        if acct.instructor and self.isolated:
            env["COURSE_HUB_UIDS"] = str(s.uids_file)  # collect checks who owns each submission
        if self.hub_id:
            env["COURSE_HUB_ID"] = self.hub_id
        return env

    def make_preexec_fn(self, name):
        return None  # Popen(user=, group=, cwd=, umask=) below, no code between fork and exec

    async def start(self):
        if not self.isolated:
            self.log.warning(NOT_ISOLATED)
        acct = self._account = self.account()
        self.prepare_home(acct)
        s = self.settings
        if self.isolated:
            protect_course(s.course_dir, s.state_dir, s.owner())  # again: grading may have created files
        self.notebook_dir = str(s.course_dir if acct.instructor else acct.home)
        umask = 0o022 if acct.instructor else 0o077
        cwd = str(s.course_dir if acct.instructor else acct.home)
        if not hasattr(self, "_server_cmd"):
            self._server_cmd = list(self.cmd)
        self.cmd = list(self._server_cmd)
        kwargs = {"cwd": cwd, "umask": umask}
        if self.isolated and acct.uid != 0:
            plan = server_mounts(s)
            if plan.problems:
                raise HubError(f"{self.user.name}'s server cannot reach {', '.join(plan.problems)}")
            if plan.cover:  # a folder on the way is closed to others: a mount namespace of its own
                self.cmd = [sys.executable, "-I", str(HUB_DIR / "launch.py"), "--uid", str(acct.uid),
                            "--gid", str(acct.gid), "--umask", f"{umask:o}",
                            *[f"--cover={c}" for c in plan.cover], *[f"--expose={e}" for e in plan.expose],
                            *[f"--expose-ro={e}" for e in plan.expose_ro], "--", *self._server_cmd]
                kwargs["umask"] = 0o022
            else:
                kwargs.update(user=acct.uid, group=acct.gid, extra_groups=[])
        self.popen_kwargs = kwargs
        self.default_url = "/lab"
        if acct.uid == 0 and "--ServerApp.allow_root=True" not in self.args:
            self.args = [*self.args, "--ServerApp.allow_root=True"]
        self.log.info("Starting %s's server as uid %d (%s) in %s", self.user.name, acct.uid,
                      "instructor" if acct.instructor else "student", self.notebook_dir)
        return await super().start()


class CourseSpawner(_CourseSpawnerMixin, LocalProcessSpawner):
    """A uid per student without /etc/passwd entries (the hub runs as root)."""

    isolated = True

    async def move_certs(self, paths):  # internal_ssl is off; LocalProcessSpawner's needs pwd entries
        return paths


class SharedUserSpawner(_CourseSpawnerMixin, SimpleLocalProcessSpawner):
    """Every account as the hub's own user (the hub does not run as root): NOT isolated."""

    isolated = False
