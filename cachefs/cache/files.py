"""Open files: open (close-to-open revalidation, a writer's file made whole first), reads,
release, orphans removed at their last release, and FUSE passthrough: content files the
kernel reads (and writes) itself for the handles of an inode (``_Backing``).

Owns: the passthrough backings by inode, the reusable buffers of large reads, and the
open counts (``Opens``, which the write path reads).
Must not touch: the namespace beyond asking ``Names`` to create a file, listings beyond asking them to revalidate (``Listings.revalidate``),
fetching (``Content``), the journal beyond the write path's own calls (``Writes``), FUSE
requests (the ``Kernel`` it is given registers backing files).

Concurrency: on the trio thread. ``open`` awaits a revalidation, the fetch of a writer's
file and its base sum, all before it counts the handle: a handle exists only once counted,
and ``release`` is synchronous. A read copies from the content file on the trio thread
when the page cache holds it, else in a worker thread (which touches only the fd and the
buffer); each large-read buffer is reused only after its reply is out (``read``).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import time
from dataclasses import dataclass

import trio

from ..errors import Busy, IsADirectory, RemoteError
from ..link.connectivity import Connectivity
from ..store.index import CONFLICT, DIRTY, FULL, KERNEL_WRITES, LOCAL_TRUTH, ORPHAN, Node, Store, Txn
from .common import CacheConfig, Kernel, decrement
from .content import Content
from .handles import OpenFile, Opens
from .listing import Listings
from .names import Names
from .writes import Writes

log = logging.getLogger(__name__)

THREAD_READ = 256 << 10  # reads at least this large copy in a worker thread
READ_BUFFER = 1 << 20  # the largest read FUSE sends (max_pages 256)
#: fully cached files at least this big are read by the kernel itself (FUSE passthrough,
#: ``Files._pass_through``); smaller ones are served once and then from the FUSE page cache,
#: which passthrough would bypass for two more system calls per open
PASSTHROUGH_MIN = 1 << 20
#: files up to this size have their bytes given to the kernel at their first open by this
#: process (``Files._store_in_kernel``)
STORE_MOST = 64 << 10


class Files:
    def __init__(self, store: Store, conn: Connectivity, config: CacheConfig, kernel: Kernel,
                 listings: Listings, content: Content, writes: Writes, names: Names, opens: Opens) -> None:
        self.store = store
        self.conn = conn
        self.config = config
        self.kernel = kernel
        self._listings = listings
        self._content = content
        self._writes = writes
        self._names = names
        self.opens = opens
        self._read_buffers: list[bytearray] = []  # free buffers of large reads
        #: ino -> the content file the kernel reads itself for its open handles
        self._backings: dict[int, _Backing] = {}

    async def open(self, ino: int, flags: int = os.O_RDONLY) -> OpenFile:
        """Close-to-open: revalidate attributes older than attr_timeout.

        A file opened for writing is made whole in the cache first (its upload will be
        the whole file), unless it is being truncated to nothing.
        """
        node = self._listings.node(ino)
        if node.is_dir:
            raise IsADirectory()
        known = node
        if not node.flags & LOCAL_TRUTH and self.conn.online and not self._listings.checked(node) \
                and not self._listings.path_pending(node):
            node = await self._listings.revalidate(node)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if writable:
            await self._prepare_writer(node, bool(flags & os.O_TRUNC))
        fd = self._open_content(ino, writable or node.size >= PASSTHROUGH_MIN)
        # (changed: the kernel drops its pages of the old version at this open itself,
        # rather than when the invalidation asked for by the stale content reaches it)
        handle = OpenFile(ino, fd, writable, size_at_open=node.size, changed=node is not known,
                          seen=self.opens.remote_changes.get(ino, 0))
        try:
            self._pass_through(handle, node)
        except BaseException:
            os.close(fd)
            raise
        opens = self.opens  # (the open counts of Opens, kept inline: the hot path)
        if not writable and not handle.backing and not handle.changed and 0 < node.size <= STORE_MOST \
                and not opens.count.get(ino) and ino not in opens.last_use:
            self._store_in_kernel(handle, node)
        opens.count[ino] = opens.count.get(ino, 0) + 1
        opens.last_use[ino] = time.time()
        if writable:
            opens.writers[ino] = opens.writers.get(ino, 0) + 1
            if flags & os.O_TRUNC and node.size:
                self._writes.truncate(handle, 0)
            elif not node.has(FULL):
                self._writes.mark_full(ino)
        return handle

    def _open_content(self, ino: int, rw: bool) -> int:
        """The content file of ``ino``, made if it is not there yet. A read-only handle of a
        file too small for passthrough (whose backing a writer may join) opens it read-only
        where it is there: an open with ``O_CREAT`` takes the lock of the folder all content
        files are in, which the fetches' writes hold in turn (opens measured at 0.5-0.9 ms
        behind them in a walk of small files)."""
        path = self.store.content_path(ino)
        if not rw:
            try:
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                pass
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _store_in_kernel(self, handle: OpenFile, node: Node) -> None:
        """The first open of a small file by this process (the kernel has none of its
        pages: after a remount, say): its bytes go into the kernel's page cache with the
        open's answer (``Kernel.store``), where the content file has them in memory, so
        that the program's read asks nothing of this process: one FUSE request (and its
        wake-ups) less per file. The same bytes a read would get; opens after it keep the
        kernel's pages as any other (``keep_cache``), and a remote change drops them as
        any other.

        Only while nothing has the file open (the caller checks): the kernel keeps a page
        locked while a write into it or a read of it waits for its answer, which this
        process gives only after this open's; the store, waiting for that page on the
        trio thread, would hang the mount, and put older bytes over a writer's
        (reviewed: both reproduced with a writer of a file created here still open)."""
        if not self._content.whole(node):
            return
        data = self.store.content.pread_cached(handle.fd, node.size, 0)
        if data is not None and len(data) == node.size:
            self.kernel.store(node.ino, bytes(data))

    async def _prepare_writer(self, node: Node, truncating: bool) -> None:
        """Before a writer's open: the file whole here (unless cut to nothing), no fetch
        of it still under way, its base version's sum recorded."""
        if not truncating and not node.has(FULL) and node.size:
            await self._content.ensure_present(node, 0, node.size)
        if truncating:
            await self._content.settle(node.ino)  # no fetch may land after the truncation
        if not truncating or self._content.whole(node):
            await self._writes.record_base_sum(node)  # (whole now, even if not yet checkpointed)

    async def create(self, parent: int, name: bytes, mode: int, flags: int,
                     owner: tuple[int, int] | None = None) -> tuple[Node, OpenFile]:
        """A new empty file (``Names.create``) and its handle, open for writing."""
        node, fd = await self._names.create(parent, name, mode, owner)
        opens, ino = self.opens, node.ino  # (the open counts of Opens, kept inline: the hot path)
        opens.count[ino] = opens.count.get(ino, 0) + 1
        opens.writers[ino] = opens.writers.get(ino, 0) + 1
        return node, OpenFile(ino, fd, writable=True, wrote=True)

    def _pass_through(self, handle: OpenFile, node: Node) -> None:
        """Let the kernel read (and write) this open's content file itself: FUSE passthrough.

        The kernel takes passthrough for an inode only while no open of it uses the page
        cache, and then takes only passthrough opens of it, all on one backing file, until
        the last closes. So: a read-only open of a whole, clean, large file that nothing
        has open starts it; while it lasts every open joins it. A writer that joins writes
        past the cache: its change is journaled now (the file is DIRTY from this open on,
        so a kill loses nothing), and its size and times are read from the content file
        while it is open and at its release. When the remote changes meanwhile the open
        handles keep the old content file, whole (``detach``); a writer cannot join them
        then (EBUSY), since what it wrote would go to that old version.
        """
        ino = handle.ino
        backing = self._backings.get(ino)
        if backing is None:
            backing = self._start_backing(handle, node)
            if backing is None:
                return
        elif handle.writable:
            if backing.detached:
                raise Busy("the file is open and its old version in use: close it first")

            def join(t: Txn) -> None:
                node = t.node(ino)
                assert node is not None, f"inode {ino} is not in the index"
                node.flags |= KERNEL_WRITES
                self._writes.content_changed(t, node)
            self.store.transact(join)
            backing.writers += 1
            handle.wrote = True
            handle.stamp = _stamp(os.fstat(handle.fd))
        backing.opens += 1
        handle.backing = backing.id

    def _start_backing(self, handle: OpenFile, node: Node) -> _Backing | None:
        """A backing for a read-only open of a whole, clean, large file nothing has open."""
        ino = handle.ino
        if handle.writable or node.size < PASSTHROUGH_MIN or self.opens.count.get(ino) \
                or node.flags & (DIRTY | CONFLICT) or not self.passthrough_on:
            return None
        if not self._content.whole(node):
            return None  # (whole but not yet checkpointed is whole enough to read)
        backing_id = self.kernel.backing_open(handle.fd)
        if not backing_id:
            return None
        backing = self._backings[ino] = _Backing(backing_id)
        return backing

    def _release_backing(self, handle: OpenFile) -> None:
        ino = handle.ino
        backing = self._backings[ino]
        backing.opens -= 1
        if handle.writable:
            backing.writers -= 1
        if not backing.opens:
            del self._backings[ino]
            self.kernel.backing_close(backing.id)
        if handle.writable:  # (last: an index write that fails leaves the counts right)
            self._take_written(handle, last=not backing.writers)

    def _take_written(self, handle: OpenFile, last: bool) -> None:
        """What the kernel wrote through a passthrough writer, into the index: the content
        file's size, and its mtime if it changed; ``last``: no other such writer is open."""
        st = os.fstat(handle.fd)
        changed = _stamp(st) != handle.stamp

        def take(t: Txn) -> None:
            node = t.node(handle.ino)
            if node is None:
                return
            node.size = st.st_size
            if changed:
                node.mtime_ns = st.st_mtime_ns
                node.ctime_ns = time.time_ns()
            node.flags |= FULL
            if last:
                node.flags &= ~KERNEL_WRITES
            self._writes.content_changed(t, node)
        self.store.transact(take)
        # The page cache of this inode, from opens before the passthrough, is out of date.
        self.kernel.invalidate_inode(handle.ino)

    def detach(self, ino: int) -> None:
        """The remote content changed: the handles the kernel reads for itself keep the
        content file, whole, as the old version; the cache starts a new one. The handles
        this process reads for get EIO for what they read from now on (``read``): the
        content they would get is the new version's, and never mixed with the old."""
        if self.opens.count.get(ino):
            self.opens.remote_changes[ino] = self.opens.remote_changes.get(ino, 0) + 1
        backing = self._backings.get(ino)
        if backing is not None and not backing.detached:
            backing.detached = True
            self.store.remove_content_file(ino)

    def written_through(self, node: Node) -> Node:
        """The node with the size and mtime of its content file while the kernel may be
        writing that file itself (a passthrough writer is open); else the node as is."""
        backing = self._backings.get(node.ino)
        if backing is None or not backing.writers:
            return node
        try:
            st = os.stat(self.store.content_path(node.ino))
        except OSError:
            return node
        return dataclasses.replace(node, size=st.st_size, mtime_ns=max(node.mtime_ns, st.st_mtime_ns))

    def release(self, handle: OpenFile) -> None:
        ino = handle.ino
        try:
            if handle.backing:
                self._release_backing(handle)
        finally:
            os.close(handle.fd)
            decrement(self.opens.count, ino)  # (the open counts of Opens, kept inline: the hot path)
            if ino not in self.opens.count:
                self.opens.remote_changes.pop(ino, None)
            if handle.writable:
                decrement(self.opens.writers, ino)
                if ino not in self.opens.writers:
                    self._listings.writer_closed(ino)
        held = self._writes.released(ino) if handle.writable else None
        if handle.wrote:
            node = held or self.store.get(ino)
            if node is not None:
                self._content.usage += node.size - handle.size_at_open
            self._writes.changed()
        if ino not in self.opens.count and ino in self.opens.orphans:  # (no index read per close)
            self.opens.orphans.discard(ino)
            node = self.store.get(ino)
            if node is not None and node.has(ORPHAN):
                self.store.transact(lambda t: t.delete_node(ino))
                self.store.remove_content_file(ino)

    async def read(self, handle: OpenFile, offset: int, size: int) -> bytes | memoryview:
        """Bytes at ``offset``, fetching what is missing.

        A small read runs on the trio thread when the page cache holds its bytes (a
        thread hop would cost more than the read); others go to a thread. The content
        file is read ahead by the kernel's own readahead: a POSIX_FADV_WILLNEED ahead
        of the reader, tried before, halved the disk's rate with threads reading.
        """
        node = self._listings.node(handle.ino)
        self._unchanged_since_open(handle)
        end = min(offset + size, node.size)
        if offset >= end:
            return b""
        if not node.has(FULL):
            await self._content.ensure_present(node, offset, end)
            # The remote version may have changed while this read waited for its fetch:
            # its bytes, fetched since, would be the new version's, beside the old ones
            # this handle has read already (seen mixed under load).
            self._unchanged_since_open(handle)
        content = self.store.content
        size = end - offset
        if size < THREAD_READ:
            data = content.pread_cached(handle.fd, size, offset)
            if data is None:
                data = await trio.to_thread.run_sync(content.pread, handle.fd, size, offset)
            return data  # (maybe a view into a reused buffer: no await before the reply)
        # A large read copies a megabyte out of the page cache: in a thread, so that the
        # kernel's parallel readahead requests are copied on both cores while this one
        # sends replies. Each buffer is reused once its reply is out, which pyfuse3 sends
        # before trio runs anything else (callbacks included).
        buf = self._read_buffers.pop() if self._read_buffers else bytearray(0)
        if len(buf) < size:
            buf = bytearray(max(size, READ_BUFFER))
        view = memoryview(buf)[:size]
        try:
            got = await trio.to_thread.run_sync(content.pread_into, handle.fd, view, offset)
        finally:
            trio.lowlevel.current_trio_token().run_sync_soon(self._read_buffers.append, buf)
        return view[:got]

    def _unchanged_since_open(self, handle: OpenFile) -> None:
        """EIO when the remote content changed since ``handle`` was opened (``detach``)."""
        if self.opens.remote_changes and handle.seen != self.opens.remote_changes.get(handle.ino, 0):
            raise RemoteError(errno.EIO, "the file changed on the server while open")

    @property
    def passthrough_on(self) -> bool:
        """Whether the kernel may read whole cached files itself (``_pass_through``)."""
        return self.config.passthrough and self.kernel.passthrough and not self.store.content.encrypted

    def passthrough_status(self) -> dict[str, object]:
        """Whether the kernel reads whole cached files itself, how many are open so, and
        why not ("off") when it does not."""
        status: dict[str, object] = {"on": self.passthrough_on, "open_files": len(self._backings)}
        if not status["on"]:
            status["off"] = ("--no-passthrough" if not self.config.passthrough else
                             "the cache is encrypted" if self.store.content.encrypted else
                             self.kernel.passthrough_off)
        return status


@dataclass
class _Backing:
    """A content file the kernel reads itself (FUSE passthrough) for an inode's handles."""

    id: int  # its backing id on the FUSE device
    opens: int = 0
    writers: int = 0
    detached: bool = False  # the remote changed: this file, unlinked, is the old version


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns
