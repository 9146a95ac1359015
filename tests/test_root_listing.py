"""The mount root's listing: ``.cachefs`` reachable by name but not listed (unless
``--show-cachefs``), readdir's ``.`` and ``..``, and backups of the mount root.

Real mounts of the sshd fixture; real tar, rsync, cp and find, each bounded. A backup of
the mount root (``tar cf - -C MNT .``, ``rsync -a MNT/ copy/``, ``cp -a MNT/. copy/``) must
exit 0 and hold exactly the share, online and with the server stopped; the ``.cachefs``
files still answer by name (``cat``, ``cd``, ``echo > control``, ``cachefs status``).
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.fixtures.mount import status
from tests.test_cli import cachefs, ok
from tests.test_control import SERVER_STOPPED, command, wait_state

RUN_TIMEOUT = 60.0


def make_share(share: Path) -> None:
    """A small tree with what a backup must carry: files, an empty one, a subfolder, an
    empty folder, a symlink, a dotfile, modes."""
    (share / "docs" / "sub").mkdir(parents=True)
    (share / "empty-dir").mkdir()
    (share / "a.txt").write_bytes(b"alpha\n")
    (share / ".hidden").write_bytes(b"dotfile\n")
    (share / "empty").write_bytes(b"")
    (share / "docs" / "b.bin").write_bytes(os.urandom(300_000))
    (share / "docs" / "sub" / "c.txt").write_bytes(b"gamma\n" * 100)
    (share / "run.sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(share / "run.sh", 0o755)
    os.symlink("a.txt", share / "link")


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=RUN_TIMEOUT)


def succeeded(result: subprocess.CompletedProcess[bytes]) -> bytes:
    assert result.returncode == 0, (f"{' '.join(map(str, result.args))}: exit {result.returncode}\n"
                                    f"{result.stderr.decode(errors='replace')}")
    return result.stdout


def same_tree(left: Path, right: Path) -> None:
    """Same names, kinds, modes, file contents and symlink targets, all the way down."""
    def walk(top: Path) -> dict[str, tuple[int, bytes]]:
        found = {}
        for folder, dirs, files in os.walk(top):
            for name in dirs + files:
                path = Path(folder) / name
                st = path.lstat()
                data = (os.readlink(path).encode() if stat.S_ISLNK(st.st_mode)
                        else path.read_bytes() if stat.S_ISREG(st.st_mode) else b"")
                found[str(path.relative_to(top))] = (st.st_mode, data)
        return found
    ours, theirs = walk(left), walk(right)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert ours[name] == theirs[name], name


def tar_members(archive: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return sorted(member.name for member in tar.getmembers())


def backups_hold_the_share(mnt: Path, share: Path, work: Path) -> None:
    archive = succeeded(run("tar", "cf", "-", "-C", str(mnt), "."))
    assert tar_members(archive) == tar_members(succeeded(run("tar", "cf", "-", "-C", str(share), ".")))
    assert not any(".cachefs" in name for name in tar_members(archive))

    succeeded(run("rsync", "-a", f"{mnt}/", str(work / "rsync-copy")))
    same_tree(work / "rsync-copy", share)

    succeeded(run("cp", "-a", f"{mnt}/.", str(work / "cp-copy")))
    same_tree(work / "cp-copy", share)

    found = succeeded(run("find", str(mnt))).decode().splitlines()
    assert found and not any(".cachefs" in line for line in found), found
    assert len(found) == 1 + sum(len(d) + len(f) for _, d, f in os.walk(share))


def control_dir_answers_by_name(mnt: Path) -> None:
    dot = mnt / ".cachefs"
    assert dot.is_dir() and stat.S_ISDIR(os.lstat(dot).st_mode)
    assert json.loads((dot / "status").read_text())["mountpoint"] == str(mnt)
    assert json.loads(succeeded(run("cat", ".cachefs/status", cwd=mnt)))["pid"] > 0
    assert succeeded(run("ls", cwd=dot)).decode().split() == ["conflicts", "control", "status"]
    succeeded(run("sh", "-c", "echo sync > control", cwd=dot))
    assert json.loads(ok(cachefs("status", "--json", str(mnt))).stdout)["pending"] == 0
    ok(cachefs("conflicts", str(mnt)))


def dots_listed(folder: Path) -> list[str]:
    names = succeeded(run("ls", "-a1f", str(folder))).decode().splitlines()  # -f: as readdir gives them
    assert names[:2] == [".", ".."], names
    assert len(names) == len(set(names)), names
    return names[2:]


def test_backups_of_the_mount_root_see_only_the_share(mount_factory, share: Path, tmp_path: Path) -> None:
    make_share(share)
    with mount_factory() as mount:
        mnt = mount.mountpoint
        assert sorted(os.listdir(mnt)) == sorted(os.listdir(share))
        assert ".cachefs" not in [entry.name for entry in os.scandir(mnt)]
        assert sorted(dots_listed(mnt)) == sorted(os.listdir(share))
        assert sorted(dots_listed(mnt / "docs")) == ["b.bin", "sub"]
        backups_hold_the_share(mnt, share, tmp_path)
        control_dir_answers_by_name(mnt)


def test_backups_of_the_mount_root_with_the_server_stopped(mount_factory, sshd, share: Path,
                                                            tmp_path: Path) -> None:
    make_share(share)
    with mount_factory(allowed_errors=SERVER_STOPPED) as mount:
        mnt = mount.mountpoint
        command(mnt, "pin .")
        sshd.stop()
        os.listdir(mnt)  # (a request that finds the server gone)
        wait_state(mnt, "offline")
        assert sorted(dots_listed(mnt)) == sorted(os.listdir(share))
        backups_hold_the_share(mnt, share, tmp_path)
        dot = mnt / ".cachefs"
        assert json.loads((dot / "status").read_text())["state"] == "offline"
        assert sorted(os.listdir(dot)) == ["conflicts", "control", "status"]


# -- readdir's . and .. ----------------------------------------------------------------------

class Dirent(ctypes.Structure):  # glibc's struct dirent on 64-bit Linux
    _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64), ("d_reclen", ctypes.c_ushort),
                ("d_type", ctypes.c_ubyte), ("d_name", ctypes.c_char * 256)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.opendir.restype = ctypes.c_void_p
_libc.opendir.argtypes = [ctypes.c_char_p]
_libc.readdir.restype = ctypes.POINTER(Dirent)
_libc.readdir.argtypes = [ctypes.c_void_p]
_libc.telldir.restype = ctypes.c_long
_libc.telldir.argtypes = [ctypes.c_void_p]
_libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
_libc.closedir.argtypes = [ctypes.c_void_p]
DT_DIR = 4


def read_entries(handle: int, count: int | None = None) -> list[tuple[bytes, int, int]]:
    """(name, d_ino, d_type) of the next ``count`` entries (all when None)."""
    entries = []
    while count is None or len(entries) < count:
        ctypes.set_errno(0)
        entry = _libc.readdir(handle)
        if not entry:
            assert ctypes.get_errno() == 0, os.strerror(ctypes.get_errno())
            break
        entries.append((entry.contents.d_name, entry.contents.d_ino, entry.contents.d_type))
    return entries


def listing(folder: Path) -> list[tuple[bytes, int, int]]:
    handle = _libc.opendir(os.fsencode(folder))
    assert handle, os.strerror(ctypes.get_errno())
    try:
        return read_entries(handle)
    finally:
        _libc.closedir(handle)


def test_dot_and_dotdot_and_offsets(mount_factory, share: Path) -> None:
    (share / "big").mkdir()
    names = [f"file-{i:05d}-{'x' * (i % 40)}".encode() for i in range(3000)]
    for name in names:
        (share / "big" / os.fsdecode(name)).write_bytes(b"")
    (share / "big" / "sub").mkdir()
    with mount_factory("--show-cachefs") as mount:
        mnt = mount.mountpoint
        root_ino = os.stat(mnt).st_ino
        big_ino = os.stat(mnt / "big").st_ino
        by_name = {name: (ino, kind) for name, ino, kind in listing(mnt)}
        assert by_name[b"."] == (root_ino, DT_DIR) and by_name[b".."] == (root_ino, DT_DIR)
        assert by_name[b".cachefs"] == (os.stat(mnt / ".cachefs").st_ino, DT_DIR)
        dot = {name: (ino, kind) for name, ino, kind in listing(mnt / ".cachefs")}
        assert sorted(dot) == [b".", b"..", b"conflicts", b"control", b"status"]
        assert dot[b".."] == (root_ino, DT_DIR) and dot[b"."][0] == os.stat(mnt / ".cachefs").st_ino
        sub = {name: ino for name, ino, _ in listing(mnt / "big" / "sub")}
        assert sub == {b".": os.stat(mnt / "big" / "sub").st_ino, b"..": big_ino}

        # Offsets across many FUSE readdir replies, and seekdir back to one of them.
        handle = _libc.opendir(os.fsencode(mnt / "big"))
        assert handle
        try:
            first = read_entries(handle, 1234)
            mark = _libc.telldir(handle)
            rest = read_entries(handle)
            _libc.seekdir(handle, mark)
            again = read_entries(handle)
            _libc.seekdir(handle, 0)
            whole = read_entries(handle)
        finally:
            _libc.closedir(handle)
        got = [name for name, _, _ in first + rest]
        assert got[:2] == [b".", b".."]
        assert sorted(got[2:]) == sorted([*names, b"sub"]) and len(got) == len(set(got))
        assert again == rest and whole == first + rest
        assert sorted(os.listdir(mnt / "big")) == sorted(os.fsdecode(n) for n in [*names, b"sub"])


# -- .cachefs shown ------------------------------------------------------------------------

@pytest.mark.parametrize("option", [("--show-cachefs",), ("-o", "show_cachefs")])
def test_show_cachefs_lists_it_and_gives_true_sizes(mount_factory, share: Path, tmp_path: Path,
                                                    option: tuple[str, ...]) -> None:
    make_share(share)
    with mount_factory(*option) as mount:
        mnt = mount.mountpoint
        assert sorted(dots_listed(mnt)) == sorted([*os.listdir(share), ".cachefs"])
        assert [entry.name for entry in os.scandir(mnt)].count(".cachefs") == 1
        for name in ("status", "conflicts"):  # their size is their content's: tar copies it whole
            path = mnt / ".cachefs" / name
            assert os.stat(path).st_size == len(path.read_bytes()) > 0, name
        assert os.stat(mnt / ".cachefs" / "control").st_size == 0
        control_dir_answers_by_name(mnt)
        # What docs/usage.md tells for backups of a mount that shows it: leave it out.
        archive = succeeded(run("tar", "cf", "-", "--exclude=./.cachefs", "-C", str(mnt), "."))
        assert tar_members(archive) == tar_members(succeeded(run("tar", "cf", "-", "-C", str(share), ".")))
        succeeded(run("rsync", "-a", "--exclude=/.cachefs", f"{mnt}/", str(tmp_path / "copy")))
        same_tree(tmp_path / "copy", share)
        # Without the exclusion tar archives status with its content, and stops at control.
        whole = run("tar", "cf", "-", "-C", str(mnt), ".")
        assert b".cachefs/control: Cannot open: Permission denied" in whole.stderr
        with tarfile.open(fileobj=io.BytesIO(whole.stdout)) as tar:
            member = tar.extractfile("./.cachefs/status")
            assert member is not None and json.loads(member.read())["mountpoint"] == str(mnt)
        assert status(mnt)["state"] == "online"


def test_status_size_follows_its_content(mount_factory, share: Path) -> None:
    with mount_factory() as mount:
        mnt = mount.mountpoint
        path = mnt / ".cachefs" / "status"
        before = os.stat(path).st_size
        assert before == len(path.read_bytes())
        command(mnt, "pin .")  # "pinned": ["/"]: the content grows, and so does the size
        after = os.stat(path).st_size
        assert after == len(path.read_bytes()) > before
