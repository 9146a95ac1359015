"""The replay order of a folder's times (``journal.folder_times_last``), pure logic: a
folder's ``setattr`` goes after every entry that changes the folder's contents on the
remote, with the folder's path as that entry has it. Through a real mount with rsync and
``touch -d``: tests/test_programs.py (``test_rsync_keeps_folder_times``...)."""

from __future__ import annotations

from cachefs.store.journal import Op, folder_times_last
from cachefs.sync.ordering import batches as _batches

ROOT, X, DST, SUB = 1, 5, 10, 11


def _order(ops: list[Op], folders: set[int]) -> list[tuple[int, str, bytes]]:
    return [(op.seq, op.kind, op.path) for op in folder_times_last(ops, folders)]


def test_rsync_order_puts_each_folder_time_after_its_contents() -> None:
    """As rsync -a journals a tree: each folder's setattr at its creation (its last
    utimensat, after the files, made no entry of its own)."""
    ops = [Op("mkdir", DST, b"dst", parent=ROOT, seq=1),
           Op("setattr", DST, b"dst", parent=ROOT, seq=2),
           Op("mkdir", SUB, b"dst/sub", parent=DST, seq=3),
           Op("setattr", SUB, b"dst/sub", parent=DST, seq=4),
           Op("create", 20, b"dst/.f.X", parent=DST, seq=5),
           Op("rename", 20, b"dst/.f.X", parent=DST, dst=b"dst/f", dst_parent=DST, seq=6),
           Op("create", 21, b"dst/sub/.g.Y", parent=SUB, seq=7),
           Op("rename", 21, b"dst/sub/.g.Y", parent=SUB, dst=b"dst/sub/g", dst_parent=SUB, seq=8)]
    assert [seq for seq, _, _ in _order(ops, {DST, SUB})] == [1, 3, 5, 6, 2, 7, 8, 4]
    # and the concurrent replay keeps them after the entries they follow
    at = {op.seq: i for i, batch in enumerate(_batches(folder_times_last(ops, {DST, SUB}), 8))
          for op in batch}
    assert at[2] > at[6] and at[4] > at[8] and at[4] > at[3]


def test_a_folder_time_moved_past_a_rename_takes_the_new_path() -> None:
    ops = [Op("setattr", DST, b"x/dst", parent=X, seq=1),
           Op("rename", X, b"x", parent=ROOT, dst=b"y", dst_parent=ROOT, seq=2),
           Op("store", 30, b"y/dst/f", parent=DST, seq=3),
           Op("store", 31, b"z", parent=ROOT, seq=4)]
    assert _order(ops, {DST, X}) == [(2, "rename", b"x"), (3, "store", b"y/dst/f"),
                                     (1, "setattr", b"y/dst"), (4, "store", b"z")]


def test_nothing_moves_without_later_contents() -> None:
    ops = [Op("create", 30, b"dst/f", parent=DST, seq=1),
           Op("setattr", DST, b"dst", parent=ROOT, seq=2),
           Op("setattr", 30, b"dst/f", parent=DST, seq=3),  # (a file's times: no folder's)
           Op("create", 31, b"other/g", parent=SUB, seq=4)]
    assert folder_times_last(ops, {DST, SUB}) is ops
    # a file's setattr is never moved, whatever comes after in its folder
    ops.append(Op("create", 32, b"dst/h", parent=DST, seq=5))
    assert [seq for seq, _, _ in _order(ops, {DST, SUB})] == [1, 3, 4, 5, 2]
