"""``cache.ahead.ContentsAhead``: the bounds of the contents read ahead at an opendir (one
folder at a time, a queue whose oldest folder is dropped, each folder once), which files
it chooses, and its end. The page cache effect itself is seen through a real mount in
tests/test_mount_read.py (``..._read_ahead``); here real content files and the real
``posix_fadvise``, with only the store's content paths given by a small stand-in."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from cachefs.cache import ahead
from cachefs.cache.ahead import ContentsAhead
from cachefs.cache.handles import Opens
from cachefs.store.index import DIRTY, FULL, Node


async def _advised(reader: ContentsAhead, count: int) -> None:
    """Wait (5 s at most) for ``count`` content files advised in all, the queue empty."""
    with trio.fail_after(5):
        while reader.advised < count or reader._queue:
            await trio.sleep(0.01)
    await trio.sleep(0.05)
    assert reader.advised == count


class _Paths:
    """The one thing ``ContentsAhead`` asks of the store: where a content file is."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def content_path(self, ino: int) -> str:
        return str(self.root / str(ino))


def _no_children(folder: int) -> list[Node]:
    raise AssertionError(f"folder {folder}'s listing asked for with no walk")


def _no_siblings(folder: int, most: int) -> list[int]:
    return []


def _siblings(folders: dict[int, list[Node]]) -> Callable[[int, int], list[int]]:
    """``Listings.sibling_folders`` over folders named by number: those after one first,
    then those before it, nearest first."""
    def siblings(folder: int, most: int) -> list[int]:
        order = sorted(folders)
        at = order.index(folder)
        return (order[at + 1:] + order[at - 1::-1] if at else order[1:])[:most]
    return siblings


def _file(root: Path, ino: int, size: int = 4096, flags: int = FULL, mode: int = stat.S_IFREG | 0o644) -> Node:
    (root / str(ino)).write_bytes(b"x" * size)
    return Node(ino, 1, b"f%d" % ino, mode, size, 0, 0, 0, flags=flags)


def test_small_whole_clean_files_only_once_per_folder(tmp_path: Path) -> None:
    opens = Opens()
    opens.last_use[7] = 1.0  # opened by this process: the kernel has its pages
    children = [_file(tmp_path, 1), _file(tmp_path, 2, size=ahead.FILE_MOST + 1), _file(tmp_path, 3, flags=0),
                _file(tmp_path, 4, flags=FULL | DIRTY), _file(tmp_path, 5, size=0),
                _file(tmp_path, 6, mode=stat.S_IFDIR | 0o755), _file(tmp_path, 7), _file(tmp_path, 8)]
    (tmp_path / "8").unlink()  # gone meanwhile (evicted): passed over
    reader = ContentsAhead(_Paths(tmp_path), opens, _no_children, _no_siblings)  # type: ignore[arg-type]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader.run)
            await trio.testing.wait_all_tasks_blocked()
            reader.opened(10, children)
            await _advised(reader, 1)  # ino 1 alone
            reader.opened(10, children)  # a second opendir: nothing more
            assert not reader._queue
            await _advised(reader, 1)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_storm_of_opendirs_keeps_its_threads_and_a_bounded_queue(tmp_path: Path) -> None:
    """Folders opened faster than they are read ahead: ``THREADS`` worker threads at a
    time at most (a folder's files split among them), at most ``QUEUED`` waiting (the
    oldest dropped, and read ahead at a later opendir), and nothing left running once
    cancelled (at unmount)."""
    folders = 10 * ahead.QUEUED
    per_folder = ahead.THREADS + 2
    children = {f: [_file(tmp_path, f * 100 + i) for i in range(per_folder)] for f in range(1, folders + 1)}
    reader = ContentsAhead(_Paths(tmp_path), Opens(), _no_children, _no_siblings)  # type: ignore[arg-type]
    most = running = 0
    lock = threading.Lock()
    real = ahead.will_need

    def counted(paths: list[str]) -> int:
        nonlocal most, running
        with lock:
            running += 1
            most = max(most, running)
        try:
            time.sleep(0.01)  # (long enough for the other threads to show)
            return real(paths)
        finally:
            with lock:
                running -= 1

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader.run)
            await trio.testing.wait_all_tasks_blocked()
            for f in range(1, folders + 1):  # (no checkpoint between: all queued at once)
                reader.opened(f, children[f])
            assert len(reader._queue) == ahead.QUEUED
            assert reader.dropped == folders - ahead.QUEUED
            await _advised(reader, per_folder * ahead.QUEUED)
            reader.opened(1, children[1])  # dropped before: read ahead now
            await _advised(reader, per_folder * (ahead.QUEUED + 1))
            nursery.cancel_scope.cancel()
        assert not reader._running and not reader._queue
        reader.opened(2, children[2])  # after the end: nothing queued
        assert not reader._queue

    ahead.will_need = counted
    try:
        trio.run(main)
    finally:
        ahead.will_need = real
    assert 2 <= most <= ahead.THREADS, most  # (split, and bounded; all 4 at once but for a slow start)


