"""The local backend: a directory as the share (a plain folder, or an NFS/SMB mount).

Owns: mapping the ``Remote`` contract onto ``os`` calls with bytes paths under ``root``,
and the errno → ``RemoteError`` / ``RemoteUnreachable`` translation for them.
Must not touch: the cache, LMDB, trio, FUSE.

A hung network filesystem blocks a syscall in the kernel and no Python code can interrupt
it, so every operation runs on a small private thread pool and the caller waits at most
``timeout`` seconds: on expiry it gets ``RemoteUnreachable`` and the stuck thread is left
behind (if the share stays hung the pool fills and every call times out, which is the
truth). Operations are cheap enough that the thread hop does not matter.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import hashlib
import logging
import os
import time
import stat as stat_mod
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from .base import (Capabilities, Remote, RemoteError, RemoteRefused, RemoteStat, RemoteUnreachable, Source,
                   SpaceInfo, open_source)
from .watch import ProcessWatch, Watch, WatchEnded

if TYPE_CHECKING:
    from ..address import RemoteAddress
    from .options import ConnectOptions
    from .pacing import Pacer

log = logging.getLogger(__name__)

T = TypeVar("T")

#: errno values that mean "the share went away", not "this object has a problem".
UNREACHABLE_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.ETIMEDOUT,
        errno.ESTALE,
        errno.ENOTCONN,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.ECONNABORTED,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ENODEV,
        errno.ENXIO,
    }
)
COPY_CHUNK = 1 << 20
POOL_THREADS = 8


def _user_xattrs(target: bytes | int) -> list[tuple[bytes, bytes]]:
    """The ``user.`` extended attributes of a path (not followed) or an open file."""
    follow = not isinstance(target, bytes)
    out = []
    for name in os.listxattr(target, follow_symlinks=follow):
        if name.startswith("user."):
            try:
                out.append((os.fsencode(name), os.getxattr(target, name, follow_symlinks=follow)))
            except OSError as exc:
                if exc.errno != errno.ENODATA:  # (removed meanwhile)
                    raise
    return out


def _keep_xattrs(full: bytes, out: int) -> None:
    """An upload replaces the file by a new one: the old one's ``user.`` extended
    attributes go onto it, as a write in place would keep them (the journal's ``xattr``
    entries change them by name, before or after)."""
    try:
        found = _user_xattrs(full)
    except OSError:  # (no file there yet, or a file system without them)
        return
    for name, value in found:
        os.setxattr(out, name, value)


def _to_stat(st: os.stat_result) -> RemoteStat:
    return RemoteStat(
        mode=st.st_mode,
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        atime_ns=st.st_atime_ns,
        uid=st.st_uid,
        gid=st.st_gid,
        nlink=st.st_nlink,
    )


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_renameat2: Callable[..., int] | None = None


def _load_renameat2() -> Callable[..., int]:
    """libc's renameat2, or a stand-in that fails with ENOSYS (a C library without it)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        function.restype = ctypes.c_int
    except (OSError, AttributeError):
        return _no_renameat2
    return function


def _no_renameat2(*_args: object) -> int:
    ctypes.set_errno(errno.ENOSYS)
    return -1


def _rename_noreplace(src: bytes, dst: bytes) -> None:
    """``renameat2(RENAME_NOREPLACE)``: EEXIST when ``dst`` exists. Where the kernel or the
    file system lacks it (EINVAL, ENOSYS), a hard link then an unlink of ``src`` (just as
    atomic about the target); for a folder, which cannot be linked, a check then a
    rename."""
    global _renameat2
    if _renameat2 is None:
        _renameat2 = _load_renameat2()
    if _renameat2(_AT_FDCWD, src, _AT_FDCWD, dst, _RENAME_NOREPLACE) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        raise OSError(err, os.strerror(err), src, None, dst)
    if stat_mod.S_ISDIR(os.lstat(src).st_mode):
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
        os.rename(src, dst)
        return
    os.link(src, dst, follow_symlinks=False)
    os.unlink(src)


