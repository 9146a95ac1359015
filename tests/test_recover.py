"""A cache whose index is gone or damaged (issue 19, items 2 and 7), and ``cachefs recover``.

Real mounts of the real sshd make offline changes, are unmounted with the changes
pending, and a *copy* of the cache is damaged: the mount of the copy must be refused
with a message naming the cache and ``cachefs recover`` (the original still holds every
pending change), and ``cachefs recover`` must give back every changed file's content,
with its path when the index tells it, without changing the cache it reads.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import lmdb
import pytest

from tests.fixtures.mount import run_recover, status
from tests.test_faults import _refused
from tests.test_writes import go_offline, write_file

#: the changed files and their content after the offline changes below
CHANGED = {"a.txt": b"a, edited offline\n", "new.txt": b"new offline\n",
           "nd/new2.txt": b"new in a new folder\n", "big.bin": bytes(range(256)) * 4096}
KEY = "a cache key for the recover tests\n"


def tree_state(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root``: mode, size, mtime and content hash."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            st = os.lstat(p)
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else ""
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


def make_pending_changes(mount_factory, share: Path, *extra: str) -> Path:
    """A cache (tmp_path/cache) with 7 offline changes pending; returns its path."""
    (share / "a.txt").write_bytes(b"a\n")
    (share / "old.txt").write_bytes(b"old\n")
    (share / "gone.txt").write_bytes(b"gone\n")
    with mount_factory(*extra) as mount:
        mnt = mount.mountpoint
        assert (mnt / "a.txt").read_bytes() == b"a\n"
        go_offline(mnt)
        write_file(mnt / "a.txt", CHANGED["a.txt"])
        write_file(mnt / "new.txt", CHANGED["new.txt"])
        os.mkdir(mnt / "nd")
        write_file(mnt / "nd" / "new2.txt", CHANGED["nd/new2.txt"])
        write_file(mnt / "big.bin", CHANGED["big.bin"])
        os.rename(mnt / "old.txt", mnt / "renamed.txt")
        os.unlink(mnt / "gone.txt")
        assert status(mnt)["pending"] == 7
        cache_dir = mount.cache_dir
    return cache_dir


DAMAGE = {
    "data.mdb truncated to 0": lambda index: os.truncate(index / "data.mdb", 0),
    "data.mdb deleted": lambda index: os.unlink(index / "data.mdb"),
    "index/ deleted": lambda index: shutil.rmtree(index),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_cache_without_its_index_is_refused_and_recover_saves_every_change(
        mount_factory, share: Path, tmp_path: Path, damage: str) -> None:
    cache_dir = make_pending_changes(mount_factory, share)
    copy = tmp_path / "damaged"
    shutil.copytree(cache_dir, copy)
    DAMAGE[damage](copy / "index")
    before = tree_state(copy)

    text = _refused(mount_factory(cache="damaged", name="mnt2", check_log=False))
    assert str(copy) in text and "cachefs recover" in text and "index" in text, text[-2000:]
    assert tree_state(copy) == before  # the refused mount changed nothing

    # The original still holds every pending change, which a mount then sends.
    with mount_factory(name="mnt3") as mount:
        assert status(mount.mountpoint)["pending"] == 7

    out = tmp_path / "out"
    result = run_recover(str(copy), "--to", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert tree_state(copy) == before  # recover changed nothing
    # No index: every content file goes out by inode number; each changed file's content
    # is among them.
    saved = {p.read_bytes() for p in (out / "by-inode").iterdir()}
    assert set(CHANGED.values()) <= saved, sorted(len(s) for s in saved)
    assert str(out / "by-inode") in result.stdout


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_recover_saves_changed_files_under_their_paths(mount_factory, share: Path, tmp_path: Path,
                                                       encrypted: bool) -> None:
    extra = ()
    if encrypted:
        (tmp_path / "key").write_text(KEY)
        extra = ("--cache-key-file", str(tmp_path / "key"))
    cache_dir = make_pending_changes(mount_factory, share, *extra)
    before = tree_state(cache_dir)
    out = tmp_path / "out"
    result = run_recover(str(cache_dir), "--to", str(out), *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    assert tree_state(cache_dir) == before  # recover changed nothing
    files = {str(p.relative_to(out / "files")): p.read_bytes()
             for p in (out / "files").rglob("*") if p.is_file()}
    assert files == CHANGED
    assert not (out / "by-inode").exists()
    journal = (out / "journal.txt").read_text()
    assert "rename\told.txt -> renamed.txt" in journal and "unlink\tgone.txt" in journal, journal
    assert "4 changed files saved" in result.stdout, result.stdout
    if encrypted:  # without the key: a clear refusal
        result = run_recover(str(cache_dir), "--to", str(tmp_path / "out2"))
        assert result.returncode == 1 and "encrypted" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_recover_tolerates_damaged_records(mount_factory, share: Path, tmp_path: Path) -> None:
    """A changed file whose node record is damaged goes out by inode number (whether it
    changed is unknown), the others under their paths; the damage is reported."""
    cache_dir = make_pending_changes(mount_factory, share)
    env = lmdb.open(str(cache_dir / "index"), max_dbs=12)
    with env.begin(write=True) as txn:
        nodes = env.open_db(b"nodes", txn=txn)
        entries = env.open_db(b"entries", txn=txn)
        root = (1).to_bytes(8, "big")
        ino = next(bytes(v[:8]) for k, v in txn.cursor(db=entries) if bytes(k) == root + b"new.txt")
        value = bytearray(txn.get(ino, db=nodes))
        value[10] ^= 0x04
        txn.put(ino, bytes(value), db=nodes)
    env.close()
    text = _refused(mount_factory(name="mnt2", check_log=False))
    assert "node" in text and "cachefs recover" in text, text[-2000:]
    out = tmp_path / "out"
    result = run_recover(str(cache_dir), "--to", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    files = {str(p.relative_to(out / "files")): p.read_bytes()
             for p in (out / "files").rglob("*") if p.is_file()}
    assert files == {k: v for k, v in CHANGED.items() if k != "new.txt"}
    assert (out / "by-inode" / str(int.from_bytes(ino, "big"))).read_bytes() == CHANGED["new.txt"]
    assert "damaged" in result.stdout and "checksum" in result.stdout, result.stdout


def test_recover_refuses_a_cache_in_use_and_a_folder_with_files(mount_factory, share: Path,
                                                               tmp_path: Path) -> None:
    with mount_factory() as mount:
        os.listdir(mount.mountpoint)
        result = run_recover(str(mount.cache_dir), "--to", str(tmp_path / "out"))
        assert result.returncode == 1 and "in use" in result.stderr, result.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    result = run_recover(str(tmp_path / "cache"), "--to", str(tmp_path / "full"))
    assert result.returncode == 1 and "not an empty folder" in result.stderr, result.stderr
    assert (tmp_path / "full" / "x").read_text() == "x"


def test_recover_saves_extended_attributes(mount_factory, share: Path, tmp_path: Path) -> None:
    """Over SFTP the cache holds the only copy of a file's attributes: a changed file's
    copy gets its own, and xattrs.dump holds those of every file and folder, for
    setfattr --restore (recover saved none)."""
    (share / "clean.txt").write_bytes(b"clean\n")
    (share / "d").mkdir()
    with mount_factory() as mount:
        mnt = mount.mountpoint
        os.setxattr(mnt / "clean.txt", "user.c", b"clean's")
        os.setxattr(mnt / "d", "user.dir", b"\x00\xffbinary")
        go_offline(mnt)
        write_file(mnt / "changed.txt", b"changed\n")
        os.setxattr(mnt / "changed.txt", "user.a", b"1")
        os.setxattr(mnt / "changed.txt", "user.b", "été".encode())
        cache_dir = mount.cache_dir
    out = tmp_path / "out"
    result = run_recover(str(cache_dir), "--to", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    saved = out / "files" / "changed.txt"
    assert saved.read_bytes() == b"changed\n"
    assert {n: os.getxattr(saved, n) for n in os.listxattr(saved)} == {"user.a": b"1", "user.b": "été".encode()}
    assert "xattrs.dump" in result.stdout
    restored = tmp_path / "restored"
    shutil.copytree(share, restored)
    (restored / "changed.txt").write_bytes(b"")
    subprocess.run(["setfattr", f"--restore={out / 'xattrs.dump'}"], cwd=restored, check=True, timeout=30)
    assert os.getxattr(restored / "clean.txt", "user.c") == b"clean's"
    assert os.getxattr(restored / "d", "user.dir") == b"\x00\xffbinary"
    assert os.getxattr(restored / "changed.txt", "user.b") == "été".encode()
