"""The FUSE layer: kernel requests in, cache calls out, errno back.

Owns: handle bookkeeping for the kernel (open handles, directory snapshots), the
translation of nodes to ``EntryAttributes``, the one table that maps domain errors to
errno (``_errno_of``), and ``KernelNotifier`` (invalidations, passthrough backing files).
Must not touch: the remote, the store, LMDB, sync: only the ``Cache`` façade and
``Control``. Only ``FUSEError`` may leave a handler: anything else would end the mount,
so the ``translate`` decorator turns every exception into one.
(The kernel's lookup counts are not kept: nothing here reads them. A node unlinked while
open is removed at its last release, which the cache counts itself.)
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat as stat_mod
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from . import control, mounts
from .cache.cache import CONTROL_NAME, ROOT_INO, Cache, Kernel, Node, OpenFile, index_full, is_index_error
from .cache.cache import LOCAL_ONLY
from .control import Control
from .errors import OFFLINE_ERRNO, CacheError, CommandError, NotFound, RemoteError, SyncFailed, Unavailable
from .owners import Owners, groups_of

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

STATE_XATTR = b"user.cachefs.state"
#: what ``mknod`` makes as a local-only object (``LOCAL_ONLY``)
_LOCAL_ONLY_KINDS = (stat_mod.S_IFIFO, stat_mod.S_IFSOCK, stat_mod.S_IFCHR, stat_mod.S_IFBLK)
#: an open folder's entries for readdir: the few made at its opendir (``.``, ``..``, at the
#: root ``.cachefs`` when shown), then its listing, shared with the cache's kept listing
#: and never copied (a 10,000-entry folder costs no more to open than before)
DirEntries = tuple[list[tuple[bytes, pyfuse3.EntryAttributes]], list[tuple[bytes, pyfuse3.EntryAttributes]]]
_NO_ENTRIES: DirEntries = ([], [])
# FUSE passthrough as the pyfuse3 of scripts/build-passthrough offers it (a stock pyfuse3
# has none of the three; docs/install.md, "The pyfuse3 fork and how it can go"). The two
# backing calls are libfuse's fuse_passthrough_open/close for the request being answered.
_passthrough_granted: Callable[[], bool] | None = getattr(pyfuse3, "passthrough_granted", None)
_backing_open: Callable[[int], int] | None = getattr(pyfuse3, "backing_open", None)
_backing_close: Callable[[int], None] | None = getattr(pyfuse3, "backing_close", None)


def _errno_of(exc: BaseException) -> int:
    """The errno a program sees for a domain error. The one table of the mount."""
    if isinstance(exc, FUSEError):
        return exc.errno
    if isinstance(exc, CacheError):
        return exc.errno
    if isinstance(exc, Unavailable):
        return OFFLINE_ERRNO
    if isinstance(exc, (SyncFailed, CommandError)):
        return exc.errno
    if isinstance(exc, RemoteError):
        return exc.errno or errno.EIO
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno  # local disk: ENOSPC, EIO ...
    if index_full(exc):
        return errno.ENOSPC  # the index could not grow: the cache's disk is full
    return errno.EIO


def _index_damaged(ops: object, what: str, exc: BaseException) -> None:
    """A request met a damaged index record or page: it gets EIO, and the log one line
    (once per damage) that says what and how to save the changes, not a traceback."""
    cache = getattr(ops, "cache", None)
    message = cache.damage(exc) if isinstance(cache, Cache) else f"cache index damaged: {exc}"
    if message is None:
        log.debug("%s: %s", what, exc)
    else:
        log.error("%s failed: %s", what, message)


def translate(fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except FUSEError:
            raise
        except (CacheError, Unavailable, RemoteError, SyncFailed, CommandError) as exc:
            log.debug("%s: %s", fn.__name__, exc)
            raise FUSEError(_errno_of(exc)) from None
        except trio.Cancelled:
            raise
        except Exception as exc:
            err = _errno_of(exc)
            if isinstance(exc, OSError) or err == errno.ENOSPC:
                log.warning("%s failed: %s", fn.__name__, exc)
            elif is_index_error(exc):
                _index_damaged(args[0] if args else None, fn.__name__, exc)
            else:
                log.exception("unexpected error in %s", fn.__name__)
            raise FUSEError(err) from None
    return wrapper


_CAP_SYS_ADMIN = 21


def can_register_backing_files(status: str = "/proc/self/status") -> bool:
    """Whether this process may hand the kernel backing files (fs/fuse/passthrough.c
    checks ``capable(CAP_SYS_ADMIN)``): its effective capabilities, from ``status``.
    Where they cannot be read, the kernel's first refusal tells (``backing_open``)."""
    try:
        with open(status, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return True


class KernelNotifier(Kernel):
    """Tells the kernel about stale data from worker threads (the calls may block), once
    ``run`` is running (before, there is no kernel to tell), and hands it backing files for
    passthrough (in the open, create and release handlers)."""

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None
        #: the kernel granted passthrough at FUSE_INIT (``Operations.init``) and has not
        #: refused a backing file since
        self.passthrough_granted = False
        #: why there is no passthrough, for the log and ``cachefs status``
        self.passthrough_off = "the mount has not started"
        self._pending = 0  # invalidations started, not yet done
        self._quiet = trio.Event()  # set (and replaced) each time none is left

    @property
    def passthrough(self) -> bool:
        return self.passthrough_granted

    def backing_open(self, fd: int) -> int:
        # Called while the open request is answered: libfuse's fuse_passthrough_open needs it.
        if not self.passthrough_granted or _backing_open is None:
            return 0
        try:
            return _backing_open(fd)
        except OSError as exc:  # EPERM: registering backing files needs CAP_SYS_ADMIN
            why = {errno.EPERM: "the mount process is not root",
                   errno.ELOOP: "the cache's filesystem is stacked too deep"}.get(exc.errno or 0, "")
            self.passthrough_off = (f"the kernel refused a backing file ({os.strerror(exc.errno or errno.EIO)}"
                                    f"{': ' + why if why else ''})")
            log.warning("kernel passthrough off: %s; this mount serves every read itself", self.passthrough_off)
            self.passthrough_granted = False
            return 0

    def backing_close(self, backing_id: int) -> None:
        # Called while the release request is answered (fuse_passthrough_close needs it).
        if _backing_close is None:
            return
        try:
            _backing_close(backing_id)
        except OSError as exc:
            log.warning("closing backing file %d failed: %s", backing_id, exc)

    def store(self, ino: int, data: bytes) -> None:
        # Called while the open request is answered, on the trio thread, only while no
        # other open of the inode exists (``Files._store_in_kernel``): the kernel copies the
        # bytes into its pages at once, none of them being locked by a request in flight.
        if self._nursery is None:
            return
        try:
            pyfuse3.notify_store(ino, 0, data)
        except OSError as exc:
            log.debug("kernel store of inode %d: %s", ino, exc)

    def invalidate_inode(self, ino: int) -> None:
        self._spawn(pyfuse3.invalidate_inode, ino)

    def invalidate_entry(self, parent: int, name: bytes) -> None:
        self._spawn(pyfuse3.invalidate_entry, parent, name)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Carry invalidations to the kernel, each in a task of its own. Runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._nursery is not None:
            self._pending += 1
            self._nursery.start_soon(self._call, fn, *args)

    async def settled(self) -> None:
        # A control command that renamed or removed names waits for this before it
        # answers: the program's next request (read at once, see --request-spin) must not
        # find the kernel's old entry.
        while self._pending:
            await self._quiet.wait()

    async def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            await trio.to_thread.run_sync(fn, *args)
        except OSError as exc:  # ENOENT: the kernel had forgotten it anyway
            log.debug("kernel invalidation %s%r: %s", fn.__name__, args, exc)
        except Exception as exc:  # a hint to the kernel must never end the mount
            log.warning("kernel invalidation %s failed: %s", fn.__name__, exc)
        finally:
            self._pending -= 1
            if not self._pending:
                self._quiet.set()
                self._quiet = trio.Event()


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, cache: Cache, control_files: Control, *, attr_timeout: float,
                 kernel: KernelNotifier | None = None, show_control_dir: bool = False,
                 owners: Owners | None = None) -> None:
        super().__init__()
        self.cache = cache
        #: the cache's kernel, told at FUSE_INIT whether the kernel granted passthrough
        self.kernel = kernel
        #: asked of the kernel at FUSE_INIT by a pyfuse3 built with scripts/build-passthrough
        self.enable_passthrough = cache.config.passthrough
        #: how many filesystems the content files sit on top of (1: overlayfs, eCryptfs, FUSE)
        self.passthrough_stack_depth = 1 if mounts.is_stacked(cache.data_dir) else 0
        self.control = control_files
        self.attr_timeout = attr_timeout
        #: list ``.cachefs`` in the root's readdir (``--show-cachefs``); by default it is
        #: reachable by name only, as ZFS's ``.zfs`` with snapdir=hidden, so that tar,
        #: rsync, cp -a, find and indexers of the mount see the share alone
        self.show_control_dir = show_control_dir
        self.uid = os.getuid()
        self.gid = os.getgid()
        #: --owners: local (every file the mounting user's) or remote (the server's, mapped)
        self.owners = owners or Owners("local", self.uid, self.gid)
        self._remote_owners = self.owners.remote
        self._uid_in = self.owners.uids_in.get  # (bound once: _attrs is the hot path)
        self._gid_in = self.owners.gids_in.get
        self._handles: dict[int, OpenFile | bytes] = {}
        self._dirs: dict[int, DirEntries] = {}
        self._next_fh = 1
        self.initialized = trio.Event()  # set once the kernel's FUSE_INIT is answered

    def init(self) -> None:
        # Called while pyfuse3 answers FUSE_INIT; the reply goes before trio runs again.
        granted = _passthrough_granted is not None and _passthrough_granted()
        off = ("" if granted else "--no-passthrough" if not self.enable_passthrough else
               "this pyfuse3 cannot ask for it; see scripts/build-passthrough"
               if _passthrough_granted is None else
               "not granted by the kernel (it needs Linux 6.9+ with FUSE passthrough)")
        if granted and not can_register_backing_files():
            # The kernel grants the capability to any mount, but refuses each backing file
            # (EPERM) to a process without CAP_SYS_ADMIN: say so from the start, not at the
            # first large file's open.
            granted, off = False, "the mount process is not root (backing files need CAP_SYS_ADMIN)"
        if self.kernel is not None:
            self.kernel.passthrough_granted, self.kernel.passthrough_off = granted, off
        if granted:
            log.info("kernel passthrough: on (the kernel reads whole cached files itself)")
        elif self.enable_passthrough:
            log.info("kernel passthrough: off (%s)", off)
        self.initialized.set()

    # -- attributes ---------------------------------------------------------------------
    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        node = self.cache.written_through(node)
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        if self._remote_owners:
            a.st_uid = self._uid_in(node.uid, node.uid)
            a.st_gid = self._gid_in(node.gid, node.gid)
        else:
            a.st_uid = self.uid
            a.st_gid = self.gid
        a.st_size = node.size
        a.st_blksize = 4096
        a.st_blocks = (node.size + 511) // 512
        a.st_atime_ns = node.atime_ns
        a.st_mtime_ns = node.mtime_ns
        a.st_ctime_ns = node.ctime_ns
        a.entry_timeout = self.attr_timeout
        a.attr_timeout = self.attr_timeout
        if node.flags & LOCAL_ONLY:
            a.st_rdev = node.rdev
        return a

    def _virtual_attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        v = control.attrs(ino)
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = v.mode
        a.st_nlink = v.nlink
        a.st_uid = self.uid
        a.st_gid = self.gid
        # status and conflicts: the size of their content now (an open makes it again), so
        # that programs that trust the size (tar, rsync, cp) copy it whole, not as empty
        a.st_size = len(self.control.read(ino)) if control.is_readable_file(ino) else 0
        a.st_blksize = 4096
        a.st_blocks = (a.st_size + 511) // 512
        t = int(self.control.started * 1e9)
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = t
        a.entry_timeout = 0
        a.attr_timeout = 0
        return a

    # -- namespace ----------------------------------------------------------------------
    @translate
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        log.debug("lookup %d %r", parent_inode, name)
        if parent_inode == ROOT_INO and name == CONTROL_NAME:
            attrs = self._virtual_attrs(control.DIR_INO)
        elif parent_inode == control.DIR_INO:
            ino = control.NAMES.get(name)
            if ino is None:
                raise FUSEError(errno.ENOENT)
            attrs = self._virtual_attrs(ino)
        else:
            try:
                attrs = self._attrs(await self.cache.lookup(parent_inode, name, shared=True))
            except NotFound:
                # A negative entry the kernel may keep for the attribute timeout: programs
                # (git, compilers, shells) look up many names that do not exist.
                negative = pyfuse3.EntryAttributes()
                negative.st_ino = 0
                negative.entry_timeout = self.attr_timeout
                return negative
        return attrs

    @translate
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if control.is_virtual(inode):
            return self._virtual_attrs(inode)
        return self._attrs(self.cache.node(inode))

    # (pyfuse3's stub declares forget async; this pyfuse3 calls it without awaiting it)
    def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:  # type: ignore[override]
        # (lookup counts are not kept: see the module's docstring; the kernel forgets an
        # inode once, when it drops it: an unlinked FIFO or socket it held may go then)
        if self.cache.unlinked_local:
            self.cache.forgotten([ino for ino, _count in inode_list])

    @translate
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.cache.readlink(inode)

    @translate
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        # A snapshot per handle, so that readdir's offsets stay valid while the folder changes.
        if inode == control.DIR_INO:
            entries = [(name, self._virtual_attrs(ino)) for name, ino in sorted(control.NAMES.items())]
            head = [(b".", _dot(control.DIR_INO)), (b"..", _dot(ROOT_INO))]
        else:
            nodes = await self.cache.listdir(inode, prefetch_subfolders=True)
            self.cache.folder_opened(inode, nodes)  # (its small files' contents read ahead)
            entries = self._entries_of(inode, nodes)
            head = self._dots(inode)
            if inode == ROOT_INO and self.show_control_dir:
                head.append((CONTROL_NAME, self._virtual_attrs(control.DIR_INO)))
        fh = self._new_fh()
        self._dirs[fh] = (head, entries)
        return fh

    def _dots(self, inode: int) -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
        """``.`` and ``..`` of a folder (``..`` of the root is the root): made at each
        opendir from one index read, not kept with the listing (a rename of the folder
        itself leaves its kept listing as it is). Only their inode numbers and type are
        made: a readdir takes no more of them, and a readdirplus uses no attributes of
        ``.`` or ``..`` (fs/fuse/readdir.c, ``fuse_direntplus_link``)."""
        parent = ROOT_INO if inode == ROOT_INO else self.cache.node(inode).parent
        return [(b".", _dot(inode)), (b"..", _dot(parent))]

    def _entries_of(self, inode: int, nodes: list[Node]) -> list[tuple[bytes, pyfuse3.EntryAttributes]]:
        """readdir's entries, kept with the cache's kept listing (and dropped with it);
        never changed once made: readdir only reads them."""
        return self.cache.derived(inode, nodes, "readdir",
                                  lambda children: [(n.name, self._attrs(n)) for n in children])

    @translate
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Offsets run over head and listing as one list: entry i is answered with offset
        # i + 1, the start_id of the kernel's next readdir from there.
        head, entries = self._dirs.get(fh, _NO_ENTRIES)
        first = len(head)
        for index in range(start_id, first):
            name, attrs = head[index]
            if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                return
        for index in range(max(start_id, first), first + len(entries)):
            name, attrs = entries[index - first]
            if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # -- files --------------------------------------------------------------------------
    @translate
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        log.debug("open %d flags %o", inode, flags)
        if control.is_virtual(inode):
            fh = self._new_fh()
            if inode == control.CONTROL_INO:
                if flags & os.O_ACCMODE == os.O_RDONLY:
                    raise FUSEError(errno.EACCES)
                if ctx.uid not in (0, self.uid):
                    raise FUSEError(errno.EACCES)
                self._handles[fh] = ControlWrite()
            elif flags & os.O_ACCMODE != os.O_RDONLY:
                raise FUSEError(errno.EACCES)
            else:
                self._handles[fh] = self.control.read(inode)
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        if flags & os.O_TRUNC and flags & os.O_ACCMODE == os.O_RDONLY:
            # Refused (docs/posix.md): Linux empties the file, but emptied here it would be
            # lost when the kernel's last checks, made after this answer (ETXTBSY), refuse
            # the open; left whole, the program could not tell.
            raise FUSEError(errno.EINVAL)
        handle = await self.cache.open(inode, flags)
        fh = self._new_fh()
        self._handles[fh] = handle
        if handle.backing:  # the kernel reads the content file itself (no page cache flags)
            return pyfuse3.FileInfo(fh=fh, keep_cache=False, backing_id=handle.backing)
        # The cache invalidates the kernel's pages itself when the remote changed, so the
        # kernel may keep them across opens; an open that found the change drops them now.
        return pyfuse3.FileInfo(fh=fh, keep_cache=not handle.changed)

    @translate
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._handles[fh]
        if isinstance(handle, (bytes, ControlWrite)):
            return bytes(handle)[off:off + size]
        # (maybe a memoryview into a reused buffer: pyfuse3 replies from any buffer)
        return await self.cache.read(handle, off, size)  # type: ignore[return-value]

    @translate
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self._handles[fh]
        if isinstance(handle, ControlWrite):
            # One command per write(2); the write returns when the command is done.
            await self.control.command(buf)
            return len(buf)
        if isinstance(handle, bytes) or not handle.writable:
            raise FUSEError(errno.EBADF)
        return self.cache.write(handle, off, buf)

    @translate
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if isinstance(handle, OpenFile):
            self.cache.release(handle)

    async def flush(self, fh: int) -> None:
        # Nothing to do at close(2): data is in the local cache already and write-back
        # starts at release. ENOSYS tells the kernel to stop sending flush requests: one
        # round trip through pyfuse3 (32-50 us here, bench/fuse_floor.py) less per close.
        raise FUSEError(errno.ENOSYS)

    @translate
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self._handles.get(fh)
        await self.cache.fsync(handle if isinstance(handle, OpenFile) else None)

    @translate
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.cache.fsync(None)

    # -- changes ----------------------------------------------------------------------------
    def _no_virtual(self, *inodes: int) -> None:
        for ino in inodes:
            if control.is_virtual(ino):
                raise FUSEError(errno.EPERM)

    def _entry_in(self, parent: int, name: bytes) -> None:
        self._no_virtual(parent)
        if parent == ROOT_INO and name == CONTROL_NAME:
            raise FUSEError(errno.EEXIST)

    @translate
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._entry_in(parent_inode, name)
        owner = self._creator(parent_inode, ctx) if self._remote_owners else None
        node, handle = await self.cache.create(parent_inode, name, mode & ~ctx.umask, flags, owner)
        fh = self._new_fh()
        self._handles[fh] = handle
        attrs = self._attrs(node)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), attrs

    @translate
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._entry_in(parent_inode, name)
        kind = stat_mod.S_IFMT(mode)
        if kind in _LOCAL_ONLY_KINDS:
            # mkfifo, bind() of a unix socket, mknod of a device (the kernel sends those
            # only for callers with CAP_MKNOD): local-only objects, never sent to the
            # server; the kernel serves their I/O itself (their open never comes here).
            owner = self._creator(parent_inode, ctx) if self._remote_owners else None
            node = await self.cache.mknod(parent_inode, name, mode & ~ctx.umask, rdev, owner)
            return self._attrs(node)
        if kind not in (stat_mod.S_IFREG, 0):
            raise FUSEError(errno.EINVAL)
        owner = self._creator(parent_inode, ctx) if self._remote_owners else None
        node, handle = await self.cache.create(parent_inode, name, mode & ~ctx.umask, 0, owner)
        self.cache.release(handle)
        return self._attrs(node)

    @translate
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._entry_in(parent_inode, name)
        owner = None
        mode &= ~ctx.umask
        if self._remote_owners:
            owner = self._creator(parent_inode, ctx)
            if self.cache.node(parent_inode).mode & stat_mod.S_ISGID:
                mode |= stat_mod.S_ISGID  # (a folder in a setgid folder is setgid too)
        node = await self.cache.mkdir(parent_inode, name, mode, owner)
        return self._attrs(node)

    @translate
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self._entry_in(parent_inode, name)
        owner = self._creator(parent_inode, ctx) if self._remote_owners else None
        node = await self.cache.symlink(parent_inode, name, target, owner)
        return self._attrs(node)

    @translate
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        log.debug("link %d -> %d %r", inode, new_parent_inode, new_name)
        self._no_virtual(inode)
        self._entry_in(new_parent_inode, new_name)
        node = await self.cache.link(inode, new_parent_inode, new_name)
        return self._attrs(node)

    @translate
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        log.debug("unlink %d %r", parent_inode, name)
        self._entry_in(parent_inode, name)
        await self.cache.unlink(parent_inode, name)

    @translate
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._entry_in(parent_inode, name)
        await self.cache.rmdir(parent_inode, name)

    @translate
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        log.debug("rename %d %r -> %d %r (flags %d)", parent_inode_old, name_old, parent_inode_new,
                  name_new, flags)
        self._entry_in(parent_inode_old, name_old)
        self._entry_in(parent_inode_new, name_new)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise FUSEError(errno.EINVAL)  # no remote offers an atomic exchange
        await self.cache.rename(parent_inode_old, name_old, parent_inode_new, name_new,
                                noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE))

    @translate
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if control.is_virtual(inode):
            if fields.update_size:  # "echo sync > control" opens with O_TRUNC
                return self._virtual_attrs(inode)
            raise FUSEError(errno.EPERM)
        uid = gid = None
        if fields.update_uid or fields.update_gid:
            uid, gid = self._new_owner(inode, attr, fields, ctx)
        handle = self._handles.get(fh) if fh is not None else None
        now = None
        node = await self.cache.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else now,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else now,
            handle=handle if isinstance(handle, OpenFile) else None,
            uid=uid, gid=gid,
        )
        return self._attrs(node)

    # -- owners (--owners) -------------------------------------------------------------
    def _creator(self, parent: int, ctx: pyfuse3.RequestContext) -> tuple[int, int]:
        """The owner (server ids) of what ``ctx``'s process creates in ``parent``, as a
        local file system gives it: the creator's uid, and its gid or the folder's when
        the folder is setgid (``--owners remote`` only)."""
        folder = self.cache.node(parent)
        gid = folder.gid if folder.mode & stat_mod.S_ISGID else self.owners.server_gid(ctx.gid)
        return self.owners.server_uid(ctx.uid), gid

    def _new_owner(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                   ctx: pyfuse3.RequestContext) -> tuple[int | None, int | None]:
        """The new owner of a chown (server ids; None: unchanged), after POSIX's check of
        who may (also made by the kernel with -o default_permissions): only root changes
        the owner; the owner may change the group to one of its own groups."""
        uid = attr.st_uid if fields.update_uid else None
        gid = attr.st_gid if fields.update_gid else None
        if not self._remote_owners:
            if (uid is not None and uid != self.uid) or (gid is not None and gid != self.gid):
                raise FUSEError(errno.EPERM)  # every file belongs to the mounting user
            return None, None
        node = self.cache.node(inode)
        owner, group = self._uid_in(node.uid, node.uid), self._gid_in(node.gid, node.gid)
        if ctx.uid != 0:
            if ctx.uid != owner or (uid is not None and uid != owner):
                raise FUSEError(errno.EPERM)
            if gid is not None and gid != group and gid not in groups_of(ctx.pid, ctx.gid):
                raise FUSEError(errno.EPERM)
        return (None if uid is None else self.owners.server_uid(uid),
                None if gid is None else self.owners.server_gid(gid))

    @translate
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        space = await self.cache.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = space.block_size
        s.f_frsize = space.block_size
        s.f_blocks = space.blocks
        s.f_bfree = space.blocks_free
        s.f_bavail = space.blocks_avail
        s.f_files = space.files
        s.f_ffree = space.files_free
        s.f_favail = space.files_free
        s.f_namemax = space.name_max
        return s

    @translate
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        if control.is_virtual(inode):
            return inode == control.CONTROL_INO or not mode & os.W_OK
        node = self.cache.node(inode)
        if ctx.uid == 0:
            return not (mode & os.X_OK) or bool(node.mode & 0o111) or node.is_dir
        if not self._remote_owners or ctx.uid == self._uid_in(node.uid, node.uid):
            perms = (node.mode >> 6) & 7  # (local: every file is shown as the mounting user's)
        elif self._gid_in(node.gid, node.gid) in groups_of(ctx.pid, ctx.gid):
            perms = (node.mode >> 3) & 7
        else:
            perms = node.mode & 7
        return (mode & perms) == mode

    # -- extended attributes --------------------------------------------------------------
    # ``user.`` attributes are the cache's (``cache.xattrs``); ``user.cachefs.state`` is
    # read by name only: not listed, so that cp -a, rsync -X and tar --xattrs do not copy
    # a state that means nothing elsewhere (and fail to set it back in a mount), and
    # never set or removed (EPERM).
    @translate
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if not name.startswith(b"user."):
            # (the kernel asks for security.capability before each write(2) to a file:
            # answered here, at no cost beyond the request's)
            raise FUSEError(errno.ENOTSUP)
        if control.is_virtual(inode):
            raise FUSEError(pyfuse3.ENOATTR)
        if name == STATE_XATTR:
            return self.cache.state(inode).encode()
        return await self.cache.getxattr(inode, name)

    @translate
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return [] if control.is_virtual(inode) else await self.cache.listxattr(inode)

    @translate
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        # (pyfuse3 checks XATTR_CREATE and XATTR_REPLACE itself, through getxattr)
        if control.is_virtual(inode) or name == STATE_XATTR:
            raise FUSEError(errno.EPERM)
        await self.cache.setxattr(inode, name, value)

    @translate
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if control.is_virtual(inode) or name == STATE_XATTR:
            raise FUSEError(errno.EPERM)
        await self.cache.removexattr(inode, name)

    def handles_opened(self) -> int:
        """Files and folders opened so far (the sync schedule's sign of activity, read
        when it looks: counted by ``_new_fh`` at no extra cost to a request)."""
        return self._next_fh

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh


def _dot(ino: int) -> pyfuse3.EntryAttributes:
    """A folder's entry as ``.`` and ``..`` need it: its number and its type."""
    a = pyfuse3.EntryAttributes()
    a.st_ino = ino
    a.st_mode = stat_mod.S_IFDIR
    return a


class ControlWrite(bytes):
    """An open handle of the control file: commands arrive as writes."""
