"""The floor under ``bench/scale.py``'s cold find: the tree's shape served from memory.

A pyfuse3 + trio filesystem mounted with cachefs's options (``pyfuse3.default_options``,
the same request spin) that holds ``t{N}/dNNNN/fNNNN`` (folders of 1,000 one-byte files,
as ``scale.make_tree`` makes them) as numbers: no network, no index, no cache; every
readdir entry's attributes made when asked, as any filesystem that answers readdirplus
from what it holds must. Whatever cachefs does to list a tree of that size from a
remote, it cannot go faster than this; sshfs (C, libfuse's high-level API) is not bound
by it. ``bench/scale.py --peers floor`` mounts it as a peer.

    .venv/bin/python bench/tree_floor.py MOUNTPOINT FILES
"""

from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fuse_floor import run_fs  # noqa: E402

PER_FOLDER = 1000
ROOT = pyfuse3.ROOT_INODE
TOP = ROOT + 1  # t{N}
FIRST_FOLDER = TOP + 1
TIMEOUT = 3.0  # cachefs's --attr-timeout default
MTIME_NS = 1_700_000_000 * 10**9


class TreeFs(pyfuse3.Operations):
    def __init__(self, files: int) -> None:
        super().__init__()
        self.files = files
        self.folders = (files + PER_FOLDER - 1) // PER_FOLDER
        self.first_file = FIRST_FOLDER + self.folders
        self.top_name = b"t%d" % files
        self.uid, self.gid = os.getuid(), os.getgid()
        self.fh = 0
        self.open_dirs: dict[int, list[tuple[bytes, int]]] = {}

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        if ino < self.first_file:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFDIR | 0o755, 2, 4096
        else:
            a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o644, 1, 1
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_mtime_ns = a.st_ctime_ns = a.st_atime_ns = MTIME_NS
        a.attr_timeout = a.entry_timeout = TIMEOUT
        return a

    def _children(self, inode: int) -> list[tuple[bytes, int]]:
        if inode == ROOT:
            return [(self.top_name, TOP)]
        if inode == TOP:
            return [(b"d%04d" % d, FIRST_FOLDER + d) for d in range(self.folders)]
        d = inode - FIRST_FOLDER
        if 0 <= d < self.folders:
            count = min(PER_FOLDER, self.files - d * PER_FOLDER)
            base = self.first_file + d * PER_FOLDER
            return [(b"f%04d" % f, base + f) for f in range(count)]
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    async def getattr(self, inode, ctx=None):
        return self._attrs(inode)

    async def lookup(self, parent, name, ctx=None):
        for child, ino in self._children(parent):
            if child == name:
                return self._attrs(ino)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode, ctx):
        self.fh += 1
        self.open_dirs[self.fh] = self._children(inode)  # (once per opendir, as cachefs)
        return self.fh

    async def readdir(self, fh, start_id, token):
        children = self.open_dirs[fh]
        for index in range(start_id, len(children)):
            name, ino = children[index]
            if not pyfuse3.readdir_reply(token, name, self._attrs(ino), index + 1):
                break

    async def releasedir(self, fh):
        self.open_dirs.pop(fh, None)

    async def getxattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)


def main() -> int:
    mnt, files = sys.argv[1], int(sys.argv[2])
    run_fs(TreeFs(files), mnt, {"fsname=treefloor", *pyfuse3.default_options})
    return 0


if __name__ == "__main__":
    sys.exit(main())
