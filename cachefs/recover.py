"""``cachefs recover CACHE_DIR --to DIR``: save the content of changed files that a cache,
damaged or not, still holds, so that nothing still on disk is lost.

Owns: reading a cache directory without changing anything in it (the index opened
read-only and without its lock file, content files opened read-only, the cache's lock
taken shared so that no mount runs meanwhile), tolerating damaged records and pages.
Must not touch: the network, FUSE, the cache's records (it never writes one).

What goes out, into ``DIR``:

    files/<path>        a file changed here and not yet on the server (``DIRTY``; also a
                        damaged copy, ``DAMAGED``, and a version the server refused, ``KEPT``), under
                        its path in the share when the index still tells it
    by-inode/<ino>      a content file whose path is unknown: its node record is missing
                        or damaged, the index is gone, or its folders are
    RECOVERED.txt       one line per file saved (where from, size, what was wrong)
    journal.txt         the changes that were waiting for the server, one per line
                        (renames, deletions, new folders: redo them by hand)
    xattrs.dump         every ``user.`` extended attribute the cache records, of each file
                        and folder whose path is known, in ``getfattr --dump`` form (over
                        SFTP the cache holds the only copy): ``cd SHARE && setfattr
                        --restore=DIR/xattrs.dump`` puts them back; each file saved also
                        gets its own, where the destination's file system keeps them

A clean file (its content equals the server's) is not saved when its record says so.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import os
import stat as stat_mod
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator

import lmdb

from .store import crypto
from .store.crypto import RecordError
from .store.index import DAMAGED, DIRTY, KEPT, KERNEL_WRITES, PROBE_CRASHED, ROOT_INO, WRITING, Node, probe_index
from .progress import human_bytes
from .store import journal
from .store.journal import Op
from .store.xattrs import XattrSet


#: versions that are in this cache only: changes not yet replayed, what was left of a
#: version that failed its checksum, a version the server refused
_ONLY_HERE = DIRTY | DAMAGED | KEPT


class RecoverError(Exception):
    """Recovery cannot start (bad arguments, a mount using the cache)."""


@dataclass
class Saved:
    ino: int
    dest: Path
    size: int
    note: str = ""


@dataclass
class Report:
    saved: list[Saved] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # content that could not be read
    damage: list[str] = field(default_factory=list)  # records and pages found damaged
    skipped_clean: int = 0
    missing: list[str] = field(default_factory=list)  # changed files whose content is gone
    ops: list[Op] = field(default_factory=list)
    index: str = "read"  # or why it could not be


class _Index:
    """The records of a cache's index that recovery uses, read tolerantly."""

    def __init__(self, cache_dir: Path, codec: crypto.PlainCodec, report: Report) -> None:
        self.nodes: dict[int, Node] = {}
        self.bad_nodes: set[int] = set()
        self.ops: list[Op] = []
        self.xattrs: dict[int, XattrSet] = {}
        index = cache_dir / "index"
        env = _open_index(index, report)
        if env is None:
            return
        try:
            with env.begin() as txn:
                schema = _schema(env, txn, index / "data.mdb", report)
                if schema is None:
                    return

                def opened(value: bytes, key: bytes) -> bytes:
                    return codec.open(value, key) if schema == b"2" else codec.open_schema1(value)

                self._read_nodes(env, txn, opened, report)
                self._read_journal(env, txn, opened, report)
                self._read_xattrs(env, txn, opened, report)
        finally:
            env.close()

    def _read_nodes(self, env: lmdb.Environment, txn: lmdb.Transaction,
                    opened: Callable[[bytes, bytes], bytes], report: Report) -> None:
        for key, value in self._records(env, txn, b"nodes", report):
            ino = int.from_bytes(key, "big") if len(key) == 8 else None
            try:
                if ino is None:
                    raise RecordError("has a damaged key")
                self.nodes[ino] = Node.unpack(ino, opened(value, key))
            except Exception as exc:  # noqa: BLE001 - any damage: reported, never used
                if ino is not None:
                    self.bad_nodes.add(ino)
                report.damage.append(f"node {key.hex()}: {exc}")

    def _read_journal(self, env: lmdb.Environment, txn: lmdb.Transaction,
                      opened: Callable[[bytes, bytes], bytes], report: Report) -> None:
        for key, value in self._records(env, txn, b"journal", report):
            try:
                self.ops.append(Op.decode(journal.seq_of(key), opened(value, key)))
            except Exception as exc:  # noqa: BLE001 - any damage
                report.damage.append(f"journal entry {key.hex()}: {exc}")

    def _read_xattrs(self, env: lmdb.Environment, txn: lmdb.Transaction,
                     opened: Callable[[bytes, bytes], bytes], report: Report) -> None:
        try:  # (a cache made before extended attributes has no such sub-database)
            env.open_db(b"xattrs", txn=txn, create=False)
        except lmdb.NotFoundError:
            return
        for key, value in self._records(env, txn, b"xattrs", report):
            try:
                self.xattrs[int.from_bytes(key, "big")] = XattrSet.unpack(opened(value, key))
            except Exception as exc:  # noqa: BLE001 - any damage
                report.damage.append(f"extended attributes {key.hex()}: {exc}")

    @staticmethod
    def _records(env: lmdb.Environment, txn: lmdb.Transaction, name: bytes, report: Report
                 ) -> Iterator[tuple[bytes, bytes]]:
        """The (key, value) pairs of sub-database ``name`` up to a damaged page."""
        try:
            db = env.open_db(name, txn=txn, create=False)
            cur = txn.cursor(db=db)
            ok = cur.first()
        except lmdb.Error as exc:
            report.damage.append(f"{name.decode()}: cannot be read ({exc})")
            return
        count = 0
        while ok:
            yield bytes(cur.key()), bytes(cur.value())
            count += 1
            try:
                ok = cur.next()
            except lmdb.Error as exc:
                report.damage.append(f"{name.decode()}: reading stopped at a damaged page "
                                     f"after {count} records ({exc})")
                return

    def path_of(self, ino: int) -> bytes | None:
        """The share path from the nodes' own parents and names; None if a link is
        missing, damaged, or not a safe name."""
        parts: list[bytes] = []
        seen = set()
        while ino != ROOT_INO:
            node = self.nodes.get(ino)
            if node is None or ino in seen or not _safe_name(node.name):
                return None
            seen.add(ino)
            parts.append(node.name)
            ino = node.parent
        return b"/".join(reversed(parts)) if parts else None


