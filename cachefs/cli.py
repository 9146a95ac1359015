"""The ``cachefs`` command (and ``mount.py``): argument parsing and sub-commands.

Owns: the command-line names and their defaults. Talks to a running mount only through
its ``.cachefs/`` files and to the kernel through ``fusermount3``.
"""

from __future__ import annotations

import argparse
import errno
import getpass
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from . import __version__, caches, mounts, registry
from .address import RemoteAddress, parse_remote
from .defaults import DEFAULT_CACHE_SIZE, DEFAULT_WRITEBACK_HOLD, parse_size
from .mounts import DEFAULT_READAHEAD, DEFAULT_REQUEST_SPIN
from .owners import OWNERS, MapError, Owners, make_owners
from .progress import ProgressView, human_bytes
from .remote import ConnectOptions, handler_for
from .remote.watch import WATCHERS

DEFAULT_TIMEOUT = 10.0


def default_cache_dir(address: RemoteAddress) -> Path:
    """One folder per remote under $XDG_CACHE_HOME/cachefs (or ~/.cache/cachefs)."""
    text = address.display()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text.split("://", 1)[-1]).strip("_")[:60]
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return caches.cache_base() / f"{slug}-{digest}"


#: the longest time an option takes: longer is no use and overflows socket timeouts
MAX_SECONDS = 7 * 24 * 3600
MAX_CONNECTIONS = 64  # each one an SSH connection and, beyond the first, a process


