"""The write side end to end: real sshd, real mounts (``mount.py --foreground``).

Each change made in the mount is also made to a plain local folder (the model); after
``sync`` the server's tree must equal the model. Going offline is done both by the
control file (``offline``) and by stopping the sshd. Every wait is bounded.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import itertools
import os
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fixtures.mount import _run_with_timeout, status
from tests.fixtures.proxy import TcpProxy, proxied

CONTROL_TIMEOUT = 60.0
A_NS = 1_500_000_000_123_456_789
M_NS = 1_600_000_000_987_654_321


# -- helpers (also used by test_conflicts, test_any_backend) -----------------------------

def control(mnt: Path, command: str, timeout: float = CONTROL_TIMEOUT) -> None:
    """One command to ``.cachefs/control``; raises OSError as the write does."""
    path = Path(mnt) / ".cachefs" / "control"

    def write() -> None:
        with open(path, "w") as f:
            f.write(command + "\n")

    _run_with_timeout(write, timeout, f"control {command}")


def go_offline(mnt: Path) -> None:
    """Work offline on purpose, after listing the root: a folder never listed cannot be
    changed offline (the mount cannot tell which names exist there; EHOSTDOWN)."""
    os.listdir(mnt)
    control(mnt, "offline")


def sync(mnt: Path) -> None:
    control(mnt, "sync")


def sync_until_done(mnt: Path, deadline_s: float = 30.0) -> None:
    """``sync`` until it succeeds (the mount may still be coming back online)."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            sync(mnt)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll until ``predicate()``; seconds taken. AssertionError after ``timeout``."""
    start = time.monotonic()
    while True:
        try:
            if predicate():
                return time.monotonic() - start
        except OSError:
            pass
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_state(mnt: Path, state: str, timeout: float = 15.0) -> None:
    wait_for(lambda: status(mnt)["state"] == state, timeout, f"state {state}")


def snapshot(root: Path, skip_control: bool = True) -> dict[str, tuple]:
    """Everything a user can see of a tree: kinds, modes, sizes, contents, link targets."""
    result: dict[str, tuple] = {}

    def walk(folder: Path, rel: str) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            name = rel + entry.name
            if skip_control and name == ".cachefs":
                continue
            st_ = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st_.st_mode):
                result[name] = ("link", os.readlink(entry.path))
            elif stat.S_ISDIR(st_.st_mode):
                result[name] = ("dir", oct(stat.S_IMODE(st_.st_mode)))
                walk(Path(entry.path), name + "/")
            else:
                with open(entry.path, "rb") as f:
                    data = f.read()
                content = data if len(data) <= 4096 else hashlib.sha256(data).hexdigest()
                result[name] = ("file", oct(stat.S_IMODE(st_.st_mode)), len(data), content)

    walk(Path(root), "")
    return result


def tree_problems(actual: Path, model: Path, what: str = "tree") -> list[str]:
    got, want = snapshot(actual), snapshot(model)
    names_got = sorted(listing_names(actual))
    names_want = sorted(listing_names(model))
    problems = []
    if names_got != names_want:
        problems.append(f"{what}: listings differ from the model: got {names_got}, want {names_want}")
    if got != want:
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        differ = {k: (got[k], want[k]) for k in sorted(set(got) & set(want)) if got[k] != want[k]}
        problems.append(f"{what} differs from the model: missing {missing}, extra {extra}, "
                        f"different (got, want) {differ}")
    return problems


def listing_names(root: Path) -> list[str]:
    """Every name as readdir gives it (duplicates kept)."""
    out = []
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        if rel == ".":
            dirs[:] = [d for d in dirs if d != ".cachefs"]
        out += [os.path.normpath(os.path.join(rel, n)) for n in dirs + files]
    return out


def assert_same_tree(actual: Path, model: Path, what: str = "tree") -> None:
    problems = tree_problems(actual, model, what)
    assert not problems, "\n".join(problems)


