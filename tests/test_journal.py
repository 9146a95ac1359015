"""The journal's pure logic, in-process: the record encoding, the optimisation applied
before replay, and the names given to conflict copies."""

from __future__ import annotations

import stat
from datetime import datetime

import pytest

from cachefs.sync.journal import Op, key, optimise, seq_of
from cachefs.sync.manager import conflict_name

FILE_BASE = (5, 1_600_000_000_000_000_000, stat.S_IFREG)
DIR_BASE = (4096, 1_600_000_000_000_000_000, stat.S_IFDIR)
WHEN = datetime(2024, 3, 9, 7, 5, 3).timestamp()
TAG = " (conflict 2024-03-09 070503 laptop)"


# -- encoding ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    b"plain.txt",
    b"caf\xc3\xa9 \xe2\x82\xac.txt",  # UTF-8
    b"latin1-\xe9\xff\xfe",  # not UTF-8
    b"new\nline",
    b"tab\tand \\ backslash \"quote\"",
    b"\x01\x7f\x80\xc0\xaf",  # control bytes, an overlong UTF-8 sequence
])
def test_encode_decode_round_trip(name: bytes) -> None:
    op = Op("rename", 42, b"dir/" + name, base=FILE_BASE, parent=7, dst=b"other/" + name + b"2",
            dst_parent=9, replaced=43, replaced_base=FILE_BASE, mode=0o100644,
            extra={"note": "x"})
    back = Op.decode(12, op.encode())
    assert back.seq == 12
    back.seq = 0
    assert back == op
    assert isinstance(back.path, bytes) and isinstance(back.base, tuple)


def test_encode_decode_symlink_target_and_defaults() -> None:
    op = Op("symlink", 3, b"l\xff", parent=1, target=b"../t\narget\xfe")
    back = Op.decode(1, op.encode())
    assert (back.kind, back.ino, back.path, back.target, back.parent) == \
        ("symlink", 3, b"l\xff", b"../t\narget\xfe", 1)
    assert back.base is None and back.dst == b"" and back.replaced == 0 and back.extra == {}


def test_encoding_is_one_line_of_json() -> None:
    data = Op("create", 1, b"a\nb\xff", parent=1).encode()
    assert b"\n" not in data
    assert data.startswith(b"{")


def test_decode_refuses_unknown_versions_and_kinds() -> None:
    good = Op("unlink", 1, b"x").encode()
    with pytest.raises(ValueError):
        Op.decode(1, good.replace(b'"v":1', b'"v":2'))
    with pytest.raises(ValueError):
        Op.decode(1, good.replace(b'"unlink"', b'"explode"'))


def test_keys_sort_in_sequence_order() -> None:
    seqs = [1, 2, 255, 256, 65536, 2**40]
    assert sorted(key(s) for s in seqs) == [key(s) for s in seqs]
    assert [seq_of(key(s)) for s in seqs] == seqs


# -- optimise -----------------------------------------------------------------------------

def _seq(ops: list[Op]) -> list[Op]:
    for i, op in enumerate(ops, 1):
        op.seq = i
    return ops


def test_created_written_deleted_offline_vanishes() -> None:
    ops = _seq([
        Op("create", 10, b"tmp.txt", parent=1),
        Op("store", 10, b"tmp.txt", parent=1),
        Op("setattr", 10, b"tmp.txt", parent=1),
        Op("store", 10, b"tmp.txt", parent=1),
        Op("unlink", 10, b"tmp.txt", parent=1),
    ])
    kept, dropped = optimise(ops, alive=set())
    assert kept == []
    assert [op.seq for op in dropped] == [1, 2, 3, 4, 5]


def test_created_renamed_deleted_vanishes() -> None:
    ops = _seq([
        Op("create", 10, b"a", parent=1),
        Op("rename", 10, b"a", parent=1, dst=b"b", dst_parent=1),
        Op("unlink", 10, b"b", parent=1),
    ])
    kept, dropped = optimise(ops, alive=set())
    assert kept == [] and len(dropped) == 3


def test_rename_of_doomed_file_over_remote_file_becomes_unlink() -> None:
    ops = _seq([
        Op("create", 10, b"new", parent=1),
        Op("rename", 10, b"new", parent=1, dst=b"existing", dst_parent=1,
           replaced=20, replaced_base=FILE_BASE),
        Op("unlink", 10, b"existing", parent=1),
    ])
    kept, dropped = optimise(ops, alive={20})
    assert len(kept) == 1
    unlink = kept[0]
    assert (unlink.kind, unlink.ino, unlink.path, unlink.base, unlink.parent, unlink.seq) == \
        ("unlink", 20, b"existing", FILE_BASE, 1, 2)
    assert [op.seq for op in dropped] == [1, 3]


def test_rename_of_doomed_folder_over_remote_folder_becomes_rmdir() -> None:
    ops = _seq([
        Op("mkdir", 10, b"d", parent=1, mode=stat.S_IFDIR | 0o755),
        Op("rename", 10, b"d", parent=1, dst=b"old", dst_parent=1,
           replaced=20, replaced_base=DIR_BASE),
        Op("rmdir", 10, b"old", parent=1),
    ])
    kept, _ = optimise(ops, alive=set())
    assert [(op.kind, op.ino, op.path) for op in kept] == [("rmdir", 20, b"old")]


