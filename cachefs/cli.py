"""The ``cachefs`` command (and ``mount.py``): argument parsing and sub-commands.

Owns: the command-line names and their defaults. Talks to a running mount only through
its ``.cachefs/`` files and to the kernel through ``fusermount3``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import __version__
from .address import RemoteAddress, parse_remote
from .remote import ConnectOptions

DEFAULT_TIMEOUT = 10.0


def default_cache_dir(address: RemoteAddress) -> Path:
    """One folder per remote under $XDG_CACHE_HOME/cachefs (or ~/.cache/cachefs)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    text = address.display()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text.split("://", 1)[-1]).strip("_")[:60]
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return Path(base) / "cachefs" / f"{slug}-{digest}"


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def add_mount_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("remote", metavar="REMOTE",
                   help="sftp://[user@]host[:port]/path, [user@]host:path, file:///path, or a directory")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing empty directory")
    p.add_argument("--cache-dir", metavar="DIR", type=Path,
                   help="where the cache lives (default: one folder per remote under "
                        "$XDG_CACHE_HOME/cachefs/, or ~/.cache/cachefs/; mode 0700)")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay attached and log to stderr (default: detach once mounted)")
    p.add_argument("--identity", metavar="FILE", type=Path,
                   help="SSH private key (default: ssh-agent and ~/.ssh/config as ssh uses them)")
    p.add_argument("--known-hosts", metavar="FILE", type=Path,
                   help="known_hosts file to verify the server (default: ~/.ssh/known_hosts)")
    p.add_argument("--accept-new-host-key", action="store_true",
                   help="record an unknown host key, like StrictHostKeyChecking=accept-new "
                        "(a changed key is always refused)")
    p.add_argument("-p", "--port", type=int, metavar="N", help="SSH port (default: 22 or ~/.ssh/config)")
    p.add_argument("--timeout", type=_positive, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="how long a remote operation may take before the remote counts as "
                        f"unreachable (default: {DEFAULT_TIMEOUT:g})")
    p.add_argument("--attr-timeout", type=_positive, default=3.0, metavar="SECONDS",
                   help="how long attributes and listings are trusted before they are "
                        "checked against the remote (default: 3)")
    p.add_argument("--heartbeat", type=_positive, default=10.0, metavar="SECONDS",
                   help="how often an idle mount checks that the remote still answers (default: 10)")
    p.add_argument("--connections", type=int, default=4, metavar="N",
                   help="SSH connections used in parallel (default: 4)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.add_argument("-o", dest="fuse_options", action="append", default=[], metavar="OPTIONS",
                   help="FUSE mount options, comma separated (e.g. allow_other)")


def cmd_mount(args: argparse.Namespace) -> int:
    from .daemon import MountConfig, MountError, run

    try:
        address = parse_remote(args.remote, port=args.port)
    except ValueError as exc:
        return _fail(f"bad REMOTE {args.remote!r}: {exc}")
    if args.connections < 1:
        return _fail("--connections must be at least 1")
    cache_dir = (args.cache_dir or default_cache_dir(address)).expanduser().absolute()
    config = MountConfig(
        address=address,
        mountpoint=Path(args.mountpoint).expanduser().absolute(),
        cache_dir=cache_dir,
        connect=ConnectOptions(
            timeout=args.timeout,
            identity=args.identity.expanduser() if args.identity else None,
            known_hosts=args.known_hosts.expanduser() if args.known_hosts else None,
            accept_new_host_key=args.accept_new_host_key,
            connections=args.connections,
        ),
        foreground=args.foreground,
        verbose=args.verbose,
        attr_timeout=args.attr_timeout,
        heartbeat=args.heartbeat,
        fuse_options=args.fuse_options,
    )
    try:
        return run(config)
    except MountError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 130


def find_mount_root(path: Path) -> Path:
    """The cachefs mount point that holds ``path`` (a mount point or a path inside one)."""
    path = path.expanduser().absolute()
    for candidate in [path, *path.parents]:
        if (candidate / ".cachefs" / "status").exists() and os.path.ismount(candidate):
            return candidate
    raise SystemExit(f"cachefs: {path} is not inside a cachefs mount")


def read_status(root: Path) -> dict:
    return json.loads((root / ".cachefs" / "status").read_text())


def cmd_unmount(args: argparse.Namespace) -> int:
    mountpoint = Path(args.mountpoint).expanduser().absolute()
    if not os.path.ismount(mountpoint):
        return _fail(f"{mountpoint} is not mounted")
    pid = None
    try:
        pid = int(read_status(mountpoint)["pid"])
    except (OSError, ValueError, KeyError):
        pass  # a stale mount whose process is gone: still unmount it
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", str(mountpoint)] if tool else ["umount", str(mountpoint)]
    if args.lazy and tool:
        cmd.insert(2, "-z")
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        return _fail(f"cannot unmount {mountpoint}: {result.stderr.strip() or result.stdout.strip()}")
    if pid is not None:
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            return _fail(f"unmounted, but the mount process {pid} is still running after {args.wait:g} s")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    root = find_mount_root(Path(args.path))
    status = read_status(root)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    width = max(len(k) for k in status)
    for key, value in status.items():
        print(f"{key:<{width}}  {value if value is not None else '-'}")
    return 0


def _fail(message: str) -> int:
    print(f"cachefs: {message}", file=sys.stderr)
    return 1


def build_parser(prog: str = "cachefs") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Mount a network folder (SFTP or any directory) with a persistent "
                               "cache that keeps working offline.")
    parser.add_argument("--version", action="version", version=f"cachefs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("mount", help="mount a remote folder", description="Mount REMOTE on MOUNTPOINT.")
    add_mount_arguments(p)
    p.set_defaults(func=cmd_mount)

    p = sub.add_parser("unmount", aliases=["umount"], help="unmount cleanly",
                       description="Unmount a cachefs mount and wait for its process to finish.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("-z", "--lazy", action="store_true", help="detach even if the mount is busy")
    p.add_argument("--wait", type=_positive, default=60.0, metavar="SECONDS",
                   help="how long to wait for the mount process to finish (default: 60)")
    p.set_defaults(func=cmd_unmount)

    p = sub.add_parser("status", help="show the state of a mount",
                       description="Show the state of the mount holding PATH.")
    p.add_argument("path", metavar="PATH", nargs="?", default=".",
                   help="the mount point or a path inside it (default: the current folder)")
    p.add_argument("--json", action="store_true", help="print the raw JSON status")
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def mount_main(argv: list[str] | None = None) -> int:
    """``python mount.py REMOTE MOUNTPOINT [options]``: the same as ``cachefs mount``."""
    parser = argparse.ArgumentParser(prog="mount.py", description="Mount REMOTE on MOUNTPOINT "
                                     "(the same as 'cachefs mount').")
    add_mount_arguments(parser)
    return cmd_mount(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
