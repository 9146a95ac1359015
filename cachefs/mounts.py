"""What the kernel says about mounts, and the one setting cachefs makes on its own.

Owns: reading ``/proc/self/mountinfo`` (never a stat of the mount point: that would ask
the mount's daemon, which may be this very process not serving yet, or a stuck one, or
fail with ENOTCONN on a stale mount), telling a live cachefs mount from a stale or stuck
one (``probe``), the readahead of a FUSE mount's bdi, and the note a mount leaves in its
cache folder as it ends (``UNMOUNTED``: the changes it left pending, for ``cachefs
unmount`` to tell). Imports nothing of FUSE, so the
``cachefs`` command and the benchmark use it too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_READAHEAD = 1 << 20  # the largest request FUSE sends (max_pages 256)
#: microseconds the FUSE loop keeps reading for the next request before it sleeps
#: (``daemon.set_request_spin``)
DEFAULT_REQUEST_SPIN = 50.0


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mountinfo() -> Iterator[tuple[str, str, str]]:
    """(device "major:minor", mount point, filesystem type) of every mount this process
    sees, in order."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                head, _sep, tail = line.partition(" - ")
                fields = head.split(" ")
                if len(fields) > 4:
                    yield fields[2], _unescape(fields[4]), tail.split(" ")[0]
    except OSError:
        return


def mounts() -> Iterator[tuple[str, str]]:
    """(device "major:minor", mount point) of every mount this process sees, in order."""
    for device, point, _kind in _mountinfo():
        yield device, point


def fs_type(path: Path | str) -> str | None:
    """The filesystem type (``ext4``, ``overlay``, ``fuse.sshfs`` ...) that holds ``path``,
    an existing local folder: the topmost of the longest mount points above it."""
    want = os.path.realpath(path)
    best, found = -1, None
    for _device, point, kind in _mountinfo():
        inside = want == point or want.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= best:
            best, found = len(point), kind
    return found


def is_stacked(path: Path | str) -> bool:
    """Whether ``path`` is on a filesystem made of other filesystems (overlayfs, eCryptfs,
    FUSE): a FUSE passthrough backing file there needs one more level of stacking."""
    kind = fs_type(path) or ""
    return kind in ("overlay", "ecryptfs") or kind.startswith("fuse")


def device_of(mountpoint: Path | str) -> str | None:
    """The device of the last (topmost) mount on ``mountpoint``, or None. The path is
    made absolute but not resolved: resolving would stat the mount point."""
    want = os.path.abspath(mountpoint)
    found = None
    for device, point in mounts():
        if point == want:
            found = device
    return found


def is_mounted(path: Path | str) -> bool:
    return device_of(path) is not None


def mount_type_at(mountpoint: Path | str) -> str | None:
    """The type (``fuse.cachefs`` ...) of the topmost mount on ``mountpoint`` itself, or
    None when nothing is mounted there. Absolute, not resolved (no stat)."""
    want = os.path.abspath(mountpoint)
    found = None
    for _device, point, kind in _mountinfo():
        if point == want:
            found = kind
    return found


