"""Empty content files made ahead of need, so that creating a file costs a rename.

Allocating an inode is not always cheap: ext4 skips inodes freed in the last seconds, and
after many deletions (a build's clean, a test run) it scans block groups for a free one:
one ``open(O_CREAT)`` measured 0.6-1.1 ms on this project's machine, most of a file
create's time. A background thread keeps a few empty files open in the data folder; a
create takes one and renames it to its inode's name (no allocation on the request path).

Spares are named ``.spare-N`` and outlive the mount (empty files cost an inode each): the
next mount adopts them, so a cache pays for its spares once.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = ".spare-"


class SparePool:
    def __init__(self, folder: Path, size: int = 1024) -> None:
        self.folder = folder
        self.size = size
        self._spares: list[tuple[int, str]] = []  # (fd, path), opened O_RDWR
        self._lock = threading.Lock()
        self._want = threading.Event()
        self._closed = False
        self._counter = 0
        for entry in os.scandir(folder):  # kept by an earlier mount
            if entry.name.startswith(PREFIX):
                try:
                    self._counter = max(self._counter, int(entry.name[len(PREFIX):]))
                    fd = os.open(entry.path, os.O_RDWR | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW)
                except (OSError, ValueError):
                    continue
                self._spares.append((fd, entry.path))
        self._thread = threading.Thread(target=self._fill, name="cachefs-spares", daemon=True)
        self._want.set()
        self._thread.start()

    def take(self, path: str) -> int:
        """An empty file at ``path`` (replacing any), opened read-write; its descriptor."""
        with self._lock:
            spare = self._spares.pop() if self._spares else None
            if len(self._spares) < self.size // 2:
                self._want.set()
        if spare is not None:
            fd, spare_path = spare
            try:
                os.rename(spare_path, path)
                return fd
            except OSError as exc:
                os.close(fd)
                log.debug("spare content file unusable (%s): creating one", exc)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    def _fill(self) -> None:
        while True:
            self._want.wait()
            self._want.clear()
            while True:
                with self._lock:
                    if self._closed or len(self._spares) >= self.size:
                        break
                    self._counter += 1
                    path = str(self.folder / f"{PREFIX}{self._counter}")
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                except OSError as exc:  # a full disk: creates will say so themselves
                    log.debug("no spare content file: %s", exc)
                    break
                with self._lock:
                    if self._closed:
                        os.close(fd)
                        return
                    self._spares.append((fd, path))
            if self._closed:
                return

    def close(self) -> None:
        with self._lock:
            self._closed = True
            spares, self._spares = self._spares, []
        self._want.set()
        self._thread.join(timeout=5)
        for fd, _path in spares:
            os.close(fd)  # the files stay, for the next mount
