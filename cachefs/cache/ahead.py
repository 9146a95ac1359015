"""Contents read ahead of a folder's readers: at the first opendir of a folder by the mount
process, the content files of its small whole clean files are read into the page cache in
the background (POSIX_FADV_WILLNEED), and in a walk of the tree (``grep -r``, ``tar``, a
build: the folder is the next sibling of the one opened before it) those of the
``WALK_AHEAD`` sibling folders after it too. The reads that follow a listing then find
their bytes there and are served on the trio thread (``Files.read``: ``pread_cached``)
rather than each waiting in turn for a worker thread's read of the disk. That is the case
after a remount, or once the page cache let the content files go; otherwise the advice
finds the pages there and does no IO. The next siblings' too in a walk, since the first
reads of a folder come right after its opendir, before the disk could answer the advice
given then (only in a walk: an ``ls`` of one folder beside a large one must not read that
one's listing). 1,000 files of 4 KiB in 100 folders over WebDAV, read again after a
remount with the page cache dropped: 2,006 -> 2,567 files/s (medians of 8, alternated).
The advice runs on up to ``THREADS`` threads, ``WALK_AHEAD`` folders ahead: each open of
a content file may wait for the disk (its inode, a block of the data folder), and one
thread, two folders ahead, fell behind the walker within ten folders (765 of the 1,000
first opens then found their bytes still on disk); 4 threads, 6 folders ahead, the same
walk: 2,347 and 2,946 -> 2,812 and 3,058 files/s (medians of 3, two rounds alternated).
The folder opened last is read ahead first, and counts as a walk when it is one of the
``WALK_AHEAD`` folders after the one read ahead before: taken oldest first, the advice
stayed two to four folders behind the walker, which had opened the next folders meanwhile
(276-650 of the 1,000 first opens still found their bytes on disk, and the walk ran at
2,144-3,092 files/s; newest first, 3,015-3,332, four rounds alternated). Folders the walker
went past come after, if it gives the advice time (their files it opened are passed over).

Owns: a bounded queue of folders opened, the sets of folders whose opendir was seen to and
of folders read ahead, up to ``THREADS`` worker threads (its own ``CapacityLimiter``, not
the default limiter the fetches use).
Must not touch: the index (it reads the listings given, and asks ``Listings`` for a
sibling's), content (it only advises the kernel about content files: never a read or
write of their bytes), FUSE requests.

Costs: ``opened`` is O(1) on the opendir path (set and dict lookups, one insert); the
choice of files (at most ``SCANNED`` children looked at per folder) runs later in the
background task on the trio thread, the advice in the worker threads. A ``find`` or ``ls
-R`` over many folders starts no storm: ``THREADS`` threads, one folder (and its siblings)
at a time, and a queue of ``QUEUED`` folders at most whose oldest is dropped when a new one
comes (the program listing them has moved on from it; the newest is the one it reads
next). A folder dropped is not marked seen: its next opendir queues it again. Memory: the
queue holds ``QUEUED`` listings (kept by the listing cache anyway), each set ``DONE_MOST``
numbers (then it is emptied: at worst a folder is advised again, a few system calls a file).

The advice is harmless by nature: a content file changed or removed meanwhile (a remote
change, an eviction) is only read into the page cache as it is, or passed over. An
encrypted cache's content files are read ahead too: its reads decrypt them from the page
cache.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import trio

from ..store.index import DIRTY, FULL, Node, Store
from .handles import Opens

log = logging.getLogger(__name__)

#: whole files of a folder up to this size are read ahead, and at most this many of them
#: (4 MiB for a folder), chosen among its first ``SCANNED`` children in listing order
FILE_MOST = 64 << 10
FILES_MOST = 64
SCANNED = 1024
WALK_AHEAD = 6  # next sibling folders read ahead in a walk
THREADS = 4  # threads the advice of a folder (and its siblings) is split among
QUEUED = 16  # folders waiting for their read ahead, at most (the oldest is dropped)
DONE_MOST = 100_000  # folders remembered in each set (opened, read ahead), at most


class ContentsAhead:
    def __init__(self, store: Store, opens: Opens, children: Callable[[int], list[Node]],
                 siblings: Callable[[int, int], list[int]]) -> None:
        """``children``: a folder's listing (``Listings.children``); ``siblings``: the
        listed folders beside one, the next first (``Listings.sibling_folders``)."""
        self._store = store
        self._opens = opens
        self._children = children
        self._siblings = siblings
        #: folder -> its listing, oldest first (a dict: O(1) membership, ordered)
        self._queue: dict[int, list[Node]] = {}
        self._opened: set[int] = set()  # folders whose opendir was seen to
        self._advised: set[int] = set()  # folders whose contents were read ahead
        self._next: list[int] = []  # the siblings after the folder read ahead last
        self._wake = trio.Event()
        self._limiter = trio.CapacityLimiter(THREADS)
        self._running = False
        #: for tests and the status: content files advised, folders dropped from a full queue
        self.advised = 0
        self.dropped = 0

    def opened(self, folder: int, children: list[Node]) -> None:
        """The mount process opens ``folder`` (opendir) with these children: its small
        files' contents (and in a walk those of its next sibling folder) are read ahead
        in the background, once per folder. O(1)."""
        if folder in self._opened or folder in self._queue or not self._running:
            return
        queue = self._queue
        if len(queue) >= QUEUED:
            del queue[next(iter(queue))]
            self.dropped += 1
        queue[folder] = children
        self._wake.set()

    async def run(self) -> None:
        """Read ahead the folders queued, one at a time and the newest first, until
        cancelled (at unmount: the advice under way, a few system calls per file, ends
        first)."""
        self._running = True
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                while self._queue:
                    folder = next(reversed(self._queue))
                    children = self._queue.pop(folder)
                    _add(self._opened, folder)
                    try:
                        paths = self._folder(folder, children)
                        # A walk (one of the folders after the one read ahead before): the next ones too.
                        walk, near = folder in self._next, self._siblings(folder, WALK_AHEAD)
                        self._next = near
                        for sibling in near if walk else ():
                            paths += self._folder(sibling, None)
                    except Exception as exc:  # (a damaged record, say: only a head start lost)
                        log.debug("no read ahead of folder %d: %r", folder, exc)
                        continue
                    if paths:
                        await self._advise(paths)
        finally:
            self._running = False
            self._queue.clear()

    async def _advise(self, paths: list[str]) -> None:
        """``will_need`` of ``paths``, split among up to ``THREADS`` threads; returns when
        all are done (the next folder waits: at most ``THREADS`` threads at a time)."""
        async def part(share: list[str]) -> None:
            done = await trio.to_thread.run_sync(will_need, share, limiter=self._limiter)
            self.advised += done  # (not ``+= await``: that reads the count before the wait)

        parts = min(THREADS, len(paths))
        async with trio.open_nursery() as nursery:
            for i in range(parts):
                nursery.start_soon(part, paths[i::parts])

    def _folder(self, folder: int, children: list[Node] | None) -> list[str]:
        """The content files of ``folder`` to read ahead, unless read ahead already
        (``children``: its listing, else read from the listing cache)."""
        if folder in self._advised:
            return []
        _add(self._advised, folder)
        return self._contents(self._children(folder) if children is None else children)

    def _contents(self, children: list[Node]) -> list[str]:
        """The content files to read ahead: small whole clean files, not opened by this
        process (the kernel keeps those pages in its FUSE page cache) and not empty."""
        opened = self._opens.last_use
        content_path = self._store.content_path
        paths = []
        for node in children[:SCANNED]:
            if node.is_file and 0 < node.size <= FILE_MOST and node.flags & FULL \
                    and not node.flags & DIRTY and node.ino not in opened:
                paths.append(content_path(node.ino))
                if len(paths) >= FILES_MOST:
                    break
        return paths


def _add(folders: set[int], folder: int) -> None:
    if len(folders) >= DONE_MOST:  # (a bound: at worst a folder is read ahead again)
        folders.clear()
    folders.add(folder)


def will_need(paths: list[str]) -> int:
    """Blocking: ask the kernel to read these content files into the page cache, without
    waiting for the disk (POSIX_FADV_WILLNEED starts the reads); one gone meanwhile is
    passed over. How many were advised."""
    done = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOATIME)
        except PermissionError:  # (O_NOATIME: only the file's owner, which the mount is)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            done += 1
        except OSError as exc:
            log.debug("read ahead of %s: %s", path, exc)
        finally:
            os.close(fd)
    return done
