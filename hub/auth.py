"""Log-in for the course hub: one generated password per account, read from the state folder.

Why not JupyterHub's SharedPasswordAuthenticator (one class password)? With a shared password any
student can log in *as any other student* (its documentation says so), which would make the per-user
Unix accounts of the spawner pointless: a student could fetch, edit and submit in a classmate's name.
A password per student costs the instructor one file to hand out (``.hub/passwords.txt``, mode 0600).
"""

from __future__ import annotations

from hmac import compare_digest
from pathlib import Path

from jupyterhub.auth import Authenticator
from traitlets import Unicode

from hub.state import read_passwords


class RosterAuthenticator(Authenticator):
    """Accounts and passwords from ``password_file`` (``<name> <password>`` lines); who may log in is
    ``allowed_users`` (the roster) and ``admin_users`` (the instructor), set by hub/jupyterhub_config.py."""

    password_file = Unicode(config=True, help="File of '<name> <password>' lines (mode 0600).")

    async def authenticate(self, handler, data):
        name = self.normalize_username(str(data.get("username", "")))
        password = str(data.get("password", ""))
        # read at every log-in: a password changed in the file takes effect without a restart
        expected = read_passwords(Path(self.password_file)).get(name)
        if not expected or not password:
            return None
        if not compare_digest(password.encode(), expected.encode()):
            return None
        return {"name": name, "admin": name in self.admin_users}
