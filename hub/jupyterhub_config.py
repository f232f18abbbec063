"""JupyterHub configuration of the course on one machine. Start it with `make hub` (tools/hub.py), which
sets the COURSE_* variables below; `jupyterhub -f hub/jupyterhub_config.py` run from the course
directory works too (with the defaults).

    COURSE_DIR            the nbgrader course directory (default: this repository)
    COURSE_HUB_STATE      state folder (default: <course>/.hub; git-ignored)
    COURSE_HUB_PORT       public port of the proxy, on 127.0.0.1 (default 8000)
    COURSE_HUB_API_PORT   the proxy's REST API (default 8001); COURSE_HUB_INTERNAL_PORT the hub (8081)
    COURSE_HUB_INSTRUCTOR the instructor's user name (default: instructor)
    COURSE_HUB_ROSTER     the class, one name per line (default: <state>/roster.txt)
    COURSE_HUB_UID_BASE   first uid for students when running as root (default 400000)
"""

import os
import sys
from pathlib import Path

c = get_config()  # noqa: F821 (provided by JupyterHub)

_course = Path(os.environ.get("COURSE_DIR") or Path(__file__).resolve().parents[1])
if str(_course) not in sys.path:
    sys.path.insert(0, str(_course))

from hub.spawner import NOT_ISOLATED  # noqa: E402
from hub.state import Settings, prepare  # noqa: E402

settings = Settings.from_env()
prepared = prepare(settings)
state = settings.state_dir
bin_dir = Path(sys.executable).parent
host = "127.0.0.1"
port = int(os.environ.get("COURSE_HUB_PORT") or 8000)

# --- network: everything on the loopback interface; the pure-Python configurable-http-proxy (pinned)
c.JupyterHub.bind_url = f"http://{host}:{port}/"
c.JupyterHub.hub_ip = host
c.JupyterHub.hub_port = int(os.environ.get("COURSE_HUB_INTERNAL_PORT") or 8081)
c.JupyterHub.proxy_class = "configurable-http-proxy"
c.ConfigurableHTTPProxy.command = [str(bin_dir / "configurable-http-proxy")]
c.ConfigurableHTTPProxy.api_url = f"http://{host}:{int(os.environ.get('COURSE_HUB_API_PORT') or 8001)}"
c.ConfigurableHTTPProxy.pid_file = str(state / "proxy.pid")
c.ConfigurableHTTPProxy.should_start = True
c.Spawner.ip = host

# --- state and secrets in the state folder (0600 files in a 0711 folder)
c.JupyterHub.db_url = f"sqlite:///{state / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(state / "jupyterhub_cookie_secret")
c.JupyterHub.pid_file = str(state / "jupyterhub.pid")
c.JupyterHub.cleanup_servers = True  # stopping the hub stops every server it started
c.JupyterHub.cleanup_proxy = True

# --- accounts: the instructor (admin) and the roster, a generated password each (hub/auth.py)
c.JupyterHub.authenticator_class = "hub.auth.RosterAuthenticator"
c.RosterAuthenticator.password_file = str(settings.passwords_file)
c.Authenticator.admin_users = {settings.instructor}
c.Authenticator.allowed_users = set(prepared.students)
c.Authenticator.allow_existing_users = False  # a name taken off the roster can no longer log in

# --- servers: JupyterLab; a uid per student when the hub runs as root (hub/spawner.py)
c.JupyterHub.spawner_class = "hub.spawner.CourseSpawner" if settings.isolated else "hub.spawner.SharedUserSpawner"
for cls in ("CourseSpawner", "SharedUserSpawner"):
    getattr(c, cls).course_dir = str(settings.course_dir)
    getattr(c, cls).state_dir = str(state)
    getattr(c, cls).instructor = settings.instructor
    getattr(c, cls).hub_id = settings.hub_id
c.Spawner.cmd = [str(bin_dir / "jupyterhub-singleuser")]
c.Spawner.default_url = "/lab"
c.Spawner.start_timeout = 180  # a loaded 2-core machine needs a while to import JupyterLab
c.Spawner.http_timeout = 120
c.Spawner.env_keep = ["LANG", "LC_ALL"]  # the spawner sets PATH, PYTHONPATH, HOME and the course's variables

if not settings.isolated:
    print("\n" + "!" * 100 + "\n" + NOT_ISOLATED + "\n" + "!" * 100 + "\n", file=sys.stderr)