def _positive(text: str) -> float:
    """A time in seconds: a finite number above 0, at most a week (``inf`` and ``nan``
    are refused here: ``float()`` takes them, and an infinite timeout ends the mount)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= MAX_SECONDS:  # false for nan too
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds above 0 and at most {MAX_SECONDS} (a week), not {text}")
    return value


def _microseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of microseconds: {text!r}") from None
    if not 0 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"must be 0 to 10000 microseconds, not {text}")
    return value


def _integer(low: int, high: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be {low} to {high}, not {text}")
        return value
    parse.__name__ = what  # argparse names the type in some messages
    return parse


_port = _integer(1, 65535, "a port")
_connections = _integer(1, MAX_CONNECTIONS, "connections")


def add_mount_arguments(p: argparse.ArgumentParser, share_names: bool = True) -> None:
    """``cachefs mount``'s arguments (``share_names``: REMOTE may be a registered share's
    NAME, and MOUNTPOINT is then optional; ``cachefs add`` takes both, always)."""
    if share_names:
        p.add_argument("remote", metavar="REMOTE",
                       help="sftp://[user@]host[:port]/path, [user@]host:path, "
                            "smb://[user@]host[:port]/share/path, dav:// or davs://[user@]host[:port]/path, "
                            "file:///path, a directory, or the NAME of a share registered with 'cachefs add'")
        p.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?",
                       help="an existing empty directory (see --nonempty; default for a NAME: "
                            "its registered one)")
    else:
        p.add_argument("remote", metavar="REMOTE",
                       help="sftp://[user@]host[:port]/path, [user@]host:path, "
                            "smb://[user@]host[:port]/share/path, dav:// or davs://[user@]host[:port]/path, "
                            "file:///path, or a directory")
        p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing empty directory (see --nonempty)")
    p.add_argument("--cache-dir", metavar="DIR", type=Path,
                   help="where the cache lives (default: one folder per remote under "
                        "$XDG_CACHE_HOME/cachefs/, or ~/.cache/cachefs/; mode 0700)")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay attached and log to stderr (default: detach once mounted)")
    p.add_argument("--nonempty", action="store_true",
                   help="mount over a folder that is not empty, hiding its files while mounted "
                        "(refused otherwise, as sshfs does); -o nonempty in fstab")
    p.add_argument("--identity", metavar="FILE", type=Path,
                   help="SSH private key (default: ssh-agent and ~/.ssh/config as ssh uses them)")
    p.add_argument("--known-hosts", metavar="FILE", type=Path,
                   help="known_hosts file to verify the server (default: ~/.ssh/known_hosts)")
    p.add_argument("--accept-new-host-key", action="store_true",
                   help="record an unknown host key, like StrictHostKeyChecking=accept-new "
                        "(a changed key is always refused)")
    p.add_argument("-p", "--port", type=_port, metavar="N", help="SSH port (default: 22 or ~/.ssh/config)")
    _add_login_arguments(p)
    p.add_argument("--timeout", type=_positive, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="how long a remote operation may take before the remote counts as "
                        f"unreachable (default: {DEFAULT_TIMEOUT:g})")
    p.add_argument("--attr-timeout", type=_positive, default=3.0, metavar="SECONDS",
                   help="how long attributes and listings are trusted before they are "
                        "checked against the remote (default: 3)")
    p.add_argument("--heartbeat", type=_positive, default=10.0, metavar="SECONDS",
                   help="how often an idle mount checks that the remote still answers (default: 10)")
    p.add_argument("--connections", type=_connections, default=4, metavar="N",
                   help=f"transfers side by side, 1 to {MAX_CONNECTIONS} (default: 4): SSH connections; "
                        "HTTP connections and threads (dav://); threads on one connection, at least 4 (smb://)")
    p.add_argument("--cache-size", type=_cache_size, default=DEFAULT_CACHE_SIZE, metavar="SIZE",
                   help="content kept in the cache before the least recently used clean, "
                        "unpinned files are evicted, e.g. 500M, 20G; at least 1M (default: 10G)")
    p.add_argument("--readahead", type=_readahead, default=DEFAULT_READAHEAD, metavar="SIZE",
                   help="kernel readahead of the mount, e.g. 128K, 4M: larger means fewer, "
                        "larger reads through FUSE; 4K to 1G (set when allowed: root; default: 1M)")
    p.add_argument("--sync-interval", type=_positive, default=300.0, metavar="SECONDS",
                   help="how often a full sync runs (pinned folders refreshed, pending "
                        "changes replayed) besides on change and on reconnect (default: 300)")
    add_schedule_arguments(p)
    p.add_argument("--write-back-hold", type=_positive, default=DEFAULT_WRITEBACK_HOLD,
                   metavar="SECONDS",
                   help="the longest a burst of changes (an untar, a build, git) holds its "
                        "write-back back so that it runs with the CPU to itself; changes are "
                        "otherwise sent 0.2 s after they stop coming (default: 5)")
    p.add_argument("--upload-limit", type=_upload_limit, default=None, metavar="RATE",
                   help="the most the write-back may send a second, all uploads together: bytes "
                        "with a unit K, M, G (powers of 1024; e.g. 512K, 2M), or bits with "
                        "kbit, Mbit, Gbit (powers of 1000; e.g. 8Mbit); default: no cap (uploads "
                        "still keep the queue they make on the link short, so that reads are "
                        "not held up behind them)")
    p.add_argument("--no-passthrough", dest="passthrough", action="store_false",
                   help="serve every read through this process, never letting the kernel read "
                        "whole cached files of 1 MiB or more straight from the cache (FUSE "
                        "passthrough: needs Linux 6.9+, root, and the pyfuse3 that "
                        "scripts/build-passthrough builds; used by default where it works)")
    p.add_argument("--callbacks", choices=("auto", *WATCHERS, "off"), default="auto",
                   help="run a watcher on the SSH server (inotifywait, or a short python3 script) "
                        "that tells the mount each change there, so that cached listings and "
                        "attributes are used without checks while it runs; 'off' never runs a "
                        "command for it; local folders are watched here (default: auto, the "
                        "first the server has)")
    p.add_argument("--no-remote-hash", dest="remote_hash", action="store_false",
                   help="never run sha256sum on the SSH server (over an exec channel) to see "
                        "whether a file changed there although its size and mtime did not, "
                        "before an upload replaces it (for servers whose logs or policy object "
                        "to commands; used by default where the server runs it)")
    p.add_argument("--request-spin", type=_microseconds, default=DEFAULT_REQUEST_SPIN,
                   metavar="MICROSECONDS",
                   help="how long the mount keeps reading for the next request after each one "
                        "before it sleeps: a program that waits for each reply (git, tar, a "
                        "build) is then answered without waking this process; costs CPU only "
                        "while requests come; 0 turns it off (needs the pyfuse3 that "
                        "scripts/build-passthrough builds; default: %(default)g)")
    p.add_argument("--no-notify", dest="notify", action="store_false",
                   help="send no desktop notifications (sent by default where a session D-Bus "
                        "runs: a new conflict, the server lost and found again, a sync that fails)")
    p.add_argument("--show-cachefs", action="store_true",
                   help="list the mount's .cachefs folder in the listing of the mount's root "
                        "(by default it is reached by name only, so that tar, rsync, cp -a, "
                        "find and file indexers of the mount see the share alone)")
    p.add_argument("--encrypt-cache", action="store_true",
                   help="keep the cache encrypted at rest (AES-256-GCM; content and names); the "
                        "key comes from --cache-key-file, or the passphrase in "
                        "$CACHEFS_CACHE_PASSPHRASE, or is asked on the terminal")
    p.add_argument("--cache-key-file", metavar="FILE", type=Path,
                   help="a file whose content is the cache key (implies --encrypt-cache)")
    p.add_argument("--owners", choices=OWNERS, default="local",
                   help="whose files the mount shows: 'local', every file the mounting user's "
                        "(a change of owner refused); 'remote', the server's owners (numbers, "
                        "or mapped by --uid-map/--gid-map), chown and chgrp replayed onto the "
                        "server, new files the creating user's: for a root mount serving "
                        "several users (-o allow_other,default_permissions); default: local")
    p.add_argument("--uid-map", metavar="FILE", type=Path,
                   help="with --owners remote: lines 'localuser:remoteuid' (sshfs's uidfile); "
                        "ids not in it are shown as they are")
    p.add_argument("--gid-map", metavar="FILE", type=Path,
                   help="with --owners remote: lines 'localgroup:remotegid' (sshfs's gidfile)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log debug messages; for an encrypted cache also the names of files, "
                        "folders and the remote, which its log otherwise leaves out")
    p.add_argument("-o", dest="fuse_options", action="append", default=[], metavar="OPTIONS",
                   help="FUSE mount options, comma separated (e.g. allow_other)")


#: how long an unmount replays pending changes before the mount ends (Sync Center's "at log off")
DEFAULT_UNMOUNT_SYNC = 30.0


def add_schedule_arguments(p: argparse.ArgumentParser) -> None:
    """The sync schedule besides --sync-interval (Sync Center's "at log on", "at log off",
    "when idle"), and pins applied at mount: options of their own, so that they work with
    and without the registry of shares."""
    p.add_argument("--sync-at-mount", action="store_true",
                   help="run a full sync as soon as the mount is up, if it is online")
    p.add_argument("--sync-at-unmount", type=_seconds_or_off, default=DEFAULT_UNMOUNT_SYNC,
                   metavar="SECONDS",
                   help="at unmount, replay pending changes for at most SECONDS before the mount "
                        "ends; 0 leaves them for the next mount (default: %(default)g)")
    p.add_argument("--sync-idle", type=_positive, default=None, metavar="SECONDS",
                   help="run a full sync once no program has opened a file or folder of the "
                        "mount for SECONDS (once per quiet spell; default: off)")
    p.add_argument("--pin", dest="pins", action="append", default=[], metavar="PATH",
                   help="keep PATH (relative to the mount point) pinned: pinned in the "
                        "background once the mount is up; may be repeated")


def _seconds_or_off(text: str) -> float:
    """0 (off), or a time in seconds as ``_positive`` takes it."""
    try:
        if float(text) == 0:
            return 0.0
    except ValueError:
        pass
    return _positive(text)


MIN_CACHE_SIZE = 1 << 20  # below this "--cache-size 20" (bytes, meant as 20G) evicts everything
MIN_READAHEAD, MAX_READAHEAD = 4 << 10, 1 << 30  # a page; far past the 1 MiB of a FUSE read


def _cache_size(text: str) -> int:
    try:
        return parse_size(text, minimum=MIN_CACHE_SIZE)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


MIN_UPLOAD_LIMIT = 1 << 10  # bytes a second: below, one WRITE takes longer than a timeout
_BITS = {"KBIT": 1000, "MBIT": 1000 ** 2, "GBIT": 1000 ** 3}


def _upload_limit(text: str) -> float:
    """'2M', '512K', '8Mbit', '100kbit/s' -> bytes a second."""
    value = text.strip().upper().removesuffix("/S")
    try:
        for unit, scale in _BITS.items():
            if value.endswith(unit):
                bits = parse_size(value[:-len(unit)], minimum=0)
                rate = bits * scale / 8
                break
        else:
            rate = parse_size(value, minimum=0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a rate: {text!r} (bytes a second with a unit K, M, G, e.g. 512K, 2M, or bits "
            "with kbit, Mbit, Gbit, e.g. 8Mbit)") from None
    if rate < MIN_UPLOAD_LIMIT:
        raise argparse.ArgumentTypeError(f"{text!r} is too small: at least 1K (1024 bytes a second)")
    return rate


def _readahead(text: str) -> int:
    try:
        return parse_size(text, minimum=MIN_READAHEAD, maximum=MAX_READAHEAD)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


#: -o options that are cachefs's own (as in an /etc/fstab line): name -> argument dest
OWN_OPTIONS = {"cache_dir": "cache_dir", "identity": "identity", "known_hosts": "known_hosts",
               "accept_new_host_key": "accept_new_host_key", "port": "port", "timeout": "timeout",
               "attr_timeout": "attr_timeout", "heartbeat": "heartbeat", "connections": "connections",
               "cache_size": "cache_size", "sync_interval": "sync_interval", "readahead": "readahead",
               "write_back_hold": "write_back_hold", "no_passthrough": "passthrough",
               "no_remote_hash": "remote_hash", "callbacks": "callbacks", "upload_limit": "upload_limit",
               "request_spin": "request_spin", "sync_at_mount": "sync_at_mount",
               "sync_at_unmount": "sync_at_unmount", "sync_idle": "sync_idle", "pin": "pins",
               "nonempty": "nonempty", "password_file": "password_file", "no_notify": "notify",
               "verbose": "verbose", "encrypt_cache": "encrypt_cache", "cache_key_file": "cache_key_file",
               "show_cachefs": "show_cachefs",
               "owners": "owners", "uid_map": "uid_map", "gid_map": "gid_map"}
#: options handed to the kernel's FUSE mount: flags, and those that take a value
FUSE_OPTIONS = {"rw", "ro", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime",
                "relatime", "allow_other", "allow_root", "auto_unmount", "default_permissions"}
FUSE_VALUE_OPTIONS = {"fsname", "subtype"}
#: FUSE options cachefs cannot use, and why (libfuse would fail the mount, or end it at once)
FUSE_REFUSED = {
    "max_read": "pyfuse3 sets the read size itself; any other makes libfuse end the mount",
    "blksize": "it is for block-device FUSE file systems (fuseblk) only",
}
#: options meant for mount(8) or systemd only
MOUNT_ONLY = {"defaults", "auto", "noauto", "user", "users", "nouser", "nofail", "_netdev", "owner",
              "group", "sync", "async", "comment"}


def apply_dash_o(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Sort ``-o a,b=c`` into cachefs's own settings and FUSE options (fstab support).
    A malformed item ends the command with a usage error (exit status 2), before anything
    is mounted: libfuse's own complaint would go to a detached mount's /dev/null."""
    fuse: list[str] = []
    for text in args.fuse_options:
        for opt in filter(None, text.split(",")):
            key, eq, value = opt.partition("=")
            key_u = key.replace("-", "_")
            if key_u in OWN_OPTIONS:
                _apply_own_option(args, parser, opt, OWN_OPTIONS[key_u])
            elif key.lower() in SSHFS_OPTIONS:
                _apply_sshfs_option(args, parser, opt)
            elif _is_fuse_option(parser, opt):
                fuse.append(opt)
    args.fuse_options = fuse