def _open_index(index: Path, report: Report) -> lmdb.Environment | None:
    """The index read-only and without its lock file; None (and why, in ``report.index``)
    when it is missing, empty, or so damaged that reading it would crash."""
    mdb = index / "data.mdb"
    if not mdb.is_file() or mdb.stat().st_size == 0:
        report.index = f"{mdb} is missing" if not mdb.is_file() else f"{mdb} is empty"
        return None
    failure = probe_index(index)  # (in a child: some damage makes LMDB abort its reader)
    if failure is not None and failure.startswith(PROBE_CRASHED):
        report.index = f"{mdb} cannot be read: {failure}"
        return None
    try:
        return lmdb.open(str(index), readonly=True, lock=False, max_dbs=16, subdir=True)
    except lmdb.Error as exc:
        report.index = f"{mdb} does not open ({exc})"
        return None


def _schema(env: lmdb.Environment, txn: lmdb.Transaction, mdb: Path, report: Report) -> bytes | None:
    """The index's schema if this release reads it; None (and why, in ``report.index``)."""
    try:
        meta = env.open_db(b"meta", txn=txn, create=False)
        schema = txn.get(b"schema", db=meta)
    except lmdb.Error as exc:
        report.index = f"{mdb} has no readable schema ({exc})"
        return None
    if schema not in (b"1", b"2"):
        report.index = f"{mdb} has schema {schema!r}, not one this release reads"
        return None
    return bytes(schema)


