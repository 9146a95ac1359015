"""The journal: the ordered log of changes not yet on the remote (Coda's CML).

Owns: the operation record (``Op``), its encoding in the store's ``journal`` database,
and the optimisation applied before replay. Pure logic: no I/O, no LMDB transactions of
its own (callers append inside their own write transaction), no remote.

What each operation means at replay time:

``create``   a file made here: upload the node's content *as it is at replay time* to
             ``path`` (so successive writes become one upload of the final content)
``store``    content changed here: upload the node's current content to ``path``
``setattr``  mode or times changed here: apply the node's current mode and mtime
``mkdir``, ``symlink``, ``link``, ``unlink``, ``rmdir``, ``rename``: as their names say.
``xattr``    extended attribute ``xattr`` (its full name) changed here: set it on the
             remote to the node's value *at replay time*, or remove it there when the
             node has it no more (journaled only where the remote carries them)

Every operation carries the **base version** of what it changes (``base``: the remote's
``(size, mtime_ns, kind)`` when the cache last agreed with it, or None for something
created here), which the replay compares with the remote to find conflicts.
"""

from __future__ import annotations

import json
import stat as stat_mod
import struct
from dataclasses import dataclass, fields
from collections.abc import Callable, Set

_U64 = struct.Struct(">Q")

CONTENT_OPS = {"create", "store"}
KINDS = {"create", "store", "setattr", "mkdir", "symlink", "link", "unlink", "rmdir", "rename", "xattr"}


def _text(path: bytes) -> str:
    # Names are bytes; JSON is text. surrogateescape keeps every byte (and json escapes
    # lone surrogates as \\udcXX), so the round trip is exact.
    return path.decode("utf-8", "surrogateescape")


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


@dataclass
class Op:
    kind: str
    ino: int  # the node the operation is about (for rename: the moved node)
    path: bytes  # remote path at the time of the operation
    base: tuple[int, int, int] | None = None
    parent: int = 0  # folder whose listing this changes
    dst: bytes = b""  # rename, link: the new name
    dst_parent: int = 0
    replaced: int = 0  # rename: node that was at dst (0: none)
    replaced_base: tuple[int, int, int] | None = None
    target: bytes = b""  # symlink
    mode: int = 0
    xattr: bytes = b""  # xattr: the attribute's full name (an optional field: older entries lack it)
    seq: int = 0  # the journal key; set when read back

    def encode(self) -> bytes:
        # (not dataclasses.asdict: its deep copy was a quarter of a file create's time)
        record = {k: v for k in _FIELDS if (v := getattr(self, k)) not in (b"", 0, None)}
        record["kind"], record["ino"], record["path"] = self.kind, self.ino, self.path  # b"" is the root
        for key in ("path", "dst", "target", "xattr"):
            if key in record:
                record[key] = _text(record[key])
        record["v"] = 1
        return _ENCODER.encode(record).encode()

    @classmethod
    def decode(cls, seq: int, data: bytes) -> "Op":
        record = json.loads(data)
        if record.pop("v", None) != 1 or record.get("kind") not in KINDS:
            raise ValueError(f"journal entry {seq} is not one this release reads")
        record.pop("extra", None)  # (an old field, never written with anything in it)
        for key in ("path", "dst", "target", "xattr"):
            if key in record:
                record[key] = _bytes(record[key])
        for key in ("base", "replaced_base"):
            if record.get(key) is not None:
                record[key] = tuple(record[key])
        return cls(seq=seq, **record)

    def folders(self) -> set[int]:
        """Folders whose listing is local truth until this operation is replayed: those
        it changes, and a folder it creates or moves (the remote has no listing for it
        under that name yet)."""
        own = {self.ino} if self.kind in ("mkdir", "rename") else set()
        return own | {p for p in (self.parent, self.dst_parent) if p}


_FIELDS = tuple(f.name for f in fields(Op) if f.name != "seq")


# json.dumps(record, separators=...) builds an encoder per call: one, kept, writes the same
# (a journal entry 2.7 -> 1.8 us)
_ENCODER = json.JSONEncoder(separators=(",", ":"), check_circular=False)


def key(seq: int) -> bytes:
    return _U64.pack(seq)


def seq_of(key_bytes: bytes) -> int:
    seq: int = _U64.unpack(key_bytes)[0]
    return seq