def test_will_need_counts_the_files_it_advised(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(os.urandom(100))
    assert ahead.will_need([str(tmp_path / "a"), str(tmp_path / "missing")]) == 1


def test_a_walk_reads_the_next_folders_ahead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Folders 1 to 5 beside each other, two read ahead in a walk (``WALK_AHEAD``): the
    opendir of 1 reads 1 ahead; that of 2 (the next after 1: a walk) reads 2 and the
    next two, 3 and 4; that of 3, 5."""
    monkeypatch.setattr(ahead, "WALK_AHEAD", 2)
    folders = {f: [_file(tmp_path, f * 100 + i) for i in range(2)] for f in range(1, 6)}
    asked: list[int] = []

    def children(folder: int) -> list[Node]:
        asked.append(folder)
        return folders[folder]

    reader = ContentsAhead(_Paths(tmp_path), Opens(), children, _siblings(folders))  # type: ignore[arg-type]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader.run)
            await trio.testing.wait_all_tasks_blocked()
            reader.opened(1, folders[1])
            await _advised(reader, 2)
            assert asked == []
            reader.opened(2, folders[2])
            await _advised(reader, 8)
            assert asked == [3, 4]
            reader.opened(3, folders[3])
            await _advised(reader, 10)
            assert asked == [3, 4, 5]
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_walker_ahead_of_the_advice_gets_the_folders_ahead_of_it_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The walker opens folders 2, 3 and 4 while folder 1's advice waits for the disk: the
    newest, 4, is read ahead next, and in a walk (4 is among the folders after 1) so are
    the three after it; 2 and 3, which the walker has gone past, come last. (Taken oldest
    first, the advice stayed two to four folders behind a walk after a remount: 276-650
    of 1,000 first opens found their bytes still on disk.)"""
    monkeypatch.setattr(ahead, "WALK_AHEAD", 3)
    folders = {f: [_file(tmp_path, f * 100 + i) for i in range(2)] for f in range(1, 9)}
    asked: list[int] = []
    order: list[int] = []  # folders in the order their files were advised
    disk = threading.Event()
    real = ahead.will_need

    def children(folder: int) -> list[Node]:
        asked.append(folder)
        return folders[folder]

    def slow_first(paths: list[str]) -> int:
        if not order:
            disk.wait(5)
        for path in paths:
            folder = int(os.path.basename(path)) // 100
            if folder not in order:
                order.append(folder)
        return real(paths)

    monkeypatch.setattr(ahead, "will_need", slow_first)
    reader = ContentsAhead(_Paths(tmp_path), Opens(), children, _siblings(folders))  # type: ignore[arg-type]

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader.run)
            await trio.testing.wait_all_tasks_blocked()
            reader.opened(1, folders[1])
            await trio.sleep(0.05)  # (folder 1's advice under way, waiting)
            for f in (2, 3, 4):
                reader.opened(f, folders[f])
            disk.set()
            await _advised(reader, 2 * 7)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert asked == [5, 6, 7]
    assert order[:1] == [1] and set(order[1:5]) == {4, 5, 6, 7} and set(order[5:]) == {2, 3}