def read_all(root: Path) -> None:
    """Read every file of the mount (online) so that all of it is in the cache."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".cachefs"]
        for name in files:
            p = os.path.join(folder, name)
            if not os.path.islink(p):
                with open(p, "rb") as f:
                    f.read()


_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1


def rename_noreplace(src: Path, dst: Path) -> None:
    assert hasattr(_libc, "renameat2"), "libc has no renameat2 (glibc >= 2.28 has it)"
    if _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(src))


def errno_of(action: Callable[[], object]) -> int:
    try:
        action()
    except OSError as exc:
        return exc.errno
    return 0


def write_file(path: Path, data: bytes, fsync: bool = False) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def no_temp_leftovers(root: Path) -> list[str]:
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in files + dirs
            if ".cachefs-tmp-" in n]


# -- each operation offline, then sync ----------------------------------------------------

def _prepare_share(share: Path) -> None:
    (share / "keep.txt").write_bytes(b"keep me\n")
    (share / "edit.txt").write_bytes(b"0123456789")
    (share / "append.txt").write_bytes(b"start")
    (share / "grow.txt").write_bytes(b"abc")
    (share / "shrink.txt").write_bytes(b"abcdefghij" * 10)
    (share / "mode.txt").write_bytes(b"m")
    (share / "times.txt").write_bytes(b"t")
    (share / "gone.txt").write_bytes(b"bye")
    (share / "old.txt").write_bytes(b"old name")
    (share / "over_src.txt").write_bytes(b"source")
    (share / "over_dst.txt").write_bytes(b"destination to be replaced")
    (share / "emptydir").mkdir()
    (share / "tree" / "sub").mkdir(parents=True)
    (share / "tree" / "top.txt").write_bytes(b"top")
    (share / "tree" / "sub" / "deep.txt").write_bytes(b"deep")
    (share / "linksrc.txt").write_bytes(b"linked")
    (share / "nr_src.txt").write_bytes(b"noreplace")
    (share / "nr_taken.txt").write_bytes(b"taken")


def _apply_offline_ops(root: Path) -> None:
    write_file(root / "new.txt", b"brand new\n" * 3)
    os.chmod(root / "new.txt", 0o640)
    os.mkdir(root / "newdir")
    write_file(root / "newdir" / "inner.txt", b"inner")
    with open(root / "edit.txt", "r+b") as f:
        f.seek(3)
        f.write(b"XYZ")
    with open(root / "append.txt", "ab") as f:
        f.write(b"+more")
    os.truncate(root / "grow.txt", 1000)
    os.truncate(root / "shrink.txt", 7)
    os.chmod(root / "mode.txt", 0o600)
    os.utime(root / "times.txt", ns=(A_NS, M_NS))
    write_file(root / "new_times.txt", b"with times")
    os.utime(root / "new_times.txt", ns=(A_NS, M_NS + 10**9))
    os.rmdir(root / "emptydir")
    os.unlink(root / "gone.txt")
    os.rename(root / "old.txt", root / "renamed.txt")
    os.rename(root / "over_src.txt", root / "over_dst.txt")
    os.rename(root / "tree", root / "moved_tree")
    rename_noreplace(root / "nr_src.txt", root / "nr_new.txt")
    with pytest.raises(OSError) as info:
        rename_noreplace(root / "nr_new.txt", root / "nr_taken.txt")
    assert info.value.errno == errno.EEXIST
    os.symlink("moved_tree/top.txt", root / "sym")
    os.link(root / "linksrc.txt", root / "hard.txt")


def test_each_operation_offline_then_sync(mount_factory, share: Path, tmp_path: Path) -> None:
    _prepare_share(share)
    model = tmp_path / "model"
    shutil.copytree(share, model, symlinks=True)
    with mount_factory() as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        go_offline(mnt)
        assert status(mnt)["state"] == "offline"
        _apply_offline_ops(mnt)
        _apply_offline_ops(model)
        problems = []  # gathered, so that one difference does not hide the others
        problems += tree_problems(mnt, model, "the mount (offline)")
        assert status(mnt)["pending"] > 0
        assert (share / "old.txt").exists() and not (share / "new.txt").exists()  # untouched
        control(mnt, "online")
        sync(mnt)
        st_ = status(mnt)
        assert st_["pending"] == 0 and st_["conflicts"] == 0, st_
        problems += tree_problems(share, model, "the server")
        problems += tree_problems(mnt, model, "the mount (after sync)")
        for name in ("times.txt", "new_times.txt"):
            if os.stat(share / name).st_mtime_ns // 10**9 != os.stat(model / name).st_mtime_ns // 10**9:
                problems.append(f"server mtime of {name}: {os.stat(share / name).st_mtime}")
        if os.stat(share / "hard.txt").st_ino != os.stat(share / "linksrc.txt").st_ino:
            problems.append("hard.txt and linksrc.txt are not one file on the server")
        if no_temp_leftovers(share):
            problems.append(f"leftovers {no_temp_leftovers(share)}")
        assert not problems, "\n".join(problems)


def test_hard_linked_file_written_after_its_link_reached_the_server(mount_factory, share: Path) -> None:
    """An upload replaces the remote file under one name (a new file renamed over it):
    the file's other names on the server must follow, as they do here."""
    with mount_factory() as mount:
        mnt = mount.mountpoint
        write_file(mnt / "a.txt", b"first version")
        os.link(mnt / "a.txt", mnt / "b.txt")
        sync(mnt)
        assert os.stat(share / "a.txt").st_ino == os.stat(share / "b.txt").st_ino
        for name, data in (("b.txt", b"written through b"), ("a.txt", b"then through a, longer")):
            write_file(mnt / name, data)
            sync(mnt)
            assert (mnt / "a.txt").read_bytes() == (mnt / "b.txt").read_bytes() == data
            assert (share / "a.txt").read_bytes() == data
            assert (share / "b.txt").read_bytes() == data, "the other name kept the old version"
            assert os.stat(share / "a.txt").st_ino == os.stat(share / "b.txt").st_ino
        assert no_temp_leftovers(share) == []
        assert status(mnt)["conflicts"] == 0