def _safe_name(name: bytes) -> bool:
    return bool(name) and name not in (b".", b"..") and b"/" not in name and b"\0" not in name


def recover(cache_dir: Path, to: Path, key: bytes | None,
            progress: Callable[[str], None] | None = None) -> Report:
    """Save what ``cache_dir`` holds of changed files into ``to`` (new or empty)."""
    cache_dir, to = cache_dir.absolute(), to.absolute()
    if not cache_dir.is_dir():
        raise RecoverError(f"{cache_dir} is not a folder")
    if to == cache_dir or cache_dir in to.parents:
        raise RecoverError(f"--to {to} is inside the cache: choose a folder outside it")
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise RecoverError(f"{to} exists and is not an empty folder: choose a new one")
    if (cache_dir / "crypt.json").exists() and key is None:
        raise RecoverError(f"the cache in {cache_dir} is encrypted: give its key")
    lock = _lock_shared(cache_dir)
    try:
        return _recover(cache_dir, to, key, progress)
    finally:
        if lock is not None:
            os.close(lock)


def _lock_shared(cache_dir: Path) -> int | None:
    try:
        fd = os.open(cache_dir / "lock", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RecoverError(f"the cache in {cache_dir} is in use by a cachefs mount: unmount it first") from None
    return fd


def _recover(cache_dir: Path, to: Path, key: bytes | None, progress: Callable[[str], None] | None) -> Report:
    report = Report()
    codec = crypto.SealedCodec(key) if key else crypto.PlainCodec()
    content = crypto.SealedContent(key) if key else crypto.PlainContent()
    index = _Index(cache_dir, codec, report)
    report.ops = index.ops
    have_index = report.index == "read"
    data_dir = cache_dir / "data"
    names = _content_names(data_dir)
    op_paths = _journal_paths(index.ops)
    to.mkdir(parents=True, exist_ok=True, mode=0o700)
    last_shown = time.monotonic()
    for n, name in enumerate(names, 1):
        ino = int(name)
        node = index.nodes.get(ino)
        if have_index and node is not None and not node.flags & _ONLY_HERE:
            report.skipped_clean += 1  # on the server as it is here
            continue
        if node is not None and not node.is_file:
            continue
        dest, note = _destination(index, op_paths, have_index, to, ino, name)
        _save(content, data_dir / name, dest, node, ino, note, report, index.xattrs.get(ino))
        if progress is not None and time.monotonic() - last_shown > 0.5:
            last_shown = time.monotonic()
            progress(f"recovering: {n}/{len(names)} content files looked at, {len(report.saved)} saved")
    report.missing.extend(_missing_content(index, {int(name) for name in names}))
    _write_lists(to, report)
    _write_xattrs(to, index)
    return report


def _write_xattrs(to: Path, index: _Index) -> None:
    """``xattrs.dump``: the recorded ``user.`` attributes of each node whose path is known,
    as ``getfattr --dump`` writes them (values in base64: ``0s...``), for ``setfattr
    --restore``; none written when the cache records none."""
    lines = []
    for ino, found in sorted(index.xattrs.items()):
        path = index.path_of(ino)
        names = found.names()
        if path is None or not names:
            continue
        lines.append(f"# file: {os.fsdecode(path)}\n")
        for name in sorted(names):
            value = found.get(name) or b""
            lines.append(f"{os.fsdecode(name)}=0s{base64.b64encode(value).decode()}\n")
        lines.append("\n")
    if lines:
        with open(to / "xattrs.dump", "w", encoding="utf-8", errors="surrogateescape") as f:
            f.writelines(lines)


def _content_names(data_dir: Path) -> list[str]:
    """The content files' names (inode numbers), in order."""
    try:
        return sorted((n for n in os.listdir(data_dir) if n.isdigit()), key=int)
    except FileNotFoundError:
        return []


def _journal_paths(ops: list[Op]) -> dict[int, bytes]:
    """The latest path a journal entry gave each node: a fallback when its folders are gone."""
    op_paths: dict[int, bytes] = {}
    for op in ops:
        if op.kind == "rename" and op.dst:
            op_paths[op.ino] = op.dst
        elif op.kind in ("create", "store") and op.path:
            op_paths[op.ino] = op.path
    return op_paths


def _destination(index: _Index, op_paths: dict[int, bytes], have_index: bool, to: Path, ino: int,
                 name: str) -> tuple[Path, str]:
    """Where to save content file ``name`` (under files/ by its path when known, else
    under by-inode/) and the note that says what was unknown about it."""
    if index.nodes.get(ino) is None:
        if not have_index:
            note = "no index"
        elif ino in index.bad_nodes:
            note = "its record is damaged: whether it changed is unknown"
        else:
            note = "no record for it: whether it changed is unknown"
        return to / "by-inode" / name, note
    path = index.path_of(ino)
    if path is None and ino in op_paths and all(_safe_name(p) for p in op_paths[ino].split(b"/")):
        return to / "files" / os.fsdecode(op_paths[ino]), "path from the journal"
    if path is None:
        return to / "by-inode" / name, "its folders are not known"
    return to / "files" / os.fsdecode(path), ""


def _missing_content(index: _Index, with_content: set[int]) -> list[str]:
    """Files changed here whose content file is gone."""
    missing = []
    for ino, node in index.nodes.items():
        if node.flags & _ONLY_HERE and node.is_file and ino not in with_content and node.size:
            where = index.path_of(ino)
            missing.append(f"{os.fsdecode(where) if where else f'inode {ino}'} ({node.size} bytes): "
                           "its content file is gone")
    return missing


def _save(content: crypto.PlainContent, src: Path, dest: Path, node: Node | None, ino: int, note: str,
          report: Report, xattrs: XattrSet | None = None) -> None:
    try:
        fd = _open_untouched(src)
    except OSError as exc:
        report.failed.append(f"{src}: {exc.strerror}")
        return
    try:
        length = content.length(fd)
        if node is None or node.flags & (KERNEL_WRITES | WRITING):
            size = length  # (being written when the mount ended: the file is the truth)
        else:
            size = node.size
            if length < size:
                note = _add_note(note, f"cut short: {length} of {size} bytes")
                size = length
        dest.parent.mkdir(parents=True, exist_ok=True)
        done, note = _write_copy(content, fd, size, dest, node, note)
        note = _set_xattrs(dest, xattrs, note)
        if node is not None:
            os.utime(dest, ns=(node.atime_ns, node.mtime_ns))
        report.saved.append(Saved(ino, dest, done, note))
    except OSError as exc:
        if exc.errno == errno.EEXIST:  # two paths named alike (a damaged name)
            report.failed.append(f"inode {ino}: {dest} exists already")
        else:
            report.failed.append(f"inode {ino} -> {dest}: {exc.strerror or exc}")
    finally:
        os.close(fd)


def _set_xattrs(dest: Path, xattrs: XattrSet | None, note: str) -> str:
    """The file's recorded ``user.`` attributes set on its copy; ``note`` says what the
    destination refused (they are in ``xattrs.dump`` too)."""
    if xattrs is None:
        return note
    for name in xattrs.names():
        try:
            os.setxattr(dest, name, xattrs.get(name) or b"", follow_symlinks=False)
        except OSError as exc:
            return _add_note(note, f"extended attributes not set ({exc.strerror or exc}): see xattrs.dump")
    return note


def _open_untouched(src: Path) -> int:
    """``src`` opened to read without changing even its access time (where allowed)."""
    try:
        return os.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NOATIME)
    except PermissionError:
        return os.open(src, os.O_RDONLY | os.O_CLOEXEC)


