"""The journal's pure logic, in-process: the record encoding, the optimisation applied
before replay, and the names given to conflict copies."""

from __future__ import annotations

import stat
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefs.store.journal import Op, key, optimise, remains_of_deleted, seq_of
from cachefs.sync.naming import conflict_name
from cachefs.sync.ordering import batches as _batches

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
            dst_parent=9, replaced=43, replaced_base=FILE_BASE, mode=0o100644)
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
    assert back.base is None and back.dst == b"" and back.replaced == 0


def test_a_record_with_the_old_extra_field_still_decodes() -> None:
    """``Op.extra`` is gone (nothing ever put anything in it, and an empty one was never
    written); a record that carries it anyway decodes, the field ignored."""
    data = b'{"kind":"store","ino":5,"path":"a/b","parent":2,"extra":{"note":"x"},"v":1}'
    back = Op.decode(3, data)
    assert (back.kind, back.ino, back.path, back.parent, back.seq) == ("store", 5, b"a/b", 2, 3)
    assert not hasattr(back, "extra")


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


def test_file_put_in_place_twice_leaves_the_old_ones_removal_and_the_second() -> None:
    """git's index.lock renamed over index twice (status, then commit), all before a pass:
    the first lock file is gone, its rename becomes the removal of the server's index,
    and the second lock file's rename then finds the name free."""
    ops = _seq([
        Op("create", 10, b"index.lock", parent=1),
        Op("rename", 10, b"index.lock", parent=1, dst=b"index", dst_parent=1,
           replaced=20, replaced_base=FILE_BASE),
        Op("create", 11, b"index.lock", parent=1),
        Op("rename", 11, b"index.lock", parent=1, dst=b"index", dst_parent=1, replaced=10),
    ])
    kept, dropped = optimise(ops, alive={11})
    assert [(op.kind, op.ino, op.path, op.base, op.seq) for op in kept] == [
        ("unlink", 20, b"index", FILE_BASE, 2), ("create", 11, b"index.lock", None, 3),
        ("rename", 11, b"index.lock", None, 4)]
    assert [op.seq for op in dropped] == [1]


def test_rename_of_doomed_file_over_file_the_replay_uploaded_becomes_unlink() -> None:
    """The replaced file was uploaded by the replay after the rename was journaled (the
    rename recorded no base version of it): the version the replay produced stands in."""
    produced = (1, 1_700_000_000_000_000_000, stat.S_IFREG)
    ops = _seq([
        Op("create", 10, b"a", parent=1),
        Op("rename", 10, b"a", parent=1, dst=b"c", dst_parent=1, replaced=20),
        Op("unlink", 10, b"c", parent=1),
    ])
    kept, dropped = optimise(ops, alive=set(), produced={20: produced}.get)
    assert [(op.kind, op.ino, op.path, op.base, op.seq) for op in kept] == [("unlink", 20, b"c", produced, 2)]
    assert [op.seq for op in dropped] == [1, 3]
    kept, _ = optimise(ops, alive=set(), produced={}.get)  # (made here, never on the remote)
    assert kept == []


@pytest.mark.parametrize("op, left", [
    (Op("rename", 10, b"a", parent=1, dst=b"b", dst_parent=2, replaced=20, replaced_base=FILE_BASE, seq=7),
     Op("unlink", 20, b"b", base=FILE_BASE, parent=2, seq=7)),
    (Op("rename", 10, b"d", parent=1, dst=b"e", dst_parent=2, replaced=20, replaced_base=DIR_BASE, seq=7),
     Op("rmdir", 20, b"e", base=DIR_BASE, parent=2, seq=7)),
    (Op("rename", 10, b"a", parent=1, dst=b"b", dst_parent=2, replaced=20, seq=7), None),  # made here too
    (Op("rename", 10, b"a", parent=1, dst=b"b", dst_parent=2, seq=7), None),  # replaced nothing
    (Op("unlink", 10, b"a", parent=1, base=FILE_BASE, seq=7), None),
    (Op("link", 10, b"a", parent=1, dst=b"b", dst_parent=1, seq=7), None),
    (Op("create", 10, b"a", parent=1, seq=7), None),
])
def test_what_remains_of_the_entries_of_an_object_deleted_before_it_reached_the_remote(
        op: Op, left: Op | None) -> None:
    assert remains_of_deleted(op) == left


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