def _apply_own_option(args: argparse.Namespace, parser: argparse.ArgumentParser, opt: str, dest: str) -> None:
    """``-o key`` or ``-o key=value`` of one of cachefs's own options (``dest``), set as
    its command-line option would set it."""
    key, eq, value = opt.partition("=")
    action = next(a for a in parser._actions if a.dest == dest)
    if action.nargs == 0:  # a flag
        if eq:
            parser.error(f"-o {opt}: {key} takes no value (write -o {key})")
        setattr(args, action.dest, action.const)  # True, or False for --no-...
        return
    if not eq or not value:
        parser.error(f"-o {key} needs a value ({key}=...)")
    if action.choices is not None and value not in action.choices:
        parser.error(f"-o {opt}: choose from {', '.join(map(str, action.choices))}")
    if isinstance(action, argparse._AppendAction):  # -o pin=PATH, one more each time
        setattr(args, action.dest, [*getattr(args, action.dest), value])
        return
    try:
        setattr(args, action.dest, action.type(value) if callable(action.type) else value)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(f"-o {opt}: {exc}")


def _add_login_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--password-file", metavar="FILE", type=Path,
                   help="a file (mode 0600) whose first line is the password (SSH, SMB, "
                        "WebDAV; or CACHEFS_PASSWORD in the environment), or the SSH key's "
                        "passphrase, for mounts with no terminal to ask on (fstab, "
                        "systemd); on a terminal a missing password or passphrase is asked for "
                        "once, before the mount detaches")
    p.set_defaults(password_stdin=False)


#: sshfs's (and ssh's) -o names, lower case, as they map onto cachefs: an option's dest,
#: (dest, value) for a fixed setting, None when cachefs always does it, or the reason
#: the option is refused (cachefs does that differently)
SSHFS_OPTIONS: dict[str, str | tuple[str, Any] | None] = {
    "identityfile": "identity",
    "port": "port",
    "userknownhostsfile": "known_hosts",
    "serveraliveinterval": "heartbeat",
    "serveralivecountmax": None,  # a heartbeat not answered within --timeout is offline
    "reconnect": None,  # cachefs always reconnects (and serves the cache meanwhile)
    "password_stdin": ("password_stdin", True),
    "stricthostkeychecking": "",  # by value: _strict_host_key_checking
    "ssh_command": "cachefs speaks SSH itself and runs no ssh program; put ProxyCommand, "
                   "HostName, User or Port in ~/.ssh/config (or --ssh-config) instead",
    "ssh_protocol": "cachefs speaks SSH protocol 2 only",
    "sftp_server": "cachefs uses the server's sftp subsystem (sshd_config's Subsystem line)",
    "directport": "cachefs speaks SSH itself; it cannot talk SFTP straight to a port",
    "idmap": "",  # by value: _idmap
    "uidfile": "uid_map",
    "gidfile": "gid_map",
}


def _apply_sshfs_option(args: argparse.Namespace, parser: argparse.ArgumentParser, opt: str) -> None:
    """``-o Name=value`` as sshfs takes it, set as cachefs's own option would be."""
    key, eq, value = opt.partition("=")
    meaning = SSHFS_OPTIONS[key.lower()]
    if meaning is None:
        return
    if isinstance(meaning, tuple):
        if eq:
            parser.error(f"-o {opt}: {key} takes no value (write -o {key})")
        setattr(args, meaning[0], meaning[1])
    elif key.lower() == "stricthostkeychecking":
        _strict_host_key_checking(args, parser, opt, value)
    elif key.lower() == "idmap":
        _idmap(args, parser, opt, value)
    elif meaning in OWN_OPTIONS.values():
        _apply_own_option(args, parser, opt, meaning)
    else:
        parser.error(f"-o {opt}: not supported: {meaning}")


def _idmap(args: argparse.Namespace, parser: argparse.ArgumentParser, opt: str, value: str) -> None:
    """sshfs's idmap: none and file show the server's owners (--owners remote; file with
    uidfile=/gidfile=, as --uid-map/--gid-map); user shows the files as the mounting
    user's (--owners local)."""
    owners = {"none": "remote", "file": "remote", "user": "local"}.get(value.lower())
    if owners is None:
        parser.error(f"-o {opt}: choose none, user or file")
    args.owners = owners


def _strict_host_key_checking(args: argparse.Namespace, parser: argparse.ArgumentParser, opt: str,
                              value: str) -> None:
    """yes and ask: what cachefs always does (an unknown key is refused, with its
    fingerprint); accept-new: --accept-new-host-key; no/off are refused, never obeyed."""
    choice = value.lower()
    if choice == "accept-new":
        args.accept_new_host_key = True
    elif choice in ("no", "off"):
        parser.error(f"-o {opt}: cachefs always checks host keys: an unknown key is refused "
                     "with its fingerprint until you record it (--accept-new-host-key, "
                     "-o StrictHostKeyChecking=accept-new, or connect once with ssh), and a "
                     "changed key is always refused")
    elif choice not in ("yes", "ask"):
        parser.error(f"-o {opt}: choose yes, ask or accept-new")


def _login_secrets(args: argparse.Namespace) -> Any:
    """The ``Secrets`` of a mount over a network (SSH, SMB, WebDAV, ...): the password
    file's, standard input's or ``CACHEFS_PASSWORD``'s secret read now (before the mount
    detaches), kept in memory only."""
    from .remote.ssh_secrets import Secrets, read_password_file, read_password_stdin

    if args.password_file is not None:
        given = Path(args.password_file).expanduser().absolute()  # (the daemon leaves the cwd)
        return Secrets(read_password_file(given), f"--password-file {args.password_file}", given_file=given)
    if args.password_stdin:
        return Secrets(read_password_stdin(), "-o password_stdin")
    if os.environ.get("CACHEFS_PASSWORD"):
        return Secrets(os.environ["CACHEFS_PASSWORD"], "CACHEFS_PASSWORD")
    return Secrets()


def _is_fuse_option(parser: argparse.ArgumentParser, opt: str) -> bool:
    """Whether ``opt`` goes to FUSE (False: an option of mount(8) only, ignored); a usage
    error for a malformed, refused or unknown one."""
    key, eq, value = opt.partition("=")
    if key in FUSE_OPTIONS:
        if eq:
            parser.error(f"-o {opt}: {key} takes no value (write -o {key})")
        return True
    if key in FUSE_VALUE_OPTIONS:
        if not value:
            parser.error(f"-o {key} needs a value ({key}=...)")
        if not value.isascii() or not value.isprintable():
            parser.error(f"-o {opt}: {key} must be printable ASCII")
        return True
    if key in FUSE_REFUSED:
        parser.error(f"-o {opt}: not supported by cachefs: {FUSE_REFUSED[key]}")
    if key in MOUNT_ONLY or key.startswith("x-"):
        return False
    parser.error(f"unknown mount option -o {opt}")


def _secret(args: argparse.Namespace, encrypted: bool, no_terminal: str) -> bytes | None:
    """The cache's secret from --cache-key-file, $CACHEFS_CACHE_PASSPHRASE or the terminal
    (None when there is no key file and ``encrypted`` is false); refused when empty."""
    from .store.crypto import CryptoError

    if args.cache_key_file is not None:
        secret: bytes = args.cache_key_file.expanduser().read_bytes()
        if not secret.strip():
            raise CryptoError(f"{args.cache_key_file} is empty")
        return secret
    if not encrypted:
        return None
    text = os.environ.get("CACHEFS_CACHE_PASSPHRASE")
    if text is None:
        if not sys.stdin.isatty():
            raise CryptoError(no_terminal)
        text = getpass.getpass("cache passphrase: ")
    if not text:
        raise CryptoError("the cache passphrase is empty")
    return text.encode()


def cache_key(args: argparse.Namespace, cache_dir: Path) -> bytes | None:
    """The key of an encrypted cache (None for a plain one), checked against the cache."""
    from .store.crypto import open_key
    from .store.index import check_private_dir

    secret = _secret(args, args.encrypt_cache, "--encrypt-cache needs a key: --cache-key-file "
                     "FILE, CACHEFS_CACHE_PASSPHRASE, or a terminal to ask on")
    if secret is None and not (cache_dir / "crypt.json").exists():
        return None
    check_private_dir(cache_dir)
    return open_key(cache_dir, secret)