def test_relink_over_a_temporary_name_left_by_an_interrupted_pass(mount_factory, share: Path) -> None:
    """Relinking the other name goes through a temporary name beside it; one left there
    by a pass that was cut off (SFTP v3 reports the clash as a plain failure) is removed
    and the link made again."""
    with mount_factory() as mount:
        mnt = mount.mountpoint
        write_file(mnt / "a.txt", b"first version")
        os.link(mnt / "a.txt", mnt / "b.txt")
        sync(mnt)
        client = status(mnt)["client"]  # (temporary names carry it)
        for seq in range(1, 200):  # whatever the entry's number and name turn out to be
            for name in ("a.txt", "b.txt"):
                (share / f".{name}.cachefs-tmp-{seq}-{client}").write_bytes(b"left over")
        write_file(mnt / "b.txt", b"written through b")
        sync(mnt)
        assert (share / "a.txt").read_bytes() == (share / "b.txt").read_bytes() == b"written through b"
        assert os.stat(share / "a.txt").st_ino == os.stat(share / "b.txt").st_ino
        assert status(mnt)["conflicts"] == 0


def test_hard_link_made_offline_lists_under_both_names_after_sync(mount_factory, share: Path) -> None:
    """The listing fetched after the replay maps both remote names to one node: each
    entry keeps its own name (they shared one record, and both showed the last name)."""
    with mount_factory() as mount:
        mnt = mount.mountpoint
        (mnt / "sub").mkdir()
        go_offline(mnt)
        write_file(mnt / "sub" / "a", b"one file")
        os.link(mnt / "sub" / "a", mnt / "sub" / "b")
        control(mnt, "online")
        sync(mnt)
        assert sorted(os.listdir(share / "sub")) == ["a", "b"]
        assert sorted(os.listdir(mnt / "sub")) == ["a", "b"]
        assert (mnt / "sub" / "a").read_bytes() == (mnt / "sub" / "b").read_bytes() == b"one file"