def test_rename_of_doomed_file_over_other_doomed_file_vanishes() -> None:
    # the replaced object was also created here: it has no remote version to remove
    ops = _seq([
        Op("create", 10, b"a", parent=1),
        Op("create", 11, b"b", parent=1),
        Op("rename", 10, b"a", parent=1, dst=b"b", dst_parent=1, replaced=11, replaced_base=None),
        Op("unlink", 10, b"b", parent=1),
    ])
    kept, dropped = optimise(ops, alive=set())
    assert kept == [] and len(dropped) == 4


def test_mkdir_rmdir_vanish() -> None:
    ops = _seq([
        Op("mkdir", 10, b"d", parent=1),
        Op("create", 11, b"d/f", parent=10),
        Op("unlink", 11, b"d/f", parent=10),
        Op("rmdir", 10, b"d", parent=1),
    ])
    kept, dropped = optimise(ops, alive=set())
    assert kept == [] and len(dropped) == 4


def test_operations_on_surviving_nodes_kept_in_order() -> None:
    ops = _seq([
        Op("store", 5, b"remote.txt", base=FILE_BASE, parent=1),  # remote file, alive
        Op("create", 10, b"gone", parent=1),  # doomed
        Op("mkdir", 11, b"keepdir", parent=1),  # survives
        Op("store", 10, b"gone", parent=1),
        Op("create", 12, b"keepdir/f", parent=11),  # survives
        Op("unlink", 10, b"gone", parent=1),
        Op("rename", 5, b"remote.txt", base=FILE_BASE, parent=1, dst=b"keepdir/r", dst_parent=11),
        Op("unlink", 30, b"old.txt", base=FILE_BASE, parent=1),  # a remote file deleted here
        Op("setattr", 12, b"keepdir/f", parent=11),
    ])
    kept, dropped = optimise(ops, alive={5, 11, 12})
    assert [op.seq for op in kept] == [1, 3, 5, 7, 8, 9]
    assert all(a is b for a, b in zip(kept, [ops[0], ops[2], ops[4], ops[6], ops[7], ops[8]]))
    assert [op.seq for op in dropped] == [2, 4, 6]


def test_link_of_doomed_file_is_kept() -> None:
    # the other name still holds the content: the link must not vanish with the node
    ops = _seq([
        Op("create", 10, b"a", parent=1),
        Op("link", 10, b"a", dst=b"b", dst_parent=1),
    ])
    kept, _ = optimise(ops, alive={10})
    assert [op.kind for op in kept] == ["create", "link"]


def test_optimise_of_empty_log() -> None:
    assert optimise([], set()) == ([], [])


# -- conflict names -----------------------------------------------------------------------

def test_conflict_name_keeps_extension() -> None:
    assert conflict_name(b"report.txt", WHEN, "laptop") == f"report{TAG}.txt".encode()


def test_conflict_name_keeps_last_extension_only() -> None:
    assert conflict_name(b"backup.tar.gz", WHEN, "laptop") == f"backup.tar{TAG}.gz".encode()


def test_conflict_name_without_extension() -> None:
    assert conflict_name(b"Makefile", WHEN, "laptop") == f"Makefile{TAG}".encode()


def test_conflict_name_of_dotfile() -> None:
    # a leading dot is not an extension: ".bashrc (conflict ...)", not " (conflict ...).bashrc"
    assert conflict_name(b".bashrc", WHEN, "laptop") == f".bashrc{TAG}".encode()


def test_conflict_name_non_utf8_kept() -> None:
    assert conflict_name(b"\xff\xfe.dat", WHEN, "laptop") == b"\xff\xfe" + TAG.encode() + b".dat"


@pytest.mark.parametrize("name", [b"x" * 255, b"y" * 250 + b".text", b"z" * 200 + b"." + b"e" * 54])
def test_conflict_name_fits_255_bytes(name: bytes) -> None:
    result = conflict_name(name, WHEN, "laptop")
    assert len(result) <= 255
    assert TAG.encode() in result
    dot = name.rfind(b".")
    if dot > 0:
        assert result.endswith(name[dot:])
    assert result.startswith(name[:10])


def test_conflict_name_truncates_multibyte_names_to_255_bytes() -> None:
    name = "é".encode() * 127  # 254 bytes
    result = conflict_name(name, WHEN, "laptop")
    assert len(result) <= 255
    assert TAG.encode() in result


def test_conflict_names_differ_by_time() -> None:
    assert conflict_name(b"a.txt", WHEN, "h") != conflict_name(b"a.txt", WHEN + 1, "h")


def test_conflict_name_with_long_extension_fits_255_bytes() -> None:
    # an "extension" longer than the room left must not push the name past NAME_MAX
    name = b"a." + b"e" * 240
    result = conflict_name(name, WHEN, "laptop")
    assert len(result) <= 255, len(result)
    assert TAG.encode() in result