def cmd_mount(args: argparse.Namespace) -> int:
    from .store.crypto import CryptoError
    from .store.index import StoreError
    from .daemon import MountConfig, MountError, run
    from .errors import RemoteRefused

    args = share_arguments(args)
    apply_dash_o(args, args.parser)
    try:
        address = parse_remote(args.remote, port=args.port)
        handler = handler_for(address.scheme)
    except ValueError as exc:
        return _fail(f"bad REMOTE {args.remote!r}: {exc}")
    cache_dir = (args.cache_dir or default_cache_dir(address)).expanduser().absolute()
    if cache_dir.exists() and not cache_dir.is_dir():
        return _fail(f"cache directory {cache_dir} is not a directory")
    # A mount that fails before it serves removes the cache it made (33 MiB of index),
    # never one that was there before.
    new_cache = not os.path.lexists(cache_dir)
    problem = _refused_before_asking(args, cache_dir)
    if problem is not None:
        return _fail(problem)
    try:
        owners = _owners(args)
    except MapError as exc:
        return _fail(str(exc))
    if owners.remote and not handler.capabilities.owners:
        return _fail(f"--owners remote: {address.scheme}:// keeps no owners (files there are the "
                     "login's): use --owners local")
    try:
        key = cache_key(args, cache_dir)
        secrets = _login_secrets(args) if address.scheme != "file" else None
    except (CryptoError, StoreError, OSError, RemoteRefused) as exc:
        if new_cache:
            caches.discard_new(cache_dir)
        return _fail(str(exc))
    except KeyboardInterrupt:  # (at a passphrase's or a password's prompt)
        if new_cache:
            caches.discard_new(cache_dir)
        return 130
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
            remote_hash=args.remote_hash,
            upload_limit=args.upload_limit,
            secrets=secrets,
        ),
        foreground=args.foreground,
        verbose=args.verbose,
        attr_timeout=args.attr_timeout,
        heartbeat=args.heartbeat,
        cache_size=args.cache_size,
        sync_interval=args.sync_interval,
        sync_at_mount=args.sync_at_mount,
        sync_at_unmount=args.sync_at_unmount,
        sync_idle=args.sync_idle,
        pins=list(args.pins),
        write_back_hold=args.write_back_hold,
        readahead=args.readahead,
        passthrough=args.passthrough,
        callbacks=args.callbacks,
        request_spin=args.request_spin,
        notify=args.notify,
        show_cachefs=args.show_cachefs,
        fuse_options=args.fuse_options,
        cache_key=key,
        nonempty=args.nonempty,
        new_cache=new_cache,
        owners=owners,
    )
    try:
        return run(config)
    except MountError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:  # (``run`` removed a new cache if the mount never served)
        return 130


def _owners(args: argparse.Namespace) -> Owners:
    """The mount's ``Owners`` (--owners, and its maps read now: a bad line ends the
    command before anything is mounted)."""
    if args.owners != "remote" and (args.uid_map or args.gid_map):
        raise MapError("--uid-map and --gid-map need --owners remote")
    return make_owners(args.owners, os.getuid(), os.getgid(), args.uid_map, args.gid_map)


def _refused_before_asking(args: argparse.Namespace, cache_dir: Path) -> str | None:
    """Why ``cachefs mount`` stops before anything is asked for (the cache key's
    passphrase, a password): a file option that names a folder, a cache in use."""
    from .daemon import MountError, check_cache_free

    for option, given in (("--identity", args.identity), ("--known-hosts", args.known_hosts),
                          ("--cache-key-file", args.cache_key_file), ("--password-file", args.password_file),
                          ("--uid-map", args.uid_map), ("--gid-map", args.gid_map)):
        if given is not None and given.expanduser().is_dir():
            return f"{option} {given} is a directory, not a file"
    try:
        check_cache_free(cache_dir)
    except MountError as exc:
        return str(exc)
    return None


def find_mount_root(path: Path) -> Path:
    """The cachefs mount point that holds ``path`` (a mount point or a path inside one).

    Found in /proc/self/mountinfo from the path's text, then asked for its status once,
    bounded in time (``mounts.probe``): a stale mount (its process died) ends the command
    with one line that says so and what to do, never with ENOTCONN from a stat."""
    root, _status, _inside = _mount_root_and_status(path)
    return root


def _mount_root_and_relative(target: str) -> tuple[Path, str]:
    """The mount holding ``target`` and ``target`` relative to its root, as the control
    file takes paths (found through a symbolic link, if the text leads through one)."""
    root, _status, inside = _mount_root_and_status(Path(target))
    return root, _relative(root, inside, target)


def _mount_root_and_status(path: Path) -> tuple[Path, dict[str, Any], Path]:
    """The mount point, its status, and ``path`` as it lies in that mount (resolved when
    its text leads through a symbolic link)."""
    path = Path(os.path.abspath(path.expanduser()))
    inside = path
    held = mounts.mount_holding(path)
    if held is None or not held[1].startswith("fuse"):
        # through a symbolic link? Resolving stats each part: bounded, for a stuck mount.
        finished, real = mounts.bounded(lambda: os.path.realpath(path), mounts.PROBE_TIMEOUT)
        if finished and isinstance(real, str) and real != str(path):
            held, inside = mounts.mount_holding(real), Path(real)
    if held is None or not held[1].startswith("fuse"):
        raise SystemExit(f"cachefs: {path} is not inside a cachefs mount")
    point, kind = held
    state, status = mounts.probe(point)
    if state == mounts.STALE:
        raise SystemExit(f"cachefs: {mounts.stale_message(point, kind)}")
    if state == mounts.STUCK:
        raise SystemExit(f"cachefs: {mounts.stuck_message(point, mounts.PROBE_TIMEOUT)}")
    if state != mounts.LIVE or status is None:
        raise SystemExit(f"cachefs: {path} is not inside a cachefs mount")
    return Path(point), status, inside


def read_status(root: Path) -> dict[str, Any]:
    status: dict[str, Any] = json.loads((root / ".cachefs" / "status").read_text())
    return status


def cmd_unmount(args: argparse.Namespace) -> int:
    mountpoint = Path(os.path.abspath(Path(share_mountpoint(args.mountpoint)).expanduser()))
    kind = mounts.mount_type_at(mountpoint)
    if kind is None:  # given through a symbolic link? (the parent is resolved, not the mount)
        mountpoint = Path(os.path.realpath(mountpoint.parent)) / mountpoint.name
        kind = mounts.mount_type_at(mountpoint)
    if kind is None:
        return _fail(f"{mountpoint} is not mounted")
    if not kind.startswith("fuse"):
        return _fail(f"{mountpoint} is not a cachefs mount (it is {kind})")
    # Never a stat of the mount point: on a stale mount it fails (ENOTCONN), on a stuck
    # one it hangs. The status file is read once, bounded, for the process to wait for.
    state, status = mounts.probe(mountpoint)
    pid = _mount_pid(status) if state == mounts.LIVE else None
    result = subprocess.run(_unmount_command(mountpoint, args.lazy), capture_output=True, text=True)
    if result.returncode != 0:
        reason = result.stderr.strip() or result.stdout.strip()
        if "busy" in reason and not args.lazy:
            reason += (f" (a program has a file or its working folder in it: close it, see "
                       f"'fuser -vm {mountpoint}', or detach it with 'cachefs unmount -z {mountpoint}')")
        return _fail(f"cannot unmount {mountpoint}: {reason}")
    if state == mounts.STALE:
        print(f"cachefs: {mountpoint} was a stale mount (its mount process had ended): unmounted; "
              f"the cache and its pending changes are kept for the next mount", file=sys.stderr)
    if pid is not None and not _ended_within(pid, args.wait):
        return _fail(f"unmounted, but the mount process {pid} is still running after {args.wait:g} s")
    if pid is not None and status is not None:
        _tell_left_pending(status, pid)
    return 0


def _tell_left_pending(status: dict[str, Any], pid: int) -> None:
    """Say how many changes the ended mount left pending (the server did not take them:
    offline, or not within the unmount's bound), and when they go."""
    cache_dir = status.get("cache_dir")
    left = mounts.left_pending(cache_dir, pid) if isinstance(cache_dir, str) and cache_dir else None
    if left:
        changes = "1 change is" if left == 1 else f"{left} changes are"
        print(f"cachefs: {changes} not on the server yet: kept pending in the cache {cache_dir}; "
              f"the next mount of {status.get('remote')} replays them as soon as it is online",
              file=sys.stderr)