def test_hard_link_whose_other_name_changed_on_the_server_is_left_alone(mount_factory, share: Path) -> None:
    with mount_factory() as mount:
        mnt = mount.mountpoint
        write_file(mnt / "a.txt", b"first version")
        os.link(mnt / "a.txt", mnt / "b.txt")
        sync(mnt)
        os.unlink(share / "b.txt")
        (share / "b.txt").write_bytes(b"someone else's b")  # a new file under that name
        write_file(mnt / "a.txt", b"ours")
        sync(mnt)
        assert (share / "a.txt").read_bytes() == b"ours"
        assert (share / "b.txt").read_bytes() == b"someone else's b"


# -- write-back while online ----------------------------------------------------------------

def test_write_back_online_within_two_seconds(mount_factory, share: Path) -> None:
    with mount_factory() as mount:
        mnt = mount.mountpoint
        data = b"written online\n" * 100
        write_file(mnt / "wb.txt", data)
        taken = wait_for(lambda: (share / "wb.txt").read_bytes() == data, 5.0,
                         "the written file on the server")
        assert taken < 2.5, f"write-back took {taken:.2f} s"
        wait_for(lambda: status(mnt)["pending"] == 0, 5.0, "an empty journal")
        assert no_temp_leftovers(share) == []


def test_write_back_during_a_burst_of_changes(mount_factory, share: Path) -> None:
    """Write-back waits for a burst to settle, but not for ever: while files keep coming
    (one every 50 ms for 5 s), the first ones reach the server after ``--write-back-hold``
    (1.5 s here; default 5), before the burst ends."""
    with mount_factory("--write-back-hold", "1.5") as mount:
        mnt = mount.mountpoint
        (mnt / "burst").mkdir()
        start = time.monotonic()
        first_seen = None
        i = 0
        while time.monotonic() - start < 5.0:
            write_file(mnt / "burst" / f"f{i:04d}", b"x" * 100)
            i += 1
            if first_seen is None and (share / "burst" / "f0000").exists():
                first_seen = time.monotonic() - start
            time.sleep(0.05)
        assert first_seen is not None, f"no file on the server during a 5 s burst of {i} creates"
        assert 1.0 < first_seen < 4.0, f"the first file reached the server {first_seen:.1f} s into the burst"
        wait_for(lambda: len(list((share / "burst").iterdir())) == i, 10.0, f"all {i} files on the server")


# -- POSIX errors ----------------------------------------------------------------------------

def _error_cases(root: Path) -> dict[str, Callable[[], object]]:
    return {
        "O_EXCL existing": lambda: os.close(os.open(root / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY)),
        "mkdir existing dir": lambda: os.mkdir(root / "d"),
        "mkdir existing file": lambda: os.mkdir(root / "f"),
        "open missing": lambda: open(root / "missing", "rb"),
        "unlink missing": lambda: os.unlink(root / "missing"),
        "rmdir missing": lambda: os.rmdir(root / "missing"),
        "rename missing": lambda: os.rename(root / "missing", root / "x"),
        "create in missing dir": lambda: open(root / "nodir" / "x", "wb"),
        "open under file": lambda: open(root / "f" / "x", "rb"),
        "create under file": lambda: open(root / "f" / "x", "wb"),
        "mkdir under file": lambda: os.mkdir(root / "f" / "x"),
        "rmdir file": lambda: os.rmdir(root / "f"),
        "open dir for write": lambda: os.open(root / "d", os.O_WRONLY),
        "unlink dir": lambda: os.unlink(root / "d"),
        "rename file over dir": lambda: os.rename(root / "f", root / "d"),
        "rename dir over file": lambda: os.rename(root / "d", root / "f"),
        "rmdir non-empty": lambda: os.rmdir(root / "full"),
        "rename dir over non-empty dir": lambda: os.rename(root / "d", root / "full"),
        "rename dir into itself": lambda: os.rename(root / "full", root / "full" / "sub" / "x"),
        "rename dir onto own child": lambda: os.rename(root / "full", root / "full" / "sub"),
        "truncate dir": lambda: os.truncate(root / "d", 0),
    }