def optimise(ops: list[Op], alive: set[int], started: Callable[[int], bool] = lambda seq: False,
             produced: Callable[[int], tuple[int, int, int] | None] = lambda ino: None,
             fold_renames: bool = False) -> tuple[list[Op], list[Op]]:
    """Drop what need never reach the remote; returns (kept, dropped). A kept entry that
    is not the one read (``is not``) replaces the entry of its ``seq``.

    Objects created here and deleted again (their node is not in ``alive``) vanish from
    the log with every operation about them: a file created and deleted offline never
    reaches the remote. A rename of such an object that replaced a remote object becomes
    an unlink of that object, so the replaced version still goes away as it did here
    (``produced(ino)``: the version the replay itself put on the remote for a node, for
    one whose upload landed after the rename that replaced it was journaled).
    A file created under one name, linked to another and unlinked from the first (how
    git and other careful writers put a file in place), or renamed to another name that
    held nothing (``fold_renames``: only where the remote's create of a new file refuses
    a name taken meanwhile, as the rename refused it: ``Capabilities.exclusive_create``),
    becomes one create under the second name (see ``_fold_links``; ``started(seq)``:
    whether that entry's upload had begun, asked only of a create that would fold).
    Repeated stores and attribute changes need no rewriting: replay uploads the current
    content and attributes once and skips the rest (see ``cachefs.sync.content``).
    Extended attributes: of repeated ``xattr`` entries for one node and name only the last
    stays (each sends the value as it is at replay time), and one of a node deleted here
    since (removed, or created here and gone) is dropped: the removal takes them along.
    """
    created_here = {op.ino for op in ops if op.kind in ("create", "mkdir", "symlink")}
    doomed = {ino for ino in created_here if ino not in alive}
    last_xattr = {(op.ino, op.xattr): op.seq for op in ops if op.kind == "xattr"}
    kept: list[Op] = []
    dropped: list[Op] = []
    for op in ops:
        if op.kind == "xattr" and (op.ino not in alive or last_xattr[op.ino, op.xattr] != op.seq):
            dropped.append(op)
            continue
        if op.ino in doomed:
            if (removal := remains_of_deleted(op, produced)) is not None:
                kept.append(removal)
            else:
                dropped.append(op)
            continue
        kept.append(op)
    return _fold_links(kept, dropped, started, fold_renames, doomed)


def remains_of_deleted(op: Op, produced: Callable[[int], tuple[int, int, int] | None] = lambda ino: None) \
        -> Op | None:
    """What of ``op`` must still reach the remote when its object was created here and
    deleted again before its creation reached the remote: nothing, but for a rename that
    replaced a remote object, that object's removal under the same ``seq`` (the replaced
    version goes away as it did here, and a later rename onto the name, which replaced
    our deleted object, finds the name free instead of the old version there).

    The replaced object is a remote one when the rename recorded its base version, or
    when the replay put it there (``produced``: its upload landed after the rename was
    journaled, so the rename recorded none). Used by ``optimise`` and by the replay for
    an object that died during a pass, after the pass read the journal (``Ledger.gone``)."""
    if op.kind != "rename" or not op.replaced:
        return None
    base = op.replaced_base if op.replaced_base is not None else produced(op.replaced)
    if base is None:
        return None
    kind = "rmdir" if stat_mod.S_ISDIR(base[2]) else "unlink"
    return Op(kind, op.replaced, op.dst, base=base, parent=op.dst_parent, seq=op.seq)


def _fold_links(ops: list[Op], dropped: list[Op], started: Callable[[int], bool],
                fold_renames: bool = False, doomed: Set[int] = frozenset()) \
        -> tuple[list[Op], list[Op]]:
    """``create P``, ``link P -> D``, ``unlink P`` of one file, with nothing else about
    that file in between, become ``create D`` in the link's place; so do ``create P``,
    ``rename P -> D`` replacing nothing, where ``fold_renames`` (git on a remote without
    hard links: the link fails with EPERM and git renames; over SMB 200 objects put in
    place took 4.3 s of renames one after another, each a barrier). Not elsewhere: there
    the rename refused a file another client made at D meanwhile (kept as a conflict),
    and a create's upload looks at D, then replaces what came after the look. Nor into a
    folder created and deleted here (``doomed``: its mkdir is dropped, and the create
    would find no folder there).

    Replayed as written, that is an upload under P, a remote link and a remote unlink,
    each of the last two a barrier for concurrent replay; folded, one upload under D.
    In the link's place, D means what it meant then (the entries before it, such as the
    making of D's folder or the removal of an older D, are replayed first), and the
    create uploads the file's content and attributes as they are at replay time, as it
    always does. P exists on the remote neither way once the three are replayed. Not
    folded: a create whose upload had started (``started``; it may have landed under P,
    and only the unlink would take it away again).
    """
    folded = _folds(ops, started, fold_renames, doomed)
    if not folded:
        return ops, dropped
    kept = []
    for i, op in enumerate(ops):
        if i not in folded:
            kept.append(op)
        elif (new := folded[i]) is not None:
            kept.append(new)
        else:
            dropped.append(op)
    dropped.sort(key=lambda op: op.seq)
    return kept, dropped


def _folds(ops: list[Op], started: Callable[[int], bool], fold_renames: bool,
           doomed: Set[int]) -> dict[int, Op | None]:
    """position -> its replacement (None: dropped), for each fold of ``_fold_links``: per
    file, its first link fold, else (``fold_renames``) its first rename fold."""
    about: dict[int, list[int]] = {}  # node -> positions of the entries about it
    for i, op in enumerate(ops):
        about.setdefault(op.ino, []).append(i)
        if op.replaced and op.replaced != op.ino:
            about.setdefault(op.replaced, []).append(i)
    folded: dict[int, Op | None] = {}
    for positions in about.values():
        folded.update(_link_fold(ops, positions, started)
                      or (_rename_fold(ops, positions, started, doomed) if fold_renames else {}))
    return folded