def _mount_pid(status: dict[str, Any] | None) -> int | None:
    """The mount process's pid from its status, if it says."""
    if status is None:
        return None
    try:
        return int(status["pid"])
    except (KeyError, TypeError, ValueError):
        return None


def _unmount_command(mountpoint: Path, lazy: bool) -> list[str]:
    """fusermount3 (or fusermount) -u, else umount; detaching with ``lazy``."""
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool:
        return [tool, "-u", "-z", str(mountpoint)] if lazy else [tool, "-u", str(mountpoint)]
    return ["umount", "-l", str(mountpoint)] if lazy else ["umount", str(mountpoint)]


def _ended_within(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` ends within ``seconds`` (checked every 50 ms)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _running(pid):
            return True
        time.sleep(0.05)
    return False


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting for its parent counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def cmd_status(args: argparse.Namespace) -> int:
    root, status, inside = _mount_root_and_status(Path(args.path or "."))
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    if args.path is not None and inside != root:  # a path given in the mount: its state first
        print(f"{'path state:':<17}{_path_state(root, inside)}")
    limit = status.get("cache_limit") or 0
    used = status.get("cache_bytes") or 0
    rows = [
        ("state", status.get("state")),
        ("remote", status.get("remote")),
        ("mount point", str(root)),
        ("pending changes", status.get("pending")),
        ("conflicts", _conflicts_text(status)),
        ("cache use", f"{human_bytes(used)} of {human_bytes(limit)}"
                      + (" (pinned and changed files alone exceed the limit)"
                         if status.get("over_limit_pinned") else "")),
        ("pinned", ", ".join(status.get("pinned") or []) or "-"),
        ("passthrough", _passthrough_text(status.get("passthrough") or {})),
        ("callbacks", _callbacks_text(status.get("callbacks") or {})),
        ("last sync", status.get("last_sync") or "never"),
        ("last error", status.get("last_error") or "-"),
        ("cache dir", status.get("cache_dir")),
    ]
    for key, value in rows:
        print(f"{key + ':':<17}{value}")
    return 0


#: the kinds of file a mount holds only as local-only objects (never from the server)
_LOCAL_ONLY_KINDS = (stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK)


def _path_state(root: Path, inside: Path) -> str:
    """``user.cachefs.state`` of a path in the mount, and for ``conflict`` the kinds of
    the records that name it (``conflict (changed-both)``). A FIFO, socket or device node
    is ``local`` (every one in a mount is a local-only object), told without the
    attribute: the kernel lets no ``user.`` attribute reach one (xattr_permission)."""
    if stat.S_IFMT(os.lstat(inside).st_mode) in _LOCAL_ONLY_KINDS:
        return "local"
    state = os.getxattr(inside, "user.cachefs.state", follow_symlinks=False).decode()
    word, comma, rest = state.partition(",")  # (``conflict, xattrs local``)
    if word != "conflict":
        return state
    rel = os.path.relpath(inside, root)
    records = json.loads((root / ".cachefs" / "conflicts").read_text())
    kinds = sorted({str(r.get("kind")) for r in records
                    if rel in (r.get("path"), r.get("conflict_path"), r.get("target"))})
    return f"conflict ({', '.join(kinds)}){comma}{rest}" if kinds else state


def _conflicts_text(status: dict[str, Any]) -> str:
    """``2 (changed-both 1, deleted-local-changed-remote 1)``: the count and its kinds."""
    kinds = status.get("conflict_kinds") or {}
    shown = ", ".join(f"{kind} {count}" for kind, count in kinds.items())
    return f"{status.get('conflicts')}{f' ({shown})' if shown else ''}"


def _passthrough_text(state: dict[str, Any]) -> str:
    if not state.get("on"):
        why = state.get("off")
        return f"off ({why + '; ' if why else ''}this process serves every read)"
    return f"on ({state.get('open_files', 0)} files open read by the kernel itself)"


def _callbacks_text(state: dict[str, Any]) -> str:
    if state.get("live") and state.get("partial"):
        return (f"live, partial ({state.get('changes', 0)} changes told by the server; "
                "what it does not tell is checked after --attr-timeout)")
    if state.get("live"):
        return f"live ({state.get('changes', 0)} changes told by the server)"
    return f"off ({state.get('off') or 'not running'}; checks after --attr-timeout)"


def _relative(root: Path, inside: Path, target: str) -> str:
    rel = os.path.relpath(inside, root)
    if rel == ".":
        return "."
    if rel.startswith(".."):
        raise SystemExit(f"cachefs: {target} is not inside the mount {root}")
    return rel


def send_command(root: Path, command: str, label: str | None = None) -> int:
    """Write one command to the control file; with ``label``, show progress meanwhile."""
    result: dict[str, BaseException | None] = {"error": None}

    def write() -> None:
        try:
            fd = os.open(root / ".cachefs" / "control", os.O_WRONLY)
            try:
                os.write(fd, command.encode("utf-8", "surrogateescape"))
            finally:
                os.close(fd)
        except BaseException as exc:  # reported below, in the main thread
            result["error"] = exc

    worker = threading.Thread(target=write, daemon=True)
    worker.start()
    view = ProgressView(label) if label else None
    while worker.is_alive():
        worker.join(0.2)
        if view is not None:
            try:
                view.update(read_status(root).get("progress"))
            except (OSError, ValueError):
                pass
    error = result["error"]
    if error is None:
        if view is not None:
            view.finish(f"{label}: done")
        return 0
    reason = None
    try:
        reason = read_status(root).get("last_error")
    except (OSError, ValueError):
        pass
    if view is not None:
        view.finish(f"{label}: failed")
    message = reason or (os.strerror(error.errno) if isinstance(error, OSError) and error.errno else str(error))
    return _fail(f"{command.split()[0]}: {message}")


def cmd_simple(args: argparse.Namespace) -> int:
    root = find_mount_root(Path(args.path))
    label = "sync" if args.command == "sync" else None
    return send_command(root, args.command, label)


def cmd_paths(args: argparse.Namespace) -> int:
    status = 0
    for target in args.paths:
        root, rel = _mount_root_and_relative(target)
        label = f"pin {target}" if args.command == "pin" else None
        status |= send_command(root, f"{args.command} {rel}", label)
    return status


def cmd_conflicts(args: argparse.Namespace) -> int:
    root = find_mount_root(Path(args.path))
    records = json.loads((root / ".cachefs" / "conflicts").read_text())
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    if not records:
        print("no conflicts")
        return 0
    for r in records:
        line = f"{r.get('time', '')}  {r.get('kind')}  /{r.get('path')}"
        if r.get("conflict_path"):
            line += f"  (other version: /{r['conflict_path']})"
        print(line)
    return 0


def cmd_resolve(args: argparse.Namespace) -> int:
    root, rel = _mount_root_and_relative(args.path)
    return send_command(root, f"resolve {rel} {args.keep}")


def cmd_recover(args: argparse.Namespace) -> int:
    """Save the changed files a cache holds (damaged or not) into a new folder; never
    changes the cache. An encrypted cache's key is asked for as ``mount`` asks for it."""
    from .store.crypto import CryptoError, open_key
    from .recover import RecoverError, main_progress, recover, summary

    cache_dir = args.cache_dir.expanduser().absolute()
    to = (args.to or Path(f"cachefs-recovered-{time.strftime('%Y%m%d-%H%M%S')}")).expanduser().absolute()
    key = None
    if (cache_dir / "crypt.json").exists():
        # Only read: open_key makes a crypt.json where there is none, and cache_key's
        # check_private_dir may chmod the folder; this command changes nothing.
        try:
            secret = _secret(args, True, f"the cache in {cache_dir} is encrypted: give its key "
                             "with --cache-key-file FILE or CACHEFS_CACHE_PASSPHRASE (or run on "
                             "a terminal to be asked)")
            assert secret is not None
            key = open_key(cache_dir, secret)
        except (CryptoError, OSError) as exc:
            return _fail(str(exc))
    try:
        report = recover(cache_dir, to, key, progress=main_progress)
    except (RecoverError, OSError) as exc:
        return _fail(str(exc))
    for line in summary(report, to):
        print(line)
    if report.failed or report.missing:
        return _fail(f"some content could not be saved (see {to / 'RECOVERED.txt'})")
    return 0


# -- registered shares (cachefs add / remove / shares, cachefs mount NAME) ---------------

def share_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """``cachefs mount NAME [MOUNTPOINT] [options]`` (and the fstab form ``cachefs NAME
    MOUNTPOINT -o ...``): the registered share's options, schedule and pins, then the
    command line's own (so that they win), parsed again as ``cachefs mount`` parses them.
    A REMOTE that is no share's name is returned as given."""
    name = args.remote
    share = None
    if registry.is_share_name(name):
        try:
            share = registry.load().get(name)
        except registry.RegistryError as exc:
            raise SystemExit(f"cachefs: {exc}") from None
    if share is None:
        if args.mountpoint is None:
            raise SystemExit(f"cachefs: {name!r} is not a registered share ('cachefs shares' "
                             "lists them); to mount a remote, give REMOTE and MOUNTPOINT")
        if ":" not in name and "/" not in name and not Path(name).is_dir():
            raise SystemExit(f"cachefs: {name!r} is neither a registered share ('cachefs shares' "
                             "lists them) nor a remote (sftp://host/path, host:path, or a folder)")
        return args
    parser: argparse.ArgumentParser = args.parser
    options = share_options(share, parser)
    _check_share_options(share, options)
    again = parser.parse_args([*options, *(args.argv or [name])])
    again.remote = share.remote
    again.mountpoint = args.mountpoint
    if args.mountpoint is None:  # the registered one, made when missing (a unit cannot)
        again.mountpoint = share.mountpoint
        try:
            Path(share.mountpoint).expanduser().mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SystemExit(f"cachefs: mount point {share.mountpoint}: {exc.strerror or exc}") from None
    return again


class _ShareOptionsParser(argparse.ArgumentParser):
    """Parses a share's own options: a bad one (the file edited by hand) is one line that
    names the share and the file, not a usage message about a command line."""

    share = ""

    def error(self, message: str) -> NoReturn:
        raise SystemExit(f"cachefs: share {self.share} in {registry.registry_path()}: {message}")


def _check_share_options(share: registry.Share, options: list[str]) -> None:
    check = _ShareOptionsParser(add_help=False)
    check.share = share.name
    add_mount_arguments(check)
    apply_dash_o(check.parse_args([*options, share.name]), check)


def share_options(share: registry.Share, parser: argparse.ArgumentParser) -> list[str]:
    """A share's options as ``cachefs mount``'s arguments: long options for cachefs's own,
    ``-o`` for FUSE's, ``--pin`` for each pin."""
    argv: list[str] = []
    for key, value in share.options.items():
        dest = OWN_OPTIONS.get(key)
        if dest is None:  # a FUSE option (an unknown one is refused as -o refuses it)
            if value is not False:
                argv += ["-o", key if value is True else f"{key}={value}"]
            continue
        action = next(a for a in parser._actions if a.dest == dest)
        option = action.option_strings[-1]  # the long form
        if action.nargs == 0:
            if not isinstance(value, bool):
                raise SystemExit(f"cachefs: share {share.name} in {registry.registry_path()}: "
                                 f"option {key} is true or false, not {value!r}")
            if value:
                argv.append(option)
        else:
            argv.append(f"{option}={value}")
    argv += [f"--pin={pin}" for pin in share.pins]
    return argv


def share_mountpoint(text: str) -> str:
    """``cachefs unmount NAME``: a registered share's mount point, unless ``text`` names a
    mount point of its own (a folder of that name here that is mounted)."""
    if not registry.is_share_name(text) or mounts.mount_type_at(Path(os.path.abspath(text))):
        return text
    try:
        share = registry.load().get(text)
    except registry.RegistryError:
        return text
    return share.mountpoint if share is not None else text


#: the options of cachefs mount that a share keeps as paths: made absolute when added (a
#: unit mounts from /); every option of type Path (test_every_path_option_is_made_absolute)
_PATH_OPTIONS = {"cache_dir", "identity", "known_hosts", "cache_key_file", "password_file", "uid_map", "gid_map"}
_OPTION_NAMES = {dest: name for name, dest in OWN_OPTIONS.items()}


def cmd_add(args: argparse.Namespace) -> int:
    """Register a share: its options are checked as ``cachefs mount`` checks them, and
    kept as they were written (the text, not the parsed value: ``20G`` stays ``20G``)."""
    if not registry.is_share_name(args.name):
        return _fail(f"bad share name {args.name!r}: letters, digits, '.', '_' and '-', "
                     "starting with a letter or digit, at most 64")
    if args.foreground:
        return _fail("--foreground is not kept with a share: give it to 'cachefs mount NAME'")
    apply_dash_o(args, args.parser)  # a bad -o item is a usage error, as for mount
    try:
        handler_for(parse_remote(args.remote, port=args.port).scheme)
    except ValueError as exc:
        return _fail(f"bad REMOTE {args.remote!r}: {exc}")
    options, pins = _given_options(args.argv)
    for pin in pins:
        clean = os.path.normpath(pin)
        if os.path.isabs(pin) or clean == ".." or clean.startswith("../"):
            return _fail(f"--pin {pin}: a pin is a path relative to the mount point")
    remote = args.remote
    if ":" not in remote:  # a local folder: kept absolute, as it may be mounted from anywhere
        remote = os.path.abspath(Path(remote).expanduser())
    share = registry.Share(args.name, remote, os.path.abspath(Path(args.mountpoint).expanduser()),
                           options, pins)
    try:
        shares = registry.load()
        if args.name in shares:
            return _fail(f"a share named {args.name} is registered already "
                         f"('cachefs remove {args.name}' first)")
        shares[args.name] = share
        registry.save(shares)
    except registry.RegistryError as exc:
        return _fail(str(exc))
    return 0


def _given_options(argv: list[str]) -> tuple[dict[str, registry.Value], list[str]]:
    """The options ``argv`` (cachefs add's arguments) gives, by their -o name, with the
    text given (True for a flag), and its pins; FUSE's -o options kept, mount(8)'s not."""
    raw = argparse.ArgumentParser(add_help=False)
    raw.add_argument("name")
    add_mount_arguments(raw, share_names=False)
    for action in raw._actions:  # only what is given, as written
        if action.option_strings:
            action.default, action.type, action.choices = argparse.SUPPRESS, None, None
    raw._defaults.clear()  # (those of set_defaults, -o password_stdin's: none is given)
    options: dict[str, registry.Value] = {}
    pins: list[str] = []
    for dest, value in vars(raw.parse_args(argv)).items():
        if dest in ("name", "remote", "mountpoint", "foreground"):
            continue
        if dest == "pins":
            pins += value
        elif dest == "fuse_options":
            _given_dash_o(value, options, pins)
        else:
            name = _OPTION_NAMES[dest]
            options[name] = True if isinstance(value, bool) else _path_text(name, value)
    for name in ("sync_interval", "sync_at_unmount", "sync_idle"):  # numbers in [NAME.sync]
        if isinstance(options.get(name), str):
            number = float(str(options[name]))
            options[name] = int(number) if number.is_integer() else number
    return options, pins


def _given_dash_o(texts: list[str], options: dict[str, registry.Value], pins: list[str]) -> None:
    """``-o`` items of cachefs add, into ``options`` (by name, as written) and ``pins``."""
    for opt in (o for text in texts for o in text.split(",") if o):
        key, eq, text = opt.partition("=")
        own = key.replace("-", "_")
        if own == "pin":
            pins.append(text)
        elif own in OWN_OPTIONS:
            options[own] = _path_text(own, text) if eq else True
        elif isinstance(meaning := SSHFS_OPTIONS.get(key.lower()), str) and meaning in _OPTION_NAMES:
            # sshfs's name kept as written (IdentityFile=), its path made absolute
            options[key] = _path_text(_OPTION_NAMES[meaning], text) if eq else True
        elif key not in MOUNT_ONLY and not key.startswith("x-"):
            options[key] = text if eq else True


def _path_text(name: str, text: str) -> str:
    return os.path.abspath(Path(text).expanduser()) if name in _PATH_OPTIONS else text


def cmd_remove(args: argparse.Namespace) -> int:
    try:
        shares = registry.load()
        if shares.pop(args.name, None) is None:
            return _fail(f"no share named {args.name!r} ('cachefs shares' lists them)")
        registry.save(shares)
    except registry.RegistryError as exc:
        return _fail(str(exc))
    return 0


def cmd_shares(args: argparse.Namespace) -> int:
    try:
        shares = registry.load()
    except registry.RegistryError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps([{"name": s.name, "remote": s.remote, "mountpoint": s.mountpoint,
                           "mounted": _mounted(s), "options": s.options, "pins": s.pins}
                          for s in shares.values()], indent=2))
        return 0
    if not shares:
        print(f"no shares registered in {registry.registry_path()} "
              "(cachefs add NAME REMOTE MOUNTPOINT [options])")
        return 0
    width = max(map(len, shares))
    for s in shares.values():
        extra = [f"{k}={v}" if v is not True else k for k, v in s.options.items()]
        extra += [f"pin={p}" for p in s.pins]
        print(f"{s.name:<{width}}  {s.remote}  {s.mountpoint}{'  (mounted)' if _mounted(s) else ''}"
              f"{'  ' + ','.join(extra) if extra else ''}")
    return 0


def _mounted(share: registry.Share) -> bool:
    return mounts.mount_type_at(Path(share.mountpoint)) is not None
# -- cachefs list and cachefs caches ----------------------------------------------------------

LIST_TIMEOUT = 3.0  # how long 'list' and 'caches' wait for a mount's status


def _probe_all(points: list[str], timeout: float) -> dict[str, tuple[str, dict[str, Any] | None]]:
    """Each mount's ``mounts.probe`` answer, asked side by side: the whole takes at most
    ``timeout`` however many mounts do not answer."""
    answers: dict[str, tuple[str, dict[str, Any] | None]] = {}

    def ask(point: str) -> None:
        try:
            answers[point] = mounts.probe(point, timeout)
        except Exception:  # noqa: BLE001 - told as not answering
            answers[point] = (mounts.FOREIGN, None)

    workers = [threading.Thread(target=ask, args=(point,), daemon=True) for point in points]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + timeout + 0.5
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    return {point: answers.get(point, (mounts.STUCK, None)) for point in points}


def _mount_rows(timeout: float) -> list[dict[str, Any]]:
    """One row per cachefs mount: mount point, remote, state, pending, conflicts, pid,
    cache dir (the last five from its status, when it answers)."""
    entries = mounts.mounts_of_type("fuse.cachefs")
    answers = _probe_all([e.point for e in entries], timeout)
    rows = []
    for entry in entries:
        state, status = answers[entry.point]
        row: dict[str, Any] = {"mountpoint": entry.point, "remote": entry.source, "state": state,
                               "pending": None, "conflicts": None, "pid": None, "cache_dir": None,
                               "uid": entry.uid}
        if state == mounts.LIVE and status is not None:
            row.update(state=status.get("state"), remote=status.get("remote") or entry.source,
                       pending=status.get("pending"), conflicts=status.get("conflicts"),
                       pid=status.get("pid"), cache_dir=status.get("cache_dir"))
        elif state == mounts.STUCK:
            row["state"] = "not answering"
        elif state == mounts.FOREIGN:
            row["state"] = ("not readable (another user's mount)"
                            if entry.uid is not None and entry.uid != os.geteuid() else "unknown")
        rows.append(row)
    return rows


def cmd_list(args: argparse.Namespace) -> int:
    rows = _mount_rows(args.timeout)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no cachefs mounts")
        return 0
    table = [("MOUNT POINT", "REMOTE", "STATE", "PENDING", "CONFLICTS")]
    for row in rows:
        table.append((row["mountpoint"], row["remote"], str(row["state"]),
                      "-" if row["pending"] is None else str(row["pending"]),
                      "-" if row["conflicts"] is None else str(row["conflicts"])))
    widths = [max(len(line[i]) for line in table) for i in range(4)]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)) + "  " + line[4])
    return 0


def _ago(moment: float | None) -> str:
    if moment is None:
        return "never"
    seconds = max(0.0, time.time() - moment)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(moment))} ({n} {unit}{'s' if n > 1 else ''} ago)"
    return f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(moment))} (just now)"


def _caches_named(target: str) -> list[Path]:
    """The caches ``--remove TARGET`` means: a cache directory (told by its own marks,
    ``caches.is_cache``), else the caches of a remote (its default cache, and any cache
    that records that remote). A folder that is no cache is taken as a remote, never
    removed: a local share's folder means that share's cache."""
    path = Path(target).expanduser().absolute()
    if caches.is_cache(path):
        return [path]
    try:
        address = parse_remote(target)
    except ValueError as exc:
        raise SystemExit(f"cachefs: {target} is neither a cache directory nor a remote ({exc})")
    default = default_cache_dir(address)
    found = [p for p in caches.find() if p == default or caches.inspect(p).remote == address.display()]
    if not found:
        folder = (f"{path} is not a cachefs cache directory (it has neither the index-made mark "
                  "nor a cachefs index), and " if os.path.isdir(path) else "")
        raise SystemExit(f"cachefs: {folder}no cache of {address.display()} in {caches.cache_base()} "
                         "(see 'cachefs caches'): nothing removed")
    return found


def cmd_caches(args: argparse.Namespace) -> int:
    if args.remove is not None:
        status = 0
        for path in _caches_named(args.remove):
            try:
                info = caches.remove(path, force=args.force)
            except caches.CacheError as exc:
                status = _fail(f"not removed: {exc}")
                continue
            lost = caches.what_would_be_lost(info)
            print(f"removed {path} ({human_bytes(info.size)}{'; it ' + lost + ', now lost' if lost else ''})")
        return status
    rows = _mount_rows(args.timeout)
    mounted = {Path(r["cache_dir"]): r for r in rows if r["cache_dir"]}
    infos = [caches.inspect(path) for path in caches.find(mounted)]
    if args.json:
        listed = []
        for info in infos:
            item = info.as_json()
            item["mountpoint"] = mounted[info.path]["mountpoint"] if info.path in mounted else None
            listed.append(item)
        print(json.dumps(listed, indent=2))
        return 0
    if not infos:
        print(f"no caches in {caches.cache_base()}")
        return 0
    for info in infos:
        print(info.path)
        remote = info.remote or ("(encrypted: named in the index under its key)" if info.encrypted
                                 else "(not recorded: the mount never opened it)")
        if info.path in mounted:
            used = f"yes: mounted on {mounted[info.path]['mountpoint']} (process {info.holder})"
        elif info.holder is not None:
            used = f"yes: held by process {info.holder}"
        else:
            used = "no"
        for key, value in (("remote", remote), ("size", human_bytes(info.size)),
                           ("last use", _ago(info.last_use)), ("in use", used),
                           ("pending changes", "-" if info.pending is None else info.pending),
                           ("conflicts", "-" if info.conflicts is None else info.conflicts)):
            print(f"  {key + ':':<17}{value}")
        if info.problem:
            print(f"  {'problem:':<17}{info.problem}")
    total = sum(info.size for info in infos)
    print(f"{len(infos)} cache{'s' if len(infos) != 1 else ''}, {human_bytes(total)}")
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
    p.set_defaults(func=cmd_mount, parser=p)

    p = sub.add_parser("unmount", aliases=["umount"], help="unmount cleanly",
                       description="Unmount a cachefs mount and wait for its process to finish.")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="the mount point, or a registered share's NAME")
    p.add_argument("-z", "--lazy", action="store_true", help="detach even if the mount is busy")
    p.add_argument("--wait", type=_positive, default=60.0, metavar="SECONDS",
                   help="how long to wait for the mount process to finish (default: 60)")
    p.set_defaults(func=cmd_unmount)

    where = "the mount point or a path inside it (default: the current folder)"
    p = sub.add_parser("status", help="show the state of a mount",
                       description="Show the state of the mount holding PATH: connectivity, "
                                   "remote, pending changes, conflicts, cache use, pinned "
                                   "folders, last sync and last error; for a PATH given "
                                   "inside the mount, its own state first.")
    p.add_argument("path", metavar="PATH", nargs="?", default=None, help=where)
    p.add_argument("--json", action="store_true", help="print the raw JSON status")
    p.set_defaults(func=cmd_status)

    for name, text in [
        ("sync", "reconcile now: replay pending changes and refresh pinned folders; "
                 "shows progress; exits non-zero with the reason if it did not complete"),
        ("offline", "work offline on purpose: no remote access, changes are journaled"),
        ("online", "return to automatic mode: use the remote when it answers"),
    ]:
        p = sub.add_parser(name, help=text.split(":")[0], description=text[0].upper() + text[1:] + ".")
        p.add_argument("path", metavar="PATH", nargs="?", default=".", help=where)
        p.set_defaults(func=cmd_simple)

    for name, text in [
        ("pin", "make files or folders available offline: fetched whole now and kept "
                "(folders include what appears in them later); shows progress"),
        ("unpin", "make pinned files or folders evictable again"),
        ("evict", "drop cached content under PATH that is already on the server "
                  "(changes not yet on the server and pinned files are kept)"),
    ]:
        p = sub.add_parser(name, help=text.split(":")[0].split(" (")[0], description=text[0].upper() + text[1:] + ".")
        p.add_argument("paths", metavar="PATH", nargs="+", help="a file or folder inside a cachefs mount")
        p.set_defaults(func=cmd_paths)

    p = sub.add_parser("conflicts", help="list recorded conflicts",
                       description="List the conflicts recorded by the mount holding PATH.")
    p.add_argument("path", metavar="PATH", nargs="?", default=".", help=where)
    p.add_argument("--json", action="store_true", help="print the raw JSON list")
    p.set_defaults(func=cmd_conflicts)

    p = sub.add_parser("resolve", help="settle a conflict",
                       description="Settle the conflict recorded for PATH (the file or its "
                                   "conflict copy): keep the local version, the remote one, or both.")
    p.add_argument("path", metavar="PATH", help="the file (or its conflict copy) inside the mount")
    p.add_argument("--keep", required=True, choices=["local", "remote", "both"],
                   help="local: this machine's version takes the name; remote: the server's "
                        "version stays and the other copy is deleted; both: keep both files")
    p.set_defaults(func=cmd_resolve)

    p = sub.add_parser("recover", help="save changed files from a cache, even a damaged one",
                       description="Save the content of every changed file that CACHE_DIR still "
                                   "holds (with its path when the index tells it, else by inode "
                                   "number) into a new folder, with a list of the changes that "
                                   "were waiting for the server. Reads the cache without changing "
                                   "it; works with a damaged index or none.")
    p.add_argument("cache_dir", metavar="CACHE_DIR", type=Path, help="the cache directory (--cache-dir of the mount)")
    p.add_argument("--to", metavar="DIR", type=Path,
                   help="a new (or empty) folder for the files (default: ./cachefs-recovered-DATE-TIME)")
    p.add_argument("--cache-key-file", metavar="FILE", type=Path,
                   help="the key file of an encrypted cache (else $CACHEFS_CACHE_PASSPHRASE, or asked)")
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("list", help="list cachefs mounts",
                       description="List the cachefs mounts of this machine: mount point, "
                                   "remote, state (online, offline, syncing; stale or not "
                                   "answering), pending changes and conflicts.")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.add_argument("--timeout", type=_positive, default=LIST_TIMEOUT, metavar="SECONDS",
                   help="how long to wait for each mount's status (asked side by side; "
                        f"default: {LIST_TIMEOUT:g})")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("caches", help="list cache directories, or remove one",
                       description="List the cache directories (those in "
                                   "$XDG_CACHE_HOME/cachefs or ~/.cache/cachefs, and those "
                                   "mounts use elsewhere): remote, size on disk, last use, "
                                   "whether a mount uses it, pending changes and conflicts; "
                                   "or remove one that no mount uses.")
    p.add_argument("--remove", metavar="DIR|REMOTE",
                   help="remove the cache directory DIR, or the cache of REMOTE; refused while "
                        "a mount uses it, and when it holds changes not yet on the server or "
                        "conflicts (unless --force)")
    p.add_argument("--force", action="store_true",
                   help="with --remove: remove it even though its pending changes and "
                        "conflicts are lost (never one a mount uses)")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.add_argument("--timeout", type=_positive, default=LIST_TIMEOUT, metavar="SECONDS",
                   help=f"how long to wait for each mount's status (default: {LIST_TIMEOUT:g})")
    p.set_defaults(func=cmd_caches)
    add_share_parsers(sub)
    return parser


def add_share_parsers(sub: Any) -> None:
    """cachefs add, remove and shares: the registry of shares."""
    p = sub.add_parser("add", help="register a share to mount by its name",
                       description="Register NAME in the registry of shares "
                                   "($XDG_CONFIG_HOME/cachefs/shares.toml, or "
                                   "~/.config/cachefs/shares.toml): 'cachefs mount NAME' then "
                                   "mounts REMOTE on MOUNTPOINT with these options, schedule "
                                   "and pins. The options are those of 'cachefs mount', checked "
                                   "as it checks them.")
    p.add_argument("name", metavar="NAME", help="letters, digits, '.', '_', '-'")
    add_mount_arguments(p, share_names=False)
    p.set_defaults(func=cmd_add, parser=p)

    p = sub.add_parser("remove", help="forget a registered share",
                       description="Remove NAME from the registry of shares (a mount of it and "
                                   "its cache are left as they are).")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("shares", help="list the registered shares",
                       description="List the registered shares: name, remote, mount point "
                                   "(and whether it is mounted), options and pins.")
    p.add_argument("--json", action="store_true", help="print them as JSON")
    p.set_defaults(func=cmd_shares)


COMMANDS = {"mount", "unmount", "umount", "status", "sync", "offline", "online", "pin", "unpin",
            "evict", "conflicts", "resolve", "recover", "add", "remove", "shares", "list", "caches"}


def looks_like_remote(word: str) -> bool:
    """Whether ``word`` can be the REMOTE of ``cachefs REMOTE MOUNTPOINT`` (the form
    mount.fuse3 runs): an address has a ':' (host:path, sftp://) or a '/' (a folder), or
    starts with '~'. A bare word is taken for a mistyped sub-command."""
    return ":" in word or "/" in word or word.startswith("~")


def _registered(word: str) -> bool:
    """Whether ``word`` names a registered share (``cachefs NAME MOUNTPOINT -o ...``, the
    fstab form of a share); an unreadable registry is said by the mount that reads it."""
    if not registry.is_share_name(word):
        return False
    try:
        return word in registry.load()
    except registry.RegistryError:
        return True


def unknown_command(word: str) -> int:
    """``cachefs unmoutn ...``: a usage error (exit status 2) that names the command
    meant, rather than a mount attempt of a remote called 'unmoutn'."""
    import difflib

    close = difflib.get_close_matches(word, sorted(COMMANDS), n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    folder = (f"; to mount the folder {word}, write ./{word}"
              if not close and os.path.isdir(word) else "")
    print(f"cachefs: unknown command '{word}'{hint}{folder}; see 'cachefs --help'", file=sys.stderr)
    return 2




def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        if not looks_like_remote(argv[0]) and not _registered(argv[0]):
            return unknown_command(argv[0])
        # "cachefs REMOTE MOUNTPOINT -o ..." as mount.fuse3 runs it for an fstab line
        return mount_main(argv, prog="cachefs")
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]  # (cachefs mount NAME and cachefs add read them again)
    return _one_line_errors(args.func, args)


def _one_line_errors(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return func(args)
    except OSError as exc:
        # The mount died while the command ran (its checks passed), or the system refused
        # something: one line, never a traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            return _fail(f"{where}the mount holding it is stale: its mount process is gone; "
                         "run 'cachefs unmount MOUNTPOINT', then mount it again")
        return _fail(f"{where}{exc.strerror or exc}")


def mount_main(argv: list[str] | None = None, prog: str = "mount.py") -> int:
    """``python mount.py REMOTE MOUNTPOINT [options]``: the same as ``cachefs mount``."""
    parser = argparse.ArgumentParser(prog=prog, description="Mount REMOTE on MOUNTPOINT "
                                     "(the same as 'cachefs mount').")
    add_mount_arguments(parser)
    parser.set_defaults(parser=parser)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    return _one_line_errors(cmd_mount, args)


if __name__ == "__main__":
    sys.exit(main())