@pytest.mark.parametrize("offline", [True, False], ids=["offline", "online"])
def test_posix_errors_match_a_local_filesystem(mount_factory, share: Path, tmp_path: Path,
                                               offline: bool) -> None:
    for root in (share, tmp_path / "model"):
        root.mkdir(exist_ok=True)
        (root / "f").write_bytes(b"file")
        (root / "d").mkdir()
        (root / "full" / "sub").mkdir(parents=True)
        (root / "full" / "x.txt").write_bytes(b"x")
    model = tmp_path / "model"
    with mount_factory() as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        if offline:
            go_offline(mnt)
        want = {name: errno_of(case) for name, case in _error_cases(model).items()}
        got = {name: errno_of(case) for name, case in _error_cases(mnt).items()}
        assert all(want.values()), want  # every case is an error on ext4
        diff = {k: (errno.errorcode.get(got[k]), errno.errorcode.get(want[k]))
                for k in want if got[k] != want[k]}
        assert not diff, f"(mount, local) errno differ: {diff}"
        assert status(mnt)["pending"] == 0  # no failed call left anything in the journal
        assert_same_tree(mnt, model, "the mount")
        if offline:
            control(mnt, "online")
        sync(mnt)
        assert_same_tree(share, model, "the server")


# -- unlink of an open file ----------------------------------------------------------------

def test_unlink_open_file_offline(mount_factory, share: Path) -> None:
    with mount_factory() as mount:
        mnt = mount.mountpoint
        go_offline(mnt)
        with open(mnt / "open.txt", "w+b") as f:
            f.write(b"hello")
            f.flush()
            os.unlink(mnt / "open.txt")
            assert "open.txt" not in os.listdir(mnt)
            f.seek(0)
            assert f.read() == b"hello"
            f.write(b" world")
            f.flush()
            f.seek(0)
            assert f.read() == b"hello world"
            assert os.fstat(f.fileno()).st_size == 11
        assert "open.txt" not in os.listdir(mnt)
        control(mnt, "online")
        sync(mnt)
        assert not (share / "open.txt").exists()
        assert sorted(os.listdir(share)) == []
        assert status(mnt)["pending"] == 0


def test_unlink_open_file_online(mount_factory, share: Path) -> None:
    (share / "served.txt").write_bytes(b"from the server")
    with mount_factory() as mount:
        mnt = mount.mountpoint
        with open(mnt / "served.txt", "r+b") as f:
            assert f.read() == b"from the server"
            content = mount.cache_dir / "data" / str(os.fstat(f.fileno()).st_ino)
            assert content.exists()
            os.unlink(mnt / "served.txt")
            sync(mnt)
            assert not (share / "served.txt").exists()
            f.seek(0)
            assert f.read() == b"from the server"
            f.write(b"!")
            f.flush()
            f.seek(0)
            assert f.read() == b"from the server!"
            assert content.exists()  # until the last close
        sync(mnt)
        assert sorted(os.listdir(share)) == []
        assert "served.txt" not in os.listdir(mnt)
        assert not content.exists()  # gone at the last close


