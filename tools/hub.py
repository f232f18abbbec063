"""Start the course's JupyterHub on this machine (`make hub`): instructor with formgrader, students with
the Assignment List, nbgrader's exchange for the course, everything on 127.0.0.1. See hub/README.md.

    python tools/hub.py [--port 8000] [--roster FILE] [--instructor NAME] [--state DIR]

Run it as root (sudo make hub) for a class: every student then gets a Unix uid of their own. Without
root it still starts, with one shared user and a loud warning. Ctrl-C stops the hub, the proxy and
every server it started.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hub.state import HubError, Settings, prepare  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    env = os.environ
    p = argparse.ArgumentParser(prog="python tools/hub.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=int(env.get("HUB_PORT", 8000)),
                   help="public port on 127.0.0.1 (default 8000, or $HUB_PORT)")
    p.add_argument("--api-port", type=int, help="the proxy's API port (default: port + 1)")
    p.add_argument("--hub-port", type=int, help="the hub's internal port (default 8081, or port + 81)")
    p.add_argument("--roster", type=Path, default=env.get("HUB_ROSTER") or None,
                   help="the class, one user name per line (default: <state>/roster.txt, created with two "
                        "example students on first start)")
    p.add_argument("--instructor", default=env.get("HUB_INSTRUCTOR", "instructor"))
    p.add_argument("--state", type=Path, default=env.get("HUB_STATE") or None,
                   help="state folder (default: .hub/ in the course directory)")
    p.add_argument("--course-dir", type=Path, default=ROOT)
    args = p.parse_args(argv)
    api_port = args.api_port or args.port + 1
    hub_port = args.hub_port or (8081 if args.port == 8000 else args.port + 81)
    try:
        settings = Settings(course_dir=args.course_dir, state_dir=args.state, instructor=args.instructor,
                            roster_file=args.roster, uid_base=int(env.get("COURSE_HUB_UID_BASE") or 400_000),
                            hub_id=env.get("COURSE_HUB_ID") or secrets.token_hex(8))
        os.umask(0o077)  # the hub's own files (database, secrets, logs) are private
        prepared = prepare(settings)
    except (HubError, OSError) as exc:
        print(f"hub: {exc}", file=sys.stderr)
        return 2
    child_env = {**env, "COURSE_DIR": str(settings.course_dir), "COURSE_HUB_STATE": str(settings.state_dir),
                 "COURSE_HUB_PORT": str(args.port), "COURSE_HUB_API_PORT": str(api_port),
                 "COURSE_HUB_INTERNAL_PORT": str(hub_port), "COURSE_HUB_INSTRUCTOR": settings.instructor,
                 "COURSE_HUB_ROSTER": str(settings.roster_file), "COURSE_HUB_UID_BASE": str(settings.uid_base),
                 "COURSE_HUB_ID": settings.hub_id,
                 "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    pw = prepared.passwords
    lines = [f"Course hub: http://127.0.0.1:{args.port}/  (course {settings.course_id()}, "
             f"state in {settings.state_dir})",
             f"  instructor: {settings.instructor}  password: {pw[settings.instructor]}  (formgrader: "
             f"http://127.0.0.1:{args.port}/user/{settings.instructor}/formgrader)",
             f"  students ({len(prepared.students)}, from {settings.roster_file}): passwords in "
             f"{settings.passwords_file} (mode 0600; give each student their own line)"]
    if prepared.created_roster:
        lines.append(f"  created {settings.roster_file} with two example students: put your class in it and restart")
    if prepared.new_passwords:
        lines.append(f"  new passwords generated for: {', '.join(prepared.new_passwords)}")
    lines.append("  isolation: " + ("a Unix uid per student (the hub runs as root)" if settings.isolated else
                                    "NONE -- not root, every account runs as the same user"))
    lines += [f"  note: {w}" for w in prepared.warnings]
    print("\n".join(lines), flush=True)
    jupyterhub = Path(sys.executable).parent / "jupyterhub"
    os.chdir(settings.state_dir)
    os.execve(str(jupyterhub), [str(jupyterhub), "-f", str(ROOT / "hub" / "jupyterhub_config.py")], child_env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