# -- a file put in place: create, link, unlink -------------------------------------------

def _placed(ino: int = 10, mode: int = stat.S_IFREG | 0o444) -> list[Op]:
    """git's object write: a temporary name, linked to the final one, then unlinked."""
    return [
        Op("create", ino, b"objects/ab/tmp_obj_x", parent=3, mode=mode),
        Op("link", ino, b"objects/ab/tmp_obj_x", dst=b"objects/ab/cdef", dst_parent=3),
        Op("unlink", ino, b"objects/ab/tmp_obj_x", parent=3),
    ]


def test_create_link_unlink_becomes_one_create_in_the_links_place() -> None:
    ops = _seq([Op("mkdir", 3, b"objects/ab", parent=2), *_placed(), Op("setattr", 10, b"objects/ab/cdef",
                                                                          parent=3)])
    kept, dropped = optimise(ops, alive={3, 10})
    assert [(op.kind, op.ino, op.path, op.parent, op.seq) for op in kept] == [
        ("mkdir", 3, b"objects/ab", 2, 1),
        ("create", 10, b"objects/ab/cdef", 3, 3),
        ("setattr", 10, b"objects/ab/cdef", 3, 5),
    ]
    assert kept[1].mode == stat.S_IFREG | 0o444 and kept[1].base is None and not kept[1].dst
    assert kept[0] is ops[0] and kept[2] is ops[4]
    assert [op.seq for op in dropped] == [2, 4]


def test_files_put_in_place_side_by_side_fold_each() -> None:
    a, b = _placed(10), _placed(11)
    b = [Op(op.kind, op.ino, op.path.replace(b"tmp_obj_x", b"tmp_obj_y"), dst=op.dst.replace(b"cdef", b"0123"),
            dst_parent=op.dst_parent, parent=op.parent) for op in b]
    ops = _seq([a[0], b[0], a[1], b[1], b[2], a[2]])
    kept, dropped = optimise(ops, alive={10, 11})
    assert [(op.kind, op.path, op.seq) for op in kept] == [
        ("create", b"objects/ab/cdef", 3), ("create", b"objects/ab/0123", 4)]
    assert [op.seq for op in dropped] == [1, 2, 5, 6]


@pytest.mark.parametrize("between", [
    Op("setattr", 10, b"objects/ab/tmp_obj_x", parent=3),  # its mode would be set on a missing name
    Op("store", 10, b"objects/ab/tmp_obj_x", parent=3),  # its upload would go to the first name
    Op("link", 10, b"objects/ab/tmp_obj_x", dst=b"other", dst_parent=1),  # a second link
    Op("rename", 20, b"x", parent=1, dst=b"objects/ab/tmp_obj_x", dst_parent=3, replaced=10,
       replaced_base=None),  # something moved over the first name
])
def test_not_folded_when_something_else_happens_to_the_file_in_between(between: Op) -> None:
    placed = _placed()
    ops = _seq([placed[0], between, placed[1], placed[2]])
    kept, dropped = optimise(ops, alive={10, 20})
    assert [op.seq for op in kept] == [1, 2, 3, 4] and dropped == []
    assert all(a is b for a, b in zip(kept, ops))


def test_not_folded_when_the_second_name_is_unlinked() -> None:
    create, link, _ = _placed()
    ops = _seq([create, link, Op("unlink", 10, b"objects/ab/cdef", parent=3)])
    kept, dropped = optimise(ops, alive={10})
    assert [op.kind for op in kept] == ["create", "link", "unlink"] and dropped == []


