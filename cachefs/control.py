"""The ``.cachefs/`` folder at the mount root: virtual files to watch and steer the mount.

Owns: the virtual inode numbers, the names in ``.cachefs/``, the content of ``status``,
and the command language of ``control`` (one command per write; see
docs/control-file.md). Must not touch: the remote (commands become sync-manager requests),
the store, the link or the kernel (it asks the ``Cache`` façade, the sync manager and the
hoard by their named methods), or FUSE details (``cachefs.fs`` serves these files).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat as stat_mod
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import trio

from .cache.cache import Cache, Node
from .cache.hoard import Hoard
from .errors import CacheError, CommandError, RemoteError, SyncFailed, Unavailable
from .sync.manager import SyncManager

log = logging.getLogger(__name__)

DIR_INO = 2
STATUS_INO = 3
CONTROL_INO = 4
CONFLICTS_INO = 5

NAMES: dict[bytes, int] = {b"status": STATUS_INO, b"control": CONTROL_INO, b"conflicts": CONFLICTS_INO}
MAX_COMMAND = 4096
KERNEL_SETTLE = 5.0  # seconds a command waits for the kernel to drop the names it changed


@dataclass(frozen=True)
class VirtualAttrs:
    mode: int
    nlink: int


def is_virtual(ino: int) -> bool:
    return DIR_INO <= ino < 16


def is_readable_file(ino: int) -> bool:
    """``status`` and ``conflicts``: files whose content ``Control.read`` makes."""
    return ino in (STATUS_INO, CONFLICTS_INO)


def attrs(ino: int) -> VirtualAttrs:
    if ino == DIR_INO:
        return VirtualAttrs(stat_mod.S_IFDIR | 0o755, 2)
    if ino == CONTROL_INO:
        return VirtualAttrs(stat_mod.S_IFREG | 0o200, 1)
    return VirtualAttrs(stat_mod.S_IFREG | 0o444, 1)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


class Control:
    def __init__(self, cache: Cache, sync: SyncManager, hoard: Hoard, mountpoint: Path,
                 cache_dir: Path) -> None:
        self.cache = cache
        self.sync = sync
        self.hoard = hoard
        self.mountpoint = mountpoint
        self.cache_dir = cache_dir
        self.started = time.time()
        self.last_error: str | None = None

    # -- reading --------------------------------------------------------------------------
    def status(self) -> dict[str, object]:
        link = self.cache.link_status()
        state = "syncing" if self.sync.syncing else ("online" if self.cache.online else "offline")
        hoard = self.hoard
        progress = None
        if self.sync.syncing:
            progress = {"task": "sync", **self.sync.progress.as_dict()}
        elif hoard.progress is not None:
            progress = {"task": "pin", **hoard.progress.as_dict()}
        return {
            "state": state,
            "connectivity": link["connectivity"],
            "remote": link["remote"],
            "pending": self.sync.pending(),
            "conflicts": self.cache.conflict_count(),
            "conflict_kinds": self.cache.conflict_kinds(),
            "progress": progress,
            "cache_bytes": self.cache.cached_bytes(),
            "cache_limit": hoard.limit,
            "passthrough": self.cache.passthrough_status(),
            "callbacks": link["callbacks"],
            "over_limit_pinned": hoard.over_limit_pinned,
            "pinned": hoard.root_paths(),
            "last_sync": _iso(self.sync.last_sync),
            "last_online": _iso(link["last_online"]),
            "last_error": self.last_error or self.sync.last_error or link["last_error"],
            "mountpoint": str(self.mountpoint),
            "cache_dir": str(self.cache_dir),
            "client": self.sync.client,
            "pid": os.getpid(),
        }

    def read(self, ino: int) -> bytes:
        if ino == STATUS_INO:
            return (json.dumps(self.status(), indent=2) + "\n").encode()
        if ino == CONFLICTS_INO:
            return (json.dumps(self.cache.conflict_records(), indent=2) + "\n").encode()
        raise KeyError(ino)

    # -- commands -------------------------------------------------------------------------
    async def command(self, data: bytes) -> None:
        """Run one command; raises ``CommandError`` or ``SyncFailed`` (the write fails)."""
        try:
            words = self._parse(data)
            await self._run(words)
        except (CommandError, SyncFailed) as exc:
            self.last_error = str(exc)
            log.warning("control command failed: %s", exc)
            raise
        self.last_error = None
        # Names the command renamed or removed are gone from the kernel's cache before the
        # write returns (bounded: an invalidation the kernel holds up must not hang it).
        with trio.move_on_after(KERNEL_SETTLE):
            await self.cache.kernel_settled()

    @staticmethod
    def _parse(data: bytes) -> list[str]:
        if len(data) > MAX_COMMAND:
            raise CommandError(f"command too long ({len(data)} bytes; at most {MAX_COMMAND})")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise CommandError("command is not UTF-8 text") from None
        text = text.strip()
        if "\n" in text or "\0" in text:
            raise CommandError("one command per write")
        if not text:
            raise CommandError("empty command")
        return text.split(" ", 1)

    async def _run(self, words: list[str]) -> None:
        verb = words[0]
        if verb == "sync":
            self._no_argument(words)
            await self.sync.request_sync()
        elif verb == "offline":
            self._no_argument(words)
            self.cache.work_offline()
        elif verb == "online":
            self._no_argument(words)
            self.cache.work_online()
        elif verb in ("pin", "unpin", "evict"):
            path = self._path_argument(words)
            node = await self._node(path)
            if verb == "pin":
                await self._pin(path, node)
            elif verb == "unpin":
                self.hoard.unpin(node.ino)
            else:
                self.hoard.evict(node.ino)
        elif verb == "resolve":
            rest = self._path_argument(words)
            path, _, keep = rest.rpartition(b" ")
            if keep not in (b"local", b"remote", b"both") or not path:
                raise CommandError("usage: resolve PATH local|remote|both")
            await self.sync.resolve(self._clean_path(path), keep.decode())
        else:
            raise CommandError(f"unknown command {verb[:40]!r}")

    async def _pin(self, path: bytes, node: Node) -> None:
        """Pin ``node``; what the walk meets (offline, a file or folder the server
        refuses, a name gone meanwhile) is this command's error, never the mount's end."""
        try:
            await self.hoard.pin(node.ino)
        except Unavailable as exc:
            raise CommandError(f"pin: remote is offline ({exc}); what is cached stays pinned",
                               errno.EHOSTDOWN) from exc
        except (RemoteError, CacheError) as exc:
            raise CommandError(f"{path.decode(errors='replace') or '.'}: pinned, but not all of it "
                               f"could be fetched: {_reason(exc)}", exc.errno or errno.EIO) from exc

    def _path_argument(self, words: list[str]) -> bytes:
        if len(words) < 2 or not words[1].strip():
            raise CommandError(f"{words[0]} needs a PATH (relative to the mount root)")
        return self._clean_path(words[1].encode("utf-8", "surrogateescape"))

    @staticmethod
    def _clean_path(path: bytes) -> bytes:
        """A mount-relative path, normalised; absolute paths and escapes are refused."""
        if path.startswith(b"/"):
            raise CommandError("paths are relative to the mount root, not absolute")
        parts: list[bytes] = []
        for part in path.split(b"/"):
            if part in (b"", b"."):
                continue
            if part == b"..":
                if not parts:
                    raise CommandError("path escapes the mount root")
                parts.pop()
                continue
            parts.append(part)
        if parts and parts[0] == b".cachefs":
            raise CommandError("the .cachefs folder is not part of the share")
        return b"/".join(parts)

    async def _node(self, path: bytes) -> Node:
        try:
            return await self.cache.resolve_path(path)
        except Unavailable as exc:
            raise CommandError(f"{path.decode(errors='replace')}: not cached and the remote is offline",
                               errno.EHOSTDOWN) from exc
        except (CacheError, RemoteError) as exc:  # (RemoteError: a listing the server refused)
            raise CommandError(f"{path.decode(errors='replace')}: {_reason(exc)}",
                               exc.errno or errno.EIO) from exc

    @staticmethod
    def _no_argument(words: list[str]) -> None:
        if len(words) > 1:
            raise CommandError(f"{words[0]} takes no argument")


def _reason(exc: CacheError | RemoteError) -> str:
    """Why, in words: the errno's text where the error has no message of its own (a bare
    ``NotFound`` says ``ENOENT``; a server's refusal may carry its errno twice)."""
    code = exc.errno or errno.EIO
    text = str(exc)
    if isinstance(exc, RemoteError) or text == errno.errorcode.get(code):
        return os.strerror(code)
    return text