# -- crashes -------------------------------------------------------------------------------


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_kill9_with_files_open_for_writing(mount_factory, share: Path, tmp_path: Path,
                                           encrypted: bool) -> None:
    """Between a file's first write and the checkpoint after its last close, its size and
    times live in memory (``Held``); a kill -9 then must lose no byte that a write had
    returned: the next mount takes each such file's length from its content file (for an
    encrypted cache, from the last sealed block), and a truncation is not undone."""
    (share / "existing.txt").write_bytes(b"old content")
    extra: tuple[str, ...] = ()
    if encrypted:
        key = tmp_path / "cache.key"
        key.write_bytes(os.urandom(32))
        os.chmod(key, 0o600)
        extra = ("--encrypt-cache", "--cache-key-file", str(key))
    model = {"existing.txt": b"old content"}
    mount = mount_factory(*extra, check_log=False)
    mount.start()
    mnt = mount.mountpoint
    assert (mnt / "existing.txt").read_bytes() == b"old content"
    control(mnt, "offline")
    opened = []

    def keep_open(name: str, flags: int) -> int:
        fd = os.open(mnt / name, flags, 0o644)
        opened.append(fd)
        return fd

    # a new file written in three pieces, one past a 64 KiB block, one back in the middle
    fd = keep_open("open.bin", os.O_CREAT | os.O_WRONLY)
    first, second = os.urandom(5000), os.urandom(70_000)
    os.write(fd, first)
    os.write(fd, second)
    os.pwrite(fd, b"MID", 100)
    model["open.bin"] = first[:100] + b"MID" + first[103:] + second
    # a file closed just before the kill (its size not yet in the index)
    closed = os.urandom(3000)
    write_file(mnt / "closed.bin", closed)
    model["closed.bin"] = closed
    # cut shorter while open, then written again: the cut must hold
    fd = keep_open("cut.bin", os.O_CREAT | os.O_RDWR)
    os.write(fd, os.urandom(10_000))
    head = os.pread(fd, 2000, 0)
    os.ftruncate(fd, 2000)
    os.pwrite(fd, b"tail", 2000)
    model["cut.bin"] = head + b"tail"
    # a cached file of the server's, appended to
    fd = keep_open("existing.txt", os.O_WRONLY | os.O_APPEND)
    os.write(fd, b" + more")
    model["existing.txt"] += b" + more"
    mount.kill9()
    for fd in opened:
        try:
            os.close(fd)
        except OSError:
            pass  # (the connection is gone)
    assert "Traceback" not in mount.log_text()
    with mount_factory(*extra, name="mnt2", allowed_errors=()) as again:
        for name, data in model.items():
            got = (again.mountpoint / name).read_bytes()
            assert got == data, f"{name}: {len(got)} bytes after the kill, {len(data)} written"
        control(again.mountpoint, "online")
        sync_until_done(again.mountpoint)
        assert status(again.mountpoint)["pending"] == 0
        for name, data in model.items():
            assert (share / name).read_bytes() == data, f"{name} on the server"


def _upload_under_way(mnt: Path, share: Path, name: str, data: bytes) -> None:
    """Write ``name`` offline, go online, and return once its upload has begun (the
    temporary file on the server grows)."""
    go_offline(mnt)
    write_file(mnt / name, data)
    control(mnt, "online")
    wait_for(lambda: any(".cachefs-tmp-" in n and (share / n).stat().st_size > 0
                         for n in os.listdir(share)), 15, "the upload to start", interval=0.005)


def partial_sizes(share: Path, sizes: dict[str, int], seconds: float) -> list[tuple[str, int]]:
    """For ``seconds``, every 20 ms: the files of ``sizes`` (name -> whole size) seen on the
    server under their names at another size (half written), as (name, size)."""
    seen: list[tuple[str, int]] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for name, whole in sizes.items():
            try:
                got = (share / name).stat().st_size
            except FileNotFoundError:
                continue
            if got != whole:
                seen.append((name, got))
        time.sleep(0.02)
    return seen