class LocalRemote(Remote):
    """A directory as the share. Thread-safe: it holds no per-call state."""

    #: a folder here keeps what this file system keeps (xattrs: ext4, xfs, btrfs, tmpfs)
    capabilities = Capabilities(xattrs=True, notify=True)

    @classmethod
    def from_address(cls, address: RemoteAddress, options: ConnectOptions,
                     pacer: Pacer | None = None) -> LocalRemote:
        return cls(address.path, timeout=options.timeout)

    def __init__(self, root: str, timeout: float) -> None:
        self.root = os.path.abspath(root)
        self._root_b = os.fsencode(self.root)
        self.timeout = timeout
        self.parallelism = POOL_THREADS
        self.description = "file://" + self.root
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    # -- plumbing -------------------------------------------------------------------
    def _path(self, path: bytes) -> bytes:
        if path.startswith(b"/") or b"\0" in path:
            raise RemoteError(errno.EINVAL, f"not a share-relative path: {path!r}")
        return self._root_b if not path else self._root_b + b"/" + path

    def watch(self, using: str = "auto") -> Watch:
        """The folder watched here, with inotify (the watcher the SFTP backend runs on
        its server, run on this machine)."""
        try:
            return ProcessWatch(self._root_b, using)
        except OSError as exc:
            raise WatchEnded(f"cannot start the watcher: {exc}", retry=False) from exc

    def _root_present(self) -> bool:
        try:
            return stat_mod.S_ISDIR(os.stat(self._root_b).st_mode)
        except OSError:
            return False

    def _call(self, function: Callable[[], T], progress: list[float] | None = None) -> T:
        """Run ``function`` bounded by the timeout, translating OSError for the caller."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=POOL_THREADS, thread_name_prefix="cachefs-local"
            )
        future = self._pool.submit(self._translated, function)
        try:
            if progress is None:
                return future.result(timeout=self.timeout)
            while True:  # a transfer: bounded by the time since it last moved
                try:
                    return future.result(timeout=min(1.0, self.timeout))
                except concurrent.futures.TimeoutError:
                    if time.monotonic() - progress[0] > self.timeout:
                        raise
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise RemoteUnreachable(f"{self.root}: no answer within {self.timeout:g} s") from None

    def _translated(self, function: Callable[[], T]) -> T:
        try:
            return function()
        except OSError as exc:
            code = exc.errno or errno.EIO
            if code in UNREACHABLE_ERRNOS:
                raise RemoteUnreachable(f"{self.root}: {os.strerror(code)}") from exc
            if code == errno.ENOENT and not self._root_present():
                raise RemoteUnreachable(f"{self.root}: the share folder is gone") from exc
            raise RemoteError(code, exc.strerror or os.strerror(code)) from exc

    # -- connection -----------------------------------------------------------------
    def connect(self) -> None:
        def check() -> None:
            try:
                st = os.stat(self._root_b)
            except FileNotFoundError:
                raise RemoteUnreachable(f"{self.root} does not exist (not mounted yet?)") from None
            if not stat_mod.S_ISDIR(st.st_mode):
                raise RemoteRefused(f"{self.root} is not a directory")

        self._call(check)
        log.debug("local share %s ready", self.root)

    def ping(self) -> None:
        self.stat(b"")

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # -- reading --------------------------------------------------------------------
    def stat(self, path: bytes) -> RemoteStat:
        full = self._path(path)
        return self._call(lambda: _to_stat(os.lstat(full)))

    def listdir(self, path: bytes) -> list[tuple[bytes, RemoteStat]]:
        full = self._path(path)

        def scan() -> list[tuple[bytes, RemoteStat]]:
            entries: list[tuple[bytes, RemoteStat]] = []
            with os.scandir(full) as it:
                for entry in it:
                    try:
                        entries.append((entry.name, _to_stat(entry.stat(follow_symlinks=False))))
                    except FileNotFoundError:
                        continue  # removed while we listed
            return entries

        return self._call(scan)

    def readlink(self, path: bytes) -> bytes:
        full = self._path(path)
        return self._call(lambda: os.readlink(full))

    def read(self, path: bytes, offset: int, length: int) -> bytes:
        full = self._path(path)

        def read_range() -> bytes:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                parts: list[bytes] = []
                done = 0
                while done < length:
                    data = os.pread(fd, length - done, offset + done)
                    if not data:
                        break
                    parts.append(data)
                    done += len(data)
                return b"".join(parts)
            finally:
                os.close(fd)

        return self._call(read_range)

    def statvfs(self) -> SpaceInfo:
        def space() -> SpaceInfo:
            st = os.statvfs(self._root_b)
            return SpaceInfo(
                block_size=st.f_frsize or st.f_bsize,
                blocks=st.f_blocks,
                blocks_free=st.f_bfree,
                blocks_avail=st.f_bavail,
                files=st.f_files,
                files_free=st.f_ffree,
                name_max=st.f_namemax or 255,
            )

        return self._call(space)

    # -- writing --------------------------------------------------------------------
    #: the files are here: this backend hashes them itself
    can_hash = True

    def hash_files(self, paths: list[bytes]) -> list[bytes | None]:
        def digest(full: bytes) -> bytes | None:
            try:
                with open(full, "rb") as f:
                    return hashlib.file_digest(f, "sha256").digest()
            except OSError:
                return None
        return self._call(lambda: [digest(self._path(p)) for p in paths])

    def upload(self, path: bytes, source: Source, mode: int, temp_name: bytes,
               times: tuple[int, int] | None = None, owner: tuple[int, int] | None = None) -> RemoteStat:
        full = self._path(path)
        parent = os.path.dirname(full)
        temp = os.path.join(parent, temp_name) if parent else temp_name

        def copy_and_rename() -> RemoteStat:
            out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                try:
                    with open_source(source) as stream:
                        while chunk := stream.read(COPY_CHUNK):
                            view = memoryview(chunk)
                            while view:
                                view = view[os.write(out, view) :]
                            progress[0] = time.monotonic()
                    if owner is not None:
                        os.fchown(out, *owner)
                    os.fchmod(out, stat_mod.S_IMODE(mode))
                    if times is not None:
                        os.utime(out, ns=times)
                    _keep_xattrs(full, out)
                    os.fsync(out)
                finally:
                    os.close(out)
                os.rename(temp, full)
            except BaseException:
                try:
                    os.unlink(temp)
                except OSError as cleanup_error:
                    log.debug("could not remove temp file %r: %s", temp, cleanup_error)
                raise
            return _to_stat(os.lstat(full))

        progress = [time.monotonic()]
        return self._call(copy_and_rename, progress)

    def mkdir(self, path: bytes, mode: int) -> None:
        full = self._path(path)
        self._call(lambda: os.mkdir(full, stat_mod.S_IMODE(mode)))

    def rmdir(self, path: bytes) -> None:
        full = self._path(path)
        self._call(lambda: os.rmdir(full))

    def unlink(self, path: bytes) -> None:
        full = self._path(path)
        self._call(lambda: os.unlink(full))

    def rename(self, src: bytes, dst: bytes) -> None:
        full_src, full_dst = self._path(src), self._path(dst)
        self._call(lambda: os.rename(full_src, full_dst))

    def rename_noreplace(self, src: bytes, dst: bytes) -> None:
        full_src, full_dst = self._path(src), self._path(dst)
        self._call(lambda: _rename_noreplace(full_src, full_dst))

    def symlink(self, target: bytes, path: bytes) -> None:
        full = self._path(path)
        self._call(lambda: os.symlink(target, full))

    def link(self, src: bytes, dst: bytes) -> None:
        full_src, full_dst = self._path(src), self._path(dst)
        self._call(lambda: os.link(full_src, full_dst, follow_symlinks=False))

    # -- extended attributes: the folder's files keep them ------------------------------
    def list_xattrs(self, path: bytes) -> list[tuple[bytes, bytes]]:
        full = self._path(path)
        return self._call(lambda: _user_xattrs(full))

    def set_xattr(self, path: bytes, name: bytes, value: bytes) -> None:
        full = self._path(path)
        self._call(lambda: os.setxattr(full, name, value, follow_symlinks=False))

    def remove_xattr(self, path: bytes, name: bytes) -> None:
        full = self._path(path)

        def remove() -> None:
            try:
                os.removexattr(full, name, follow_symlinks=False)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
        self._call(remove)

    def set_link_owner(self, path: bytes, owner: tuple[int, int]) -> None:
        full = self._path(path)
        self._call(lambda: os.lchown(full, *owner))

    def set_attrs(self, path: bytes, mode: int, atime_ns: int, mtime_ns: int,
                  owner: tuple[int, int] | None = None) -> None:
        full = self._path(path)

        def apply() -> None:
            if owner is not None:  # (first: a change of owner clears setuid and setgid)
                os.lchown(full, *owner)
            os.chmod(full, stat_mod.S_IMODE(mode))
            os.utime(full, ns=(atime_ns, mtime_ns), follow_symlinks=False)

        self._call(apply)

