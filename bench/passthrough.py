"""A pyfuse3 filesystem that passes every request through to a local folder.

    .venv/bin/python bench/passthrough.py FOLDER MOUNTPOINT

The benchmark's "pyfuse3" peer: the same pyfuse3 + trio as cachefs and the same kernel
caching and mount options (default_permissions, entry and attribute timeouts of 3 s,
negative entries, keep_cache, flush answered ENOSYS, getxattr answered ENOATTR, the same
request spin where this pyfuse3 has it), but no
cache, no index, no journal and no network: each request is one or two system calls on
the share's own files, made on the trio thread. What cachefs does on top of FUSE costs the
difference between the two; what a workload costs here is what the requests alone cost a
Python filesystem on this machine. Not a filesystem to use: lookups are never forgotten,
and names are found again by walking up from an inode's known (parent, name)s. A file gets
a new inode number here when its number on disk comes back after its last name went (the
kernel keeps pages by inode number).
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import sys

import pyfuse3

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fuse_floor import run_fs  # noqa: E402  (cachefs's request spin)

TIMEOUT = 3.0  # cachefs's --attr-timeout default
ROOT = pyfuse3.ROOT_INODE


def passes_errors(fn):
    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
    return wrapper


class Passthrough(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, folder: bytes) -> None:
        super().__init__()
        self.folder = folder
        self.inos = {os.lstat(folder).st_ino: ROOT}  # inode number on disk -> here
        self.next_ino = ROOT + 1
        self.names: dict[int, set[tuple[int, bytes]]] = {}  # ino -> its (parent, name)s
        self.dirs: dict[int, list[tuple[bytes, pyfuse3.EntryAttributes]]] = {}
        self.next_dir = 1

    # -- names ---------------------------------------------------------------------------
    def path(self, ino: int) -> bytes:
        parts = []
        while ino != ROOT:
            parent, name = next(iter(self.names[ino]))
            parts.append(name)
            ino = parent
        return os.path.join(self.folder, *reversed(parts)) if parts else self.folder

    def child(self, parent: int, name: bytes) -> bytes:
        return os.path.join(self.path(parent), name)

    def attrs(self, path: bytes, parent: int | None = None, name: bytes | None = None) -> pyfuse3.EntryAttributes:
        st = os.lstat(path)
        ino = self.inos.get(st.st_ino)
        if ino is None:
            ino = self.inos[st.st_ino] = self.next_ino
            self.next_ino += 1
        if parent is not None and ino != ROOT:
            self.names.setdefault(ino, set()).add((parent, name))
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        for field in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                      "st_blksize", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(a, field, getattr(st, field))
        a.attr_timeout = a.entry_timeout = TIMEOUT
        return a

    def forget_name(self, disk_ino: int, parent: int, name: bytes) -> None:
        ino = self.inos.get(disk_ino)
        names = self.names.get(ino)
        if names is not None:
            names.discard((parent, name))
            if not names:  # its last name (that we know of): the number may come back
                del self.names[ino], self.inos[disk_ino]

    # -- namespace -----------------------------------------------------------------------
    @passes_errors
    async def lookup(self, parent_inode, name, ctx=None):
        try:
            return self.attrs(self.child(parent_inode, name), parent_inode, name)
        except FileNotFoundError:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0
            negative.entry_timeout = TIMEOUT
            return negative

    @passes_errors
    async def getattr(self, inode, ctx=None):
        return self.attrs(self.path(inode))

    @passes_errors
    async def setattr(self, inode, attr, fields, fh, ctx):
        path = self.path(inode)
        if fields.update_size:
            if fh is not None:
                os.ftruncate(fh, attr.st_size)
            else:
                os.truncate(path, attr.st_size)
        if fields.update_mode:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.chown(path, attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1, follow_symlinks=False)
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                               attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns),
                     follow_symlinks=False)
        return self.attrs(path)

    @passes_errors
    async def readlink(self, inode, ctx):
        return os.readlink(self.path(inode))

    @passes_errors
    async def opendir(self, inode, ctx):
        folder = self.path(inode)
        entries = []
        with os.scandir(folder) as it:
            for entry in sorted(it, key=lambda e: e.name):
                name = os.fsencode(entry.name)
                entries.append((name, self.attrs(os.path.join(folder, name), inode, name)))
        fh = self.next_dir
        self.next_dir += 1
        self.dirs[fh] = entries
        return fh

    async def readdir(self, fh, start_id, token):
        entries = self.dirs[fh]
        for index in range(start_id, len(entries)):
            if not pyfuse3.readdir_reply(token, entries[index][0], entries[index][1], index + 1):
                break

    async def releasedir(self, fh):
        self.dirs.pop(fh, None)

    @passes_errors
    async def mkdir(self, parent_inode, name, mode, ctx):
        path = self.child(parent_inode, name)
        os.mkdir(path, mode & ~ctx.umask)
        return self.attrs(path, parent_inode, name)

    @passes_errors
    async def symlink(self, parent_inode, name, target, ctx):
        path = self.child(parent_inode, name)
        os.symlink(target, path)
        return self.attrs(path, parent_inode, name)

    @passes_errors
    async def link(self, inode, new_parent_inode, new_name, ctx):
        path = self.child(new_parent_inode, new_name)
        os.link(self.path(inode), path)
        return self.attrs(path, new_parent_inode, new_name)

    def remove(self, parent: int, name: bytes, remove) -> None:
        path = self.child(parent, name)
        disk_ino = os.lstat(path).st_ino
        remove(path)
        self.forget_name(disk_ino, parent, name)

    @passes_errors
    async def unlink(self, parent_inode, name, ctx):
        self.remove(parent_inode, name, os.unlink)

    @passes_errors
    async def rmdir(self, parent_inode, name, ctx):
        self.remove(parent_inode, name, os.rmdir)

    @passes_errors
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old, new = self.child(parent_inode_old, name_old), self.child(parent_inode_new, name_new)
        disk_ino = os.lstat(old).st_ino
        try:
            replaced = os.lstat(new).st_ino
        except FileNotFoundError:
            replaced = None
        os.rename(old, new)
        if replaced is not None and replaced != disk_ino:
            self.forget_name(replaced, parent_inode_new, name_new)
        ino = self.inos.get(disk_ino)
        if ino is not None:
            self.names[ino].discard((parent_inode_old, name_old))
            self.names[ino].add((parent_inode_new, name_new))

    @passes_errors
    async def statfs(self, ctx):
        st = os.statvfs(self.folder)
        out = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
            setattr(out, field, getattr(st, field))
        return out

    # -- files ---------------------------------------------------------------------------
    @passes_errors
    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=os.open(self.path(inode), flags & ~os.O_CREAT), keep_cache=True)

    @passes_errors
    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self.child(parent_inode, name)
        fd = os.open(path, flags | os.O_CREAT, mode & ~ctx.umask)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), self.attrs(path, parent_inode, name)

    @passes_errors
    async def read(self, fh, off, size):
        return os.pread(fh, size, off)

    @passes_errors
    async def write(self, fh, off, buf):
        return os.pwrite(fh, buf, off)

    async def flush(self, fh):
        raise pyfuse3.FUSEError(errno.ENOSYS)  # as cachefs: no FLUSH at each close

    @passes_errors
    async def fsync(self, fh, datasync):
        (os.fdatasync if datasync else os.fsync)(fh)

    async def release(self, fh):
        os.close(fh)

    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)  # as cachefs answers any name but its own

    async def listxattr(self, inode, ctx):
        return []


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    folder, mountpoint = sys.argv[1:]
    options = set(pyfuse3.default_options) | {"fsname=passthrough", "subtype=passthrough"}
    run_fs(Passthrough(os.fsencode(os.path.abspath(folder))), mountpoint, options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