def test_stalled_connection_during_large_upload(mount_factory, sshd, share: Path,
                                                tmp_path: Path) -> None:
    size = 50 << 20
    data = os.urandom(1 << 20) * 50
    digest = hashlib.sha256(data).hexdigest()
    with TcpProxy(sshd.host, sshd.port) as proxy:
        with proxied(mount_factory, sshd, proxy, tmp_path, check_log=False) as mount:
            mnt = mount.mountpoint
            _upload_under_way(mnt, share, "big.bin", data)
            proxy.stall()
            try:
                seen_partial = partial_sizes(share, {"big.bin": size}, 4)
                assert not seen_partial, f"big.bin seen with partial sizes {seen_partial[:5]}"
                if (share / "big.bin").exists():
                    assert hashlib.sha256((share / "big.bin").read_bytes()).hexdigest() == digest
            finally:
                proxy.resume()
            sync_until_done(mnt, 60)
            assert (share / "big.bin").stat().st_size == size
            assert hashlib.sha256((share / "big.bin").read_bytes()).hexdigest() == digest
            assert status(mnt)["pending"] == 0
            assert no_temp_leftovers(share) == [], "temporary upload files left on the server"


def test_times_set_while_the_upload_is_under_way_reach_the_server(mount_factory, sshd, share: Path,
                                                                   tmp_path: Path) -> None:
    """A file's new times, set while its upload is on the way (the upload sends the times
    it read when it began), reach the server: tar, rsync and ``cp -p`` set them after the
    content. Before, the upload's end marked the file clean and the new times stayed here."""
    data = os.urandom(1 << 20) * 8
    with TcpProxy(sshd.host, sshd.port) as proxy:
        with proxied(mount_factory, sshd, proxy, tmp_path, check_log=False) as mount:
            mnt = mount.mountpoint
            _upload_under_way(mnt, share, "dated.bin", data)
            proxy.stall()
            try:
                os.utime(mnt / "dated.bin", ns=(1_500_000_000 * 10**9, 1_500_000_000 * 10**9))
            finally:
                proxy.resume()
            sync_until_done(mnt, 60)
            assert (share / "dated.bin").read_bytes() == data
            assert int((share / "dated.bin").stat().st_mtime) == 1_500_000_000
            assert int((mnt / "dated.bin").stat().st_mtime) == 1_500_000_000
            assert status(mnt)["pending"] == 0


# -- property test: random offline sequences replay to the model ---------------------------

NAMES = ["a", "b", "c.txt"]
DIRS = ["d", "e"]
PATHS = [*NAMES, *DIRS, *(f"{d}/{n}" for d in DIRS for n in NAMES + DIRS)]

step = st.one_of(
    st.tuples(st.just("create"), st.sampled_from(PATHS), st.binary(max_size=300)),
    st.tuples(st.just("write"), st.sampled_from(PATHS), st.integers(0, 400), st.binary(min_size=1, max_size=100)),
    st.tuples(st.just("append"), st.sampled_from(PATHS), st.binary(min_size=1, max_size=100)),
    st.tuples(st.just("truncate"), st.sampled_from(PATHS), st.integers(0, 500)),
    st.tuples(st.just("mkdir"), st.sampled_from(PATHS)),
    st.tuples(st.just("unlink"), st.sampled_from(PATHS)),
    st.tuples(st.just("rmdir"), st.sampled_from(PATHS)),
    st.tuples(st.just("rename"), st.sampled_from(PATHS), st.sampled_from(PATHS)),
    st.tuples(st.just("chmod"), st.sampled_from(PATHS), st.sampled_from([0o600, 0o644, 0o755])),
    st.tuples(st.just("link"), st.sampled_from(PATHS), st.sampled_from(PATHS)),
    # how git and other careful writers put a file in place: write a temporary name,
    # link it to the final one, unlink the temporary one (the journal folds the three)
    st.tuples(st.just("place"), st.sampled_from(PATHS), st.binary(max_size=300)),
    # online for a moment, until what is pending so far is replayed: later steps build on
    # a server that has some of the story (a link replayed before a write, ...)
    st.just(("sync",)),
)


