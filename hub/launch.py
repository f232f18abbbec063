"""Start a user's server under their uid in a private mount namespace (Linux, run as root by the spawner).

    python -I hub/launch.py --uid U --gid G --umask 077 [--cover DIR]... [--expose PATH]... [--expose-ro PATH]...
                            -- COMMAND ARGS...

Used only when something the server needs (the Python installation, the virtual environment, the
course) sits below a folder that other users cannot traverse -- e.g. a pyenv Python in ``/root``
(mode 0700). In a mount namespace of its own, each ``--cover`` folder is hidden under an empty tmpfs
and each ``--expose`` path inside it is bound back (``--expose-ro``: read-only), so the user reaches
exactly those paths and nothing else of the covered folder; file permissions apply as usual.
Then the supplementary groups, gid and uid are dropped and COMMAND is exec'd (same pid, so the hub's
signals reach the server itself). Only the standard library: ``-I`` ignores PYTHONPATH.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(libc, source, target, fstype, flags, data=None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    _check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="hub/launch.py")
    p.add_argument("--uid", type=int, required=True)
    p.add_argument("--gid", type=int, required=True)
    p.add_argument("--umask", type=lambda s: int(s, 8), default=0o077)
    p.add_argument("--cover", action="append", default=[])
    p.add_argument("--expose", action="append", default=[])
    p.add_argument("--expose-ro", action="append", default=[])
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command")
    if os.geteuid() != 0:
        p.error("must run as root")
    if args.cover:
        libc = _libc()
        _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)  # nothing propagates back to the host
        exposed = [(path, False) for path in args.expose] + [(path, True) for path in args.expose_ro]
        # open every exposed path before the covers hide it; bind it back from the descriptor
        fds = [(path, ro, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path, ro in exposed]
        for folder in args.cover:
            _mount(libc, "tmpfs", folder, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        os.umask(0o022)  # the folders made in the tmpfs on the way to an exposed path: traversable
        for path, ro, fd in sorted(fds, key=lambda x: len(x[0])):
            os.makedirs(path, exist_ok=True)
            _mount(libc, f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            if ro:
                _mount(libc, None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
            os.close(fd)
    os.setgroups([])
    os.setgid(args.gid)
    os.setuid(args.uid)
    if os.getuid() != args.uid or os.geteuid() != args.uid:
        raise SystemExit("could not drop privileges")
    os.umask(args.umask)
    os.execvp(command[0], command)


if __name__ == "__main__":
    try:
        main()
    except OSError as exc:
        print(f"hub/launch.py: {exc}", file=sys.stderr)
        sys.exit(126)
