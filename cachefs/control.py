"""The ``.cachefs/`` folder at the mount root: virtual files to watch and steer the mount.

Owns: the virtual inode numbers, the names in ``.cachefs/``, and the content of
``status``. Must not touch: the remote (commands become sync-manager requests) or FUSE
details (``cachefs.fs`` serves these files).
"""

from __future__ import annotations

import json
import os
import stat as stat_mod
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .cache.cache import Cache

DIR_INO = 2
STATUS_INO = 3

NAMES: dict[bytes, int] = {b"status": STATUS_INO}


@dataclass(frozen=True)
class VirtualAttrs:
    mode: int
    nlink: int


def is_virtual(ino: int) -> bool:
    return DIR_INO <= ino < 16


def attrs(ino: int) -> VirtualAttrs:
    if ino == DIR_INO:
        return VirtualAttrs(stat_mod.S_IFDIR | 0o555, 2)
    return VirtualAttrs(stat_mod.S_IFREG | 0o444, 1)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


class Control:
    def __init__(self, cache: Cache, mountpoint: Path, cache_dir: Path) -> None:
        self.cache = cache
        self.mountpoint = mountpoint
        self.cache_dir = cache_dir
        self.started = time.time()
        self.last_sync: float | None = None

    def status(self) -> dict:
        conn = self.cache.conn
        store = self.cache.store
        return {
            "state": "online" if conn.online else "offline",
            "connectivity": conn.state.value,
            "remote": conn.remote.description,
            "pending": store.count(store.journal),
            "conflicts": store.count(store.conflicts),
            "cache_bytes": store.cached_bytes(),
            "last_sync": _iso(self.last_sync),
            "last_online": _iso(conn.last_online),
            "last_error": conn.last_error,
            "mountpoint": str(self.mountpoint),
            "cache_dir": str(self.cache_dir),
            "pid": os.getpid(),
        }

    def read(self, ino: int) -> bytes:
        if ino == STATUS_INO:
            return (json.dumps(self.status(), indent=2) + "\n").encode()
        raise KeyError(ino)
