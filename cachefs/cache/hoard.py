"""Hoarding (Coda's word; "make available offline" in Offline Files) and eviction.

Owns: the pinned roots (kept in the store's ``meta`` under ``b"pinned"``), the PINNED
mark on everything under them, walks that fetch a pinned tree whole (symlink targets too), eviction of clean
content on request (``evict``) and to stay under the cache size limit (least recently
used first). Pinned and dirty content is never evicted.
Must not touch: FUSE, the remote's write side. Reads go through the cache like any read.

Concurrency: on the trio thread. ``run`` (a task the daemon starts) evicts after each
checkpoint of ``Cache.run``; pin walks await listings and fetches through the cache.
"""

from __future__ import annotations

import json
import logging

import lmdb
import trio

from ..defaults import DEFAULT_CACHE_SIZE
from ..errors import RemoteError, Unavailable
from .cache import Cache
from ..progress import Progress
from ..store.index import CONFLICT, DIRTY, PINNED, TARGET, Node, Txn

log = logging.getLogger(__name__)



class Hoard:
    def __init__(self, cache: Cache, limit: int = DEFAULT_CACHE_SIZE) -> None:
        self.cache = cache
        self.store = cache.store
        self.limit = limit
        self.over_limit_pinned = False  # pinned + dirty content alone exceeds the limit
        self.progress: Progress | None = None

    async def run(self) -> None:
        """Keep the cache under its size limit: evict after each of the cache's
        checkpoints (which make its count of cached bytes exact). Runs until cancelled."""
        while True:
            await self.cache.checkpointed()
            try:
                self.enforce_limit()
            except (OSError, lmdb.Error) as exc:  # a full disk: retried next time
                log.error("eviction failed (retrying): %s", exc)

    # -- pinned roots ----------------------------------------------------------------------
    def roots(self) -> list[int]:
        data = self.store.get_meta(b"pinned")
        return json.loads(data) if data else []

    def root_paths(self) -> list[str]:
        out = []
        for ino in self.roots():
            try:
                out.append("/" + self.store.path_of(ino).decode("utf-8", "surrogateescape"))
            except KeyError:
                continue
        return out

    def _set_roots(self, roots: list[int]) -> None:
        self.store.set_meta(b"pinned", json.dumps(sorted(set(roots))).encode())

    async def pin(self, ino: int) -> None:
        """Mark the tree under ``ino`` pinned and fetch all of it."""
        roots = self.roots()
        if ino not in roots:
            self._set_roots([*roots, ino])
        await self.refresh([ino])

    async def refresh(self, roots: list[int] | None = None) -> None:
        """Walk pinned trees: list folders again, mark new entries, fetch what is missing.
        Raises ``Unavailable`` when the remote is needed and offline."""
        roots = self.roots() if roots is None else roots
        self.progress = progress = Progress()
        try:
            files: list[Node] = []
            for root in roots:
                node = self.store.get(root)
                if node is None:
                    self._set_roots([r for r in self.roots() if r != root])
                    continue
                await self._collect(node, files, progress)
            progress.ops_total = len(files)
            progress.bytes_total = sum(n.size for n in files)
            limiter = trio.CapacityLimiter(4)
            errors: list[BaseException] = []

            async def fetch(node: Node) -> None:
                async with limiter:
                    try:
                        if node.is_symlink:
                            await self.cache.readlink(node.ino)  # its target, kept (TARGET)
                        else:
                            await self.cache.fetch_whole(node)
                    except (Unavailable, RemoteError) as exc:
                        errors.append(exc)
                progress.ops_done += 1
                progress.bytes_done += node.size

            async with trio.open_nursery() as nursery:
                for node in files:
                    nursery.start_soon(fetch, node)
            if errors:
                raise errors[0]
        finally:
            self.progress = None

    async def _collect(self, root: Node, files: list[Node], progress: Progress) -> None:
        stack = [root]
        while stack:
            node = stack.pop()
            self._mark(node.ino, True)
            self.cache.read_xattrs_ahead(node.ino)
            if node.is_dir:
                for child in await self.cache.listdir(node.ino, refresh=True):
                    stack.append(child)
            elif node.is_file and self.cache.content_state(node) != "cached":
                files.append(node)
            elif node.is_symlink and not node.has(TARGET):
                # a symlink's target is its content: read offline (tar, cp -a, rsync -a of
                # a pinned tree) it must be known, not fetched at the first readlink
                files.append(node)

    def _mark(self, ino: int, pinned: bool) -> None:
        def change(t: Txn) -> None:
            node = t.node(ino)
            if node is not None and node.has(PINNED) != pinned:
                node.flags = node.flags | PINNED if pinned else node.flags & ~PINNED
                t.put(node)
        self.store.transact(change)

    def unpin(self, ino: int) -> None:
        """Make the tree under ``ino`` evictable again (only what is cached is touched)."""
        self._set_roots([r for r in self.roots() if r != ino])
        still = set(self.roots())
        for node in self._cached_tree(ino):
            if node.ino not in still:
                self._mark(node.ino, False)

    def _cached_tree(self, ino: int) -> list[Node]:
        root = self.store.get(ino)
        if root is None:
            return []
        out, stack = [], [root]
        while stack:
            node = stack.pop()
            out.append(node)
            if node.is_dir:
                stack.extend(self.store.children(node.ino))
        return out

    # -- eviction ----------------------------------------------------------------------------
    def evict(self, ino: int) -> int:
        """Drop clean, unpinned content under ``ino``; bytes freed."""
        return sum(self.cache.evict_content(n) for n in self._cached_tree(ino) if n.is_file)

    def enforce_limit(self) -> None:
        """Evict least recently used clean content until usage is under the limit."""
        used = self.cache.cached_bytes()
        if used <= self.limit:
            self.over_limit_pinned = False
            return
        goal = int(self.limit * 0.9)
        candidates = []
        for node in self.store.nodes_with_content():
            if node.flags & (PINNED | DIRTY | CONFLICT) or self.cache.is_open(node.ino):
                continue
            candidates.append((self.cache.last_use(node), node))
        candidates.sort(key=lambda pair: pair[0])
        for _used_at, node in candidates:
            if used <= goal:
                break
            used -= self.cache.evict_content(node)
        self.over_limit_pinned = used > self.limit
        if self.over_limit_pinned:
            log.warning("pinned and changed content alone (%d MiB) exceeds the cache limit (%d MiB)",
                        used >> 20, self.limit >> 20)