def test_not_folded_when_the_creates_upload_had_started() -> None:
    # after a crash in the middle of its upload, the file may be on the remote under the
    # first name: only the unlink would take it away
    ops = _seq(_placed())
    kept, dropped = optimise(ops, alive={10}, started={1}.__contains__)
    assert [op.kind for op in kept] == ["create", "link", "unlink"] and dropped == []


def test_not_folded_without_the_create() -> None:
    # the create was replayed by an earlier pass: the file is on the remote
    ops = _seq(_placed())[1:]
    kept, dropped = optimise(ops, alive={10})
    assert [op.kind for op in kept] == ["link", "unlink"] and dropped == []


def _renamed_in_place(ino: int = 10) -> list[Op]:
    """git's object write where the remote has no hard links: ``link`` fails (EPERM), git
    renames the temporary name to the final one."""
    return [
        Op("create", ino, b"objects/ab/tmp_obj_x", parent=3, mode=stat.S_IFREG | 0o444),
        Op("rename", ino, b"objects/ab/tmp_obj_x", parent=3, dst=b"objects/ab/cdef", dst_parent=3),
    ]


def test_create_then_rename_becomes_one_create_in_the_renames_place() -> None:
    ops = _seq([Op("mkdir", 3, b"objects/ab", parent=2), *_renamed_in_place(),
                Op("setattr", 10, b"objects/ab/cdef", parent=3)])
    assert optimise(ops, alive={3, 10})[0] == ops  # (a remote without ``exclusive_create``)
    kept, dropped = optimise(ops, alive={3, 10}, fold_renames=True)
    assert [(op.kind, op.ino, op.path, op.parent, op.seq) for op in kept] == [
        ("mkdir", 3, b"objects/ab", 2, 1),
        ("create", 10, b"objects/ab/cdef", 3, 3),
        ("setattr", 10, b"objects/ab/cdef", 3, 4),
    ]
    assert kept[1].mode == stat.S_IFREG | 0o444 and kept[1].base is None and not kept[1].dst
    assert [op.seq for op in dropped] == [2]


def test_create_then_rename_into_a_folder_made_and_removed_here_is_not_folded() -> None:
    # mkdir stage, p.tmp -> stage/d -> e, rmdir stage: the mkdir is dropped, and a create
    # of stage/d would find no folder (the replay made it again: a false conflict)
    ops = _seq([Op("mkdir", 5, b"stage", parent=1),
                Op("create", 10, b"p.tmp", parent=1, mode=stat.S_IFREG | 0o644),
                Op("rename", 10, b"p.tmp", parent=1, dst=b"stage/d", dst_parent=5),
                Op("rename", 10, b"stage/d", parent=5, dst=b"e", dst_parent=1),
                Op("rmdir", 5, b"stage", parent=1)])
    kept, dropped = optimise(ops, alive={10}, fold_renames=True)
    assert [op.kind for op in kept] == ["create", "rename", "rename"]
    assert [op.seq for op in dropped] == [1, 5]


@pytest.mark.parametrize("case", ["replaces", "started", "between", "no create", "renamed twice"])
def test_create_then_rename_not_folded_unless_the_first_name_never_reached_the_remote(case: str) -> None:
    create, rename = _renamed_in_place()
    if case == "replaces":  # the rename replaced a file at the second name: its version is checked
        rename = Op("rename", 10, rename.path, parent=3, dst=rename.dst, dst_parent=3, replaced=20,
                    replaced_base=(1, 2, stat.S_IFREG))
        ops = _seq([create, rename])
    elif case == "between":  # its upload would go to the first name
        ops = _seq([create, Op("store", 10, create.path, parent=3), rename])
    elif case == "renamed twice":  # the first rename folds; the second stays, from the name it gave
        ops = _seq([create, rename, Op("rename", 10, rename.dst, parent=3, dst=b"objects/ab/last", dst_parent=3)])
        kept, dropped = optimise(ops, alive={10, 20}, fold_renames=True)
        assert [(op.kind, op.path, op.seq) for op in kept] == [
            ("create", b"objects/ab/cdef", 2), ("rename", b"objects/ab/cdef", 3)]
        assert [op.seq for op in dropped] == [1]
        return
    else:
        ops = _seq([create, rename])[1:] if case == "no create" else _seq([create, rename])
    kept, dropped = optimise(ops, alive={10, 20}, started={1}.__contains__ if case == "started" else lambda s: False,
                             fold_renames=True)
    assert all(a is b for a, b in zip(kept, ops)) and len(kept) == len(ops) and dropped == []