def mount_holding(path: Path | str) -> tuple[str, str] | None:
    """(mount point, type) of the innermost mount that holds ``path``, judged from the
    path's text alone (absolute, not resolved: no stat of anything under a mount)."""
    want = os.path.abspath(path)
    best: tuple[str, str] | None = None
    for _device, point, kind in _mountinfo():
        inside = want == point or want.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, kind)
    return best


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo, as ``cachefs list`` shows a mount."""

    point: str
    source: str  # the fsname: the remote, for a cachefs mount (``daemon.fuse_options``)
    kind: str  # fuse.cachefs
    uid: int | None  # the user that mounted it (FUSE's user_id=)


def mounts_of_type(kind: str) -> list[MountEntry]:
    """Every mount of type ``kind`` this process sees, in mount order (read from
    mountinfo alone: nothing under a mount is touched)."""
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                head, _sep, tail = line.rstrip("\n").partition(" - ")
                fields, rest = head.split(" "), tail.split(" ")
                if len(fields) <= 4 or len(rest) < 3 or rest[0] != kind:
                    continue
                uid = None
                for option in rest[2].split(","):
                    if option.startswith("user_id="):
                        with contextlib.suppress(ValueError):
                            uid = int(option[len("user_id="):])
                found.append(MountEntry(_unescape(fields[4]), _unescape(rest[1]), kind, uid))
    except OSError:
        pass
    return found


LIVE, STALE, STUCK, FOREIGN = "live", "stale", "stuck", "foreign"
PROBE_TIMEOUT = 10.0  # a live mount answers its status file at once, even while it syncs


def stale_message(mountpoint: Path | str, kind: str = "fuse.cachefs") -> str:
    """The one line every command gives for a stale mount."""
    what = "cachefs" if kind == "fuse.cachefs" else "FUSE"
    return (f"{mountpoint} is a stale {what} mount: its mount process is gone ('Transport "
            f"endpoint is not connected'); run 'cachefs unmount {mountpoint}', then mount it "
            f"again (the cache and its pending changes are kept)")


def stuck_message(mountpoint: Path | str, timeout: float) -> str:
    return (f"{mountpoint} does not answer within {timeout:g} s: its mount process is stuck; "
            f"'cachefs unmount -z {mountpoint}' detaches it")


def bounded(function: Callable[[], Any], timeout: float) -> tuple[bool, Any]:
    """Run ``function`` in a thread for at most ``timeout`` seconds: (finished, result or
    the exception it raised). A call blocked in a stuck FUSE request cannot be stopped:
    its (daemon) thread is left behind, and ends with the process."""
    outcome: list[Any] = []

    def call() -> None:
        try:
            outcome.append(function())
        except BaseException as exc:  # handed to the caller
            outcome.append(exc)

    thread = threading.Thread(target=call, name="cachefs probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return (False, None) if thread.is_alive() else (True, outcome[0])


def probe(mountpoint: Path | str, timeout: float = PROBE_TIMEOUT) -> tuple[str, dict[str, Any] | None]:
    """Whether the FUSE mount on ``mountpoint`` is a ``LIVE`` cachefs mount (with its
    status), ``STALE`` (its process is gone: the kernel answers ENOTCONN at once),
    ``STUCK`` (no answer within ``timeout``) or ``FOREIGN`` (answers, but is no cachefs
    mount). The one access is a read of ``.cachefs/status``, in a thread, bounded."""
    path = os.path.join(os.path.abspath(mountpoint), ".cachefs", "status")

    def read() -> bytes:
        with open(path, "rb") as f:
            return f.read()

    finished, result = bounded(read, timeout)
    if not finished:
        return STUCK, None
    if isinstance(result, OSError):
        if result.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            return STALE, None
        return FOREIGN, None
    if isinstance(result, BaseException):
        raise result
    try:
        status = json.loads(result)
    except ValueError:
        return FOREIGN, None
    return (LIVE, status) if isinstance(status, dict) else (FOREIGN, None)


#: in the cache folder: {"pid": the mount process, "pending": changes it left} (JSON),
#: written as the mount ends
UNMOUNTED = "unmounted"


def note_unmounted(cache_dir: Path | str, pid: int, pending: int) -> None:
    """Leave what ``cachefs unmount`` tells: how many changes this mount left pending."""
    path = Path(cache_dir) / UNMOUNTED
    temporary = path.with_name(f"{UNMOUNTED}.{pid}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as note:  # (private, as everything in a cache folder)
            note.write(json.dumps({"pid": pid, "pending": pending}))
        temporary.replace(path)
    except OSError as exc:
        log.debug("cannot write %s: %s", path, exc.strerror)


def left_pending(cache_dir: Path | str, pid: int) -> int | None:
    """The changes mount process ``pid`` left pending as it ended, if it said."""
    try:
        note = json.loads((Path(cache_dir) / UNMOUNTED).read_text())
        return int(note["pending"]) if note.get("pid") == pid else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def set_readahead(mountpoint: Path, size: int) -> None:
    """The kernel reads a FUSE file ahead in requests of at most its bdi's readahead
    (128 KiB by default): with 1 MiB, a sequential read costs 8 times fewer round trips
    through pyfuse3. Only root may change it; others keep the default."""
    device = device_of(mountpoint)
    if device is None:
        return
    path = Path("/sys/class/bdi") / device / "read_ahead_kb"
    try:
        path.write_text(str(max(4, size // 1024)))
    except OSError as exc:
        log.debug("readahead left at the kernel's default (%s: %s)", path, exc.strerror)
    else:
        log.debug("readahead of %s set to %d KiB", mountpoint, size // 1024)
