"""Open handles: one ``OpenFile`` per open(), and ``Opens``, which files are open (for
writing) now and which were orphaned (unlinked while open) by this process.

Owns: those counts. ``cache.files`` changes them (open, create, release: inline there,
on the hot path); the write path reads them (a file still being written is not summed)
and marks an unlinked open file an orphan (``Names``); the fetch part drops a last use
with the content. Must not touch: the store, content, FUSE.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OpenFile:
    """One open() of a file: its node and the content file."""

    ino: int
    fd: int
    writable: bool = False
    wrote: bool = False
    size_at_open: int = 0
    backing: int = 0  # the kernel reads the content file itself (``Files._pass_through``)
    stamp: tuple[int, int, int] = (0, 0, 0)  # a passthrough writer's content file at open
    changed: bool = False  # the open found the remote changed: the kernel's pages are old
    seen: int = 0  # the remote changes of the file known at open (``Opens.remote_changes``)


class Opens:
    def __init__(self) -> None:
        self.count: dict[int, int] = {}  # ino -> handles open
        self.writers: dict[int, int] = {}  # ino -> handles open for writing
        self.orphans: set[int] = set()  # made ORPHAN (unlinked while open) by this process
        #: ino -> how many times the remote's version changed while the file was open (a
        #: handle opened before such a change must not read bytes of the new version)
        self.remote_changes: dict[int, int] = {}
        #: ino -> when it was last opened (wall clock), for eviction least recently used
        #: first; dropped when the file or its content goes for good (``forget``: removed,
        #: evicted), kept when the content is only stale
        self.last_use: dict[int, float] = {}

    def forget(self, ino: int) -> None:
        """The file's cached content went: so does its last use."""
        self.last_use.pop(ino, None)