def test_placed_then_deleted_vanishes() -> None:
    ops = _seq([*_placed(), Op("unlink", 10, b"objects/ab/cdef", parent=3)])
    kept, dropped = optimise(ops, alive=set())
    assert kept == [] and len(dropped) == 4


# -- replay batches -------------------------------------------------------------------------

def _shape(batches) -> list[list[tuple[str, int]]]:
    return [[(op.kind, op.ino) for op in batch] for batch in batches]


def test_batches_of_a_copied_tree() -> None:
    # cp -a: the folder, its files, each file's mode, the folder's times
    ops = _seq([
        Op("mkdir", 10, b"d", parent=1),
        Op("create", 11, b"d/f", parent=10), Op("setattr", 11, b"d/f", parent=10),
        Op("create", 12, b"d/g", parent=10), Op("setattr", 12, b"d/g", parent=10),
        Op("setattr", 10, b"d", parent=1),
        Op("create", 13, b"h", parent=1),
    ])
    assert _shape(_batches(ops, 8)) == [
        [("mkdir", 10), ("create", 13)],
        [("create", 11), ("create", 12)],
        [("setattr", 11), ("setattr", 12)],
        [("setattr", 10)],
    ]


def test_batches_keep_barriers_alone_and_in_place() -> None:
    ops = _seq([
        Op("create", 11, b"a", parent=1), Op("create", 12, b"b", parent=1),
        Op("rename", 11, b"a", parent=1, dst=b"c", dst_parent=1),
        Op("create", 13, b"a", parent=1), Op("unlink", 12, b"b", parent=1),
        Op("store", 11, b"c", parent=1),
    ])
    assert _shape(_batches(ops, 8)) == [
        [("create", 11), ("create", 12)], [("rename", 11)], [("create", 13)], [("unlink", 12)],
        [("store", 11)],
    ]


def test_batches_are_at_most_width_long() -> None:
    ops = _seq([Op("create", 100 + i, b"f%d" % i, parent=1) for i in range(10)])
    assert [len(b) for b in _batches(ops, 4)] == [4, 4, 2]


_kinds = st.sampled_from(["create", "store", "setattr", "mkdir", "unlink", "rename", "link"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_kinds, st.integers(1, 6), st.integers(1, 6)), max_size=40), st.integers(1, 5))
def test_batches_keep_every_dependency_in_order(steps, width: int) -> None:
    ops = _seq([Op(kind, ino, b"p", parent=parent) for kind, ino, parent in steps])
    batches = list(_batches(ops, width))
    flat = [op for batch in batches for op in batch]
    assert sorted(op.seq for op in flat) == [op.seq for op in ops]  # each once
    at = {op.seq: i for i, batch in enumerate(batches) for op in batch}
    for batch in batches:
        assert len(batch) <= width
        assert len({op.ino for op in batch}) == len(batch)
        if any(op.kind not in ("create", "store", "setattr", "mkdir") for op in batch):
            assert len(batch) == 1
    for i, a in enumerate(ops):
        for b in ops[i + 1:]:
            barrier = {a.kind, b.kind} - {"create", "store", "setattr", "mkdir"}
            depends = a.ino == b.ino or a.ino == b.parent or a.parent == b.ino
            if barrier or depends:
                assert at[a.seq] < at[b.seq], (a, b)


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