def _write_copy(content: crypto.PlainContent, fd: int, size: int, dest: Path, node: Node | None,
                note: str) -> tuple[int, str]:
    """Copy up to ``size`` bytes of the content in ``fd`` to a new file ``dest``: the bytes
    copied, and ``note`` with where reading stopped if it did."""
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    done = 0
    try:
        reader = content.reader(fd, size)
        while done < size:
            try:
                chunk = reader.read(min(1 << 20, size - done))
            except OSError as exc:
                note = _add_note(note, f"unreadable from byte {done}: {exc.strerror or exc}")
                break
            if not chunk:
                break
            os.write(out, chunk)
            done += len(chunk)
        if node is not None:
            os.fchmod(out, stat_mod.S_IMODE(node.mode) & 0o777 or 0o600)
    finally:
        os.close(out)
    return done, note


def _add_note(note: str, text: str) -> str:
    return (note + "; " if note else "") + text


def _write_lists(to: Path, report: Report) -> None:
    with open(to / "RECOVERED.txt", "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write("# saved by 'cachefs recover': destination, inode, bytes, note\n")
        for s in report.saved:
            f.write(f"{s.dest.relative_to(to)}\tinode {s.ino}\t{s.size}\t{s.note}\n")
        for text in report.missing:
            f.write(f"# not saved: {text}\n")
        for text in report.failed:
            f.write(f"# failed: {text}\n")
        if report.index != "read":
            f.write(f"# the index could not be read: {report.index}\n")
        for text in report.damage:
            f.write(f"# damaged: {text}\n")
    with open(to / "journal.txt", "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write("# changes that were waiting for the server (seq, kind, path, details)\n")
        for op in report.ops:
            extra = ""
            if op.kind in ("rename", "link"):
                extra = f" -> {os.fsdecode(op.dst)}"
            elif op.kind == "symlink":
                extra = f" -> {os.fsdecode(op.target)}"
            elif op.kind == "xattr":
                extra = f" {os.fsdecode(op.xattr)}"
            elif op.mode:
                extra = f" mode {op.mode:o}"
            f.write(f"{op.seq}\t{op.kind}\t{os.fsdecode(op.path)}{extra}\n")


def summary(report: Report, to: Path) -> list[str]:
    """The lines ``cachefs recover`` prints."""
    lines = []
    files = [s for s in report.saved if "files" in s.dest.relative_to(to).parts[:1]]
    by_ino = [s for s in report.saved if s not in files]
    if report.index != "read":
        lines.append(f"the index could not be read ({report.index}): every content file "
                     "is saved by inode number")
    for s in report.saved[:50]:
        lines.append(f"saved {s.dest.relative_to(to)} ({human_bytes(s.size)})" + (f": {s.note}" if s.note else ""))
    if len(report.saved) > 50:
        lines.append(f"... and {len(report.saved) - 50} more (see {to / 'RECOVERED.txt'})")
    lines.append(f"{len(files)} changed files saved under {to / 'files'}, {len(by_ino)} by inode "
                 f"number under {to / 'by-inode'} ({human_bytes(sum(s.size for s in report.saved))}); "
                 f"{report.skipped_clean} unchanged files left (the server has them)")
    if report.ops:
        lines.append(f"{len(report.ops)} changes were waiting for the server: see {to / 'journal.txt'}")
    if (to / "xattrs.dump").exists():
        lines.append(f"extended attributes of the share's files: {to / 'xattrs.dump'} "
                     "(setfattr --restore, from the share's folder)")
    for text in report.damage[:20]:
        lines.append(f"damaged: {text}")
    if len(report.damage) > 20:
        lines.append(f"... and {len(report.damage) - 20} more damaged records (see {to / 'RECOVERED.txt'})")
    for text in report.missing + report.failed:
        lines.append(f"not saved: {text}")
    return lines


def main_progress(text: str) -> None:
    end = "\r" if sys.stderr.isatty() else "\n"
    print(text, end=end, file=sys.stderr, flush=True)