def _link_fold(ops: list[Op], positions: list[int], started: Callable[[int], bool]) -> dict[int, Op | None]:
    """The first ``create P``, ``link P -> D``, ``unlink P`` among one file's entries
    (``positions``), folded; {} where there is none."""
    for a, b, c in zip(positions, positions[1:], positions[2:]):
        if _folds_into_create(ops[a], ops[b], ops[c], started):
            return {a: None, c: None, b: _created_at(ops[a], ops[b])}
    return {}


def _rename_fold(ops: list[Op], positions: list[int], started: Callable[[int], bool],
                 doomed: Set[int]) -> dict[int, Op | None]:
    """The first ``create P``, ``rename P -> D`` among one file's entries, D not in a
    doomed folder, folded; {} where there is none."""
    for a, b in zip(positions, positions[1:]):
        if _renamed_into_create(ops[a], ops[b], started) and ops[b].dst_parent not in doomed:
            return {a: None, b: _created_at(ops[a], ops[b])}
    return {}


def _created_at(create: Op, move: Op) -> Op:
    """``create`` made where ``move`` (a link or a rename) put it, in ``move``'s place."""
    return Op("create", create.ino, move.dst, parent=move.dst_parent, mode=create.mode, seq=move.seq)


def _renamed_into_create(create: Op, rename: Op, started: Callable[[int], bool]) -> bool:
    """Whether two successive entries about one file are ``create P`` and ``rename P ->
    D`` (replacing nothing), and the create's upload had not begun: git's object write
    where the filesystem has no hard links (its ``link`` fails, it renames instead)."""
    return create.kind == "create" and rename.kind == "rename" and create.ino == rename.ino \
        and not rename.replaced and rename.path == create.path and not started(create.seq)


def _folds_into_create(create: Op, link: Op, unlink: Op, started: Callable[[int], bool]) -> bool:
    """Whether three successive entries about one file are ``create P``, ``link P -> D``
    (replacing nothing), ``unlink P``, and the create's upload had not begun."""
    return (create.kind, link.kind, unlink.kind) == ("create", "link", "unlink") \
        and create.ino == link.ino == unlink.ino and not link.replaced \
        and link.path == create.path == unlink.path \
        and not started(create.seq)



def folder_times_last(ops: list[Op], folders: set[int]) -> list[Op]:
    """The replay order of ``ops``, with each folder's ``setattr`` entries moved after
    the last entry that changes that folder's contents on the remote.

    A ``setattr`` sends the node's mode and times as they are at replay time, so what
    matters is where it goes. A program that sets a folder's times after filling it
    (``rsync -a``) journals nothing then when the folder already has a ``setattr``
    pending (the one from its creation stands for the later ones), and every entry
    replayed into the folder after that one (a create, the rename of an upload over the
    old file, an unlink) set the folder's mtime on the server to the time of the replay.
    Moved after them, the times land last: the server ends with the folder's times as
    the mount shows them, and the folder keeps ``ATTR_DIRTY`` (its times stay local
    truth against listings) until then. A moved entry takes the folder's path from the
    entry it now follows (a rename of the folder, or of one above it, may lie between).
    ``folders``: the nodes that are folders (a ``setattr`` does not say what it is about).
    Entries keep their ``seq``: only the order of this replay changes, not the journal."""
    after, path = _last_changes_inside(ops, folders)
    moved = {folder: at for folder, at in after.items() if ops[at].kind != "setattr"}
    if not moved:
        return ops
    follow: dict[int, list[Op]] = {}  # position -> the setattr entries that go after it
    out: list[Op] = []
    for op in ops:
        if op.kind == "setattr" and op.ino in moved:
            follow.setdefault(moved[op.ino], []).append(
                Op("setattr", op.ino, path[op.ino], base=op.base, parent=op.parent, seq=op.seq))
    for i, op in enumerate(ops):
        if not (op.kind == "setattr" and op.ino in moved):
            out.append(op)
        out.extend(follow.pop(i, ()))
    return out


def _last_changes_inside(ops: list[Op], folders: set[int]) -> tuple[dict[int, int], dict[int, bytes]]:
    """For each folder of ``folders`` with a ``setattr`` in ``ops``: the position of the
    last entry from that ``setattr`` on that changes what is in it (the ``setattr``'s own
    when none does), and the folder's path as that entry has it."""
    after: dict[int, int] = {}  # folder -> the position its times go after
    path: dict[int, bytes] = {}  # folder -> its path at that position
    for i, op in enumerate(ops):
        if op.kind == "setattr":
            if op.ino in folders and op.ino not in after:
                after[op.ino], path[op.ino] = i, op.path
            continue
        for folder, inside in ((op.parent, op.path), (op.dst_parent, op.dst)):
            if folder in after and inside:
                after[folder], path[folder] = i, inside.rpartition(b"/")[0]
    return after, path