def _apply_step(root: Path, s: tuple) -> int:
    kind, path = s[0], root / s[1]

    def run() -> None:
        if kind == "create":
            write_file(path, s[2])
        elif kind == "write":
            with open(path, "r+b") as f:
                f.seek(s[2])
                f.write(s[3])
        elif kind == "append":
            with open(path, "ab") as f:
                f.write(s[2])
        elif kind == "truncate":
            os.truncate(path, s[2])
        elif kind == "mkdir":
            os.mkdir(path, 0o755)
        elif kind == "unlink":
            os.unlink(path)
        elif kind == "rmdir":
            os.rmdir(path)
        elif kind == "rename":
            os.rename(path, root / s[2])
        elif kind == "chmod":
            os.chmod(path, s[2])
        elif kind == "link":
            os.link(path, root / s[2])
        elif kind == "place":
            temp = path.parent / ".tmp_obj"
            write_file(temp, s[2])
            os.link(temp, path)
            os.unlink(temp)

    return errno_of(run)


def test_random_offline_sequences_replay_to_model(mount_factory, share: Path, tmp_path: Path) -> None:
    counter = itertools.count()
    with mount_factory() as mount:
        mnt = mount.mountpoint

        @settings(max_examples=100, deadline=None, database=None, derandomize=False,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(steps=st.lists(step, min_size=5, max_size=25))
        def check(steps: list[tuple]) -> None:
            sub = f"ex{next(counter)}"
            model = tmp_path / "models" / sub
            model.mkdir(parents=True)
            go_offline(mnt)
            os.mkdir(mnt / sub)
            for s in steps:
                if s[0] == "sync":
                    control(mnt, "online")
                    sync(mnt)
                    go_offline(mnt)
                    continue
                want = _apply_step(model, s)
                got = _apply_step(mnt / sub, s)
                assert got == want, f"{s[:2]}: mount {errno.errorcode.get(got)}, " \
                                    f"local {errno.errorcode.get(want)}"
            assert_same_tree(mnt / sub, model, "the mount (offline)")
            control(mnt, "online")
            sync(mnt)
            assert_same_tree(share / sub, model, "the server")
            assert_same_tree(mnt / sub, model, "the mount (after sync)")

        check()
        assert next(counter) >= 80, "hypothesis ran too few examples"
        assert status(mnt)["conflicts"] == 0
        assert no_temp_leftovers(share) == []


def test_listings_show_current_sizes_after_changes_here_and_there(mount_factory, share: Path) -> None:
    """Folder listings are kept between walks while nothing changed: a change made here
    (a write, a create) or on the server must show in the next walk's sizes and names."""
    (share / "d").mkdir()
    for i in range(5):
        (share / "d" / f"f{i}").write_bytes(b"x" * 10)

    def sizes(folder: Path) -> dict[str, int]:
        with os.scandir(folder) as it:
            return {e.name: e.stat(follow_symlinks=False).st_size for e in it}

    with mount_factory() as mount:
        d = mount.mountpoint / "d"
        assert sizes(d) == {f"f{i}": 10 for i in range(5)}
        assert sizes(d) == {f"f{i}": 10 for i in range(5)}  # the kept listing
        with open(d / "f1", "ab") as f:  # here
            f.write(b"y" * 90)
        write_file(d / "new", b"z" * 7)
        time.sleep(1.5)  # past the attribute timeout: the kernel asks again
        want = {f"f{i}": 10 for i in range(5)} | {"f1": 100, "new": 7}
        assert sizes(d) == want
        wait_for(lambda: status(mount.mountpoint)["pending"] == 0, 10.0, "the changes on the server")
        (share / "d" / "f3").write_bytes(b"w" * 33)  # there
        (share / "d" / "f4").unlink()
        time.sleep(1.5)
        want = want | {"f3": 33}
        del want["f4"]
        assert sizes(d) == want
