"""End-to-end reads through real mounts: ``mount.py`` in a subprocess, a real sshd, real FUSE.

Owns: the reading side of a mount as a user meets it — online reads, partial caching,
listing ahead, a kill -9 offline, revalidation, host key checks, the local-directory
backend, hostile names, and unmounting / daemon mode. Offline after a stopped server or a
silently stalled network, and remounting offline, are tests/test_any_backend.py's (over
every protocol).
Must not touch: cachefs internals. Only the command line, the mount point, the files in
``.cachefs/``, the ``user.cachefs.state`` xattr and the cache directory's ``data/`` files
(for how many bytes are stored) are looked at.

Every operation on the mount runs in a thread with a deadline, so a hung mount fails the
test instead of blocking it; every mount is taken down by its context manager.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from devtools.devserver import SshServer
from tests.fixtures.mount import MOUNT_SCRIPT, REPO, Mount, fusermount_unmount, is_mounted, status
from tests.test_writes import sync, wait_for

HEARTBEAT = 1.0
TIMEOUT = 2.0
ATTR_TIMEOUT = 1.0
SLACK = 3.0  # scheduling, one retry of a probe, a loaded 2-core machine
OP_DEADLINE = 15.0  # an operation still blocked after this is a hang
STATE_XATTR = "user.cachefs.state"
# Expected while the remote is away: the mount reports the network error it met.
OFFLINE_LOG = [r"(?i)unreachable|offline|timed? ?out|connection|EOF|reset|refused|socket|ssh"]


# -- helpers (also used by test_any_backend) -----------------------------------------------


class Hung(AssertionError):
    """An operation on the mount did not return before its deadline."""


def timed(function: Callable[[], Any], deadline: float = OP_DEADLINE) -> tuple[Any, float]:
    """Run ``function`` in a thread; return (its value or the exception it raised, seconds).

    A thread stuck in a FUSE request cannot be stopped; it is left behind as a daemon and
    released when the mount is torn down.
    """
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["value"] = function()
        except BaseException as error:  # handed back to the test
            outcome["value"] = error

    thread = threading.Thread(target=call, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(deadline)
    elapsed = time.monotonic() - started
    if thread.is_alive():
        raise Hung(f"{function!r} did not return within {deadline} s (the mount hangs)")
    return outcome["value"], elapsed


def ok(function: Callable[[], Any], deadline: float = OP_DEADLINE) -> Any:
    """The value of ``function`` run with a deadline; its exception is re-raised."""
    value, _ = timed(function, deadline)
    if isinstance(value, BaseException):
        raise value
    return value


def read(path: Path, deadline: float = OP_DEADLINE) -> bytes:
    return ok(path.read_bytes, deadline)


def assert_offline_error(path: Path, within: float) -> None:
    """Reading ``path`` fails with EHOSTDOWN, and does so within ``within`` seconds."""
    value, elapsed = timed(path.read_bytes)
    assert isinstance(value, OSError), f"reading {path} offline gave {value!r:.200}, not an error"
    assert value.errno == errno.EHOSTDOWN, f"reading {path} offline: {value!r}, want EHOSTDOWN"
    assert elapsed < within, f"reading {path} offline took {elapsed:.2f} s (limit {within} s)"


def wait_for_state(mountpoint: Path, state: str, within: float) -> float:
    """Wait until the status says ``state``; returns the seconds it took."""
    started = time.monotonic()
    last: dict[str, Any] = {}
    while True:
        last = status(mountpoint)
        if last.get("state") == state:
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"status not {state!r} within {within} s; last status: {last}")
        time.sleep(0.1)


def xattr_state(path: Path) -> str:
    return ok(lambda: os.getxattr(path, STATE_XATTR)).decode().strip()


def sftp_args(sshd: SshServer, known_hosts: Path | None = None) -> list[str]:
    return [
        "--identity", str(sshd.identity),
        "--known-hosts", str(known_hosts or sshd.known_hosts),
        "--attr-timeout", str(ATTR_TIMEOUT),
    ]


OFFLINE_ARGS = ["--heartbeat", str(HEARTBEAT), "--timeout", str(TIMEOUT)]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cached_bytes(cache_dir: Path) -> int:
    """Bytes really stored in the cache's content files (sparse holes not counted)."""
    total = 0
    for path in (cache_dir / "data").rglob("*"):
        if path.is_file():
            total += path.stat().st_blocks * 512
    return total


def run_mount_command(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``python mount.py ARGS`` (daemon mode unless told otherwise), as a user runs it."""
    return subprocess.run(
        [sys.executable, str(MOUNT_SCRIPT), *args],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )


def cachefs_command() -> list[str]:
    script = Path(sys.executable).with_name("cachefs")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cachefs.cli"]


def make_tree(share: Path, links: bool = True) -> dict[str, bytes]:
    """Files of several kinds under ``share``; returns relative path → content.
    ``links``: symlinks too (for a share whose protocol carries them)."""
    files = {
        "big.bin": os.urandom(3 * 1024 * 1024 + 123),
        "empty": b"",
        "hello.txt": b"hello, world\n",
        "a/one.txt": b"one\n" * 1000,
        "a/b/c/deep.txt": b"deep down\n",
        "a/b/two.bin": os.urandom(70_000),
        "later.txt": b"never read while online\n",
        "a/later.bin": os.urandom(20_000),
    }
    for relative, data in files.items():
        path = share / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    os.chmod(share / "hello.txt", 0o640)
    os.chmod(share / "a/b/c/deep.txt", 0o755)
    os.chmod(share / "a/b", 0o750)
    os.utime(share / "a/one.txt", (1_500_000_000, 1_500_000_000))
    os.utime(share / "empty", (1_234_567_890, 1_234_567_890))
    if links:
        os.symlink("a/b/c/deep.txt", share / "link")
        os.symlink("../nowhere/at all", share / "a/dangling")
    (share / "emptydir").mkdir()
    return files


# -- 1. online ------------------------------------------------------------------------------


def test_online_reads_equal_the_server(tmp_path: Path, sshd: SshServer, share: Path) -> None:
    files = make_tree(share)
    os.chmod(share, 0o750)
    os.utime(share, (1_400_000_000, 1_400_000_000))
    mnt = tmp_path / "mnt"
    with Mount(sshd.address(), mnt, tmp_path / "cache", *sftp_args(sshd)):
        assert status(mnt)["state"] == "online"
        for relative, data in files.items():
            assert sha(read(mnt / relative)) == sha(data), relative

        for server_dir, dirs, names in os.walk(share):
            relative = Path(server_dir).relative_to(share)
            mounted_dir = mnt / relative
            expected = set(dirs) | set(names)
            listed = set(ok(lambda d=mounted_dir: os.listdir(d)))
            if relative == Path("."):
                listed.discard(".cachefs")
            assert listed == expected, f"listing of {relative}"
            for name in expected:
                server_stat = os.lstat(share / relative / name)
                mounted_stat = ok(lambda p=mounted_dir / name: os.lstat(p))
                where = relative / name
                assert stat.S_IFMT(mounted_stat.st_mode) == stat.S_IFMT(server_stat.st_mode), where
                if not stat.S_ISLNK(server_stat.st_mode):
                    assert stat.S_IMODE(mounted_stat.st_mode) == stat.S_IMODE(server_stat.st_mode), where
                    assert int(mounted_stat.st_mtime) == int(server_stat.st_mtime), where
                if stat.S_ISREG(server_stat.st_mode):
                    assert mounted_stat.st_size == server_stat.st_size, where
                if stat.S_ISDIR(server_stat.st_mode):
                    assert mounted_stat.st_nlink >= 2, where
                if stat.S_ISLNK(server_stat.st_mode):
                    target = ok(lambda p=mounted_dir / name: os.readlink(p))
                    assert target == os.readlink(share / relative / name), where
        # Following the symlink through the mount gives the target's bytes.
        assert read(mnt / "link") == files["a/b/c/deep.txt"]
        assert xattr_state(mnt / "big.bin") == "cached"

        # The mount root stands for the share's root folder: the same mode and mtime.
        root = ok(lambda: os.stat(mnt))
        assert root.st_nlink >= 2
        assert (oct(stat.S_IMODE(root.st_mode)), int(root.st_mtime)) == (oct(0o750), 1_400_000_000), \
            "the mount root does not show the attributes of the share's root folder"


# -- 2. partial reads -----------------------------------------------------------------------


def test_partial_read_caches_only_part(tmp_path: Path, sshd: SshServer, share: Path) -> None:
    size = 200 * 1024 * 1024
    head = os.urandom(1024 * 1024)
    middle = os.urandom(256 * 1024)
    big = share / "sparse.bin"
    with open(big, "wb") as f:
        f.truncate(size)
        f.write(head)
        f.seek(size // 2)
        f.write(middle)
    expected = sha(big.read_bytes())
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    with Mount(sshd.address(), mnt, cache, *sftp_args(sshd)):
        first = ok(lambda: _pread(mnt / "sparse.bin", 1024, 0))
        assert first == head[:1024]
        stored = cached_bytes(cache)
        assert stored < 16 * 1024 * 1024, f"a 1 KiB read stored {stored} bytes of a {size} byte file"
        assert xattr_state(mnt / "sparse.bin") == "partial"

        whole = read(mnt / "sparse.bin", deadline=60)
        assert len(whole) == size
        assert sha(whole) == expected
        assert xattr_state(mnt / "sparse.bin") == "cached"


def _bdi_readahead_kb(mnt: Path) -> int:
    dev = os.stat(mnt).st_dev
    return int(Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb").read_text())


@pytest.mark.parametrize("option,expect_kb", [((), 1024), (("--readahead", "4M"), 4096)],
                         ids=["default", "4M"])
def test_readahead_of_the_mount(tmp_path: Path, sshd: SshServer, share: Path, option, expect_kb) -> None:
    """The mount's readahead (the largest FUSE read request) is set after FUSE_INIT, which
    would cap it at the kernel's 128 KiB; reads through it stay exact."""
    data = os.urandom(3 * 1024 * 1024 + 17)
    (share / "ra.bin").write_bytes(data)
    mnt = tmp_path / "mnt"
    assert os.geteuid() == 0, "the suite runs as root (FUSE, sshd); readahead needs it too"
    with Mount(sshd.address(), mnt, tmp_path / "cache", *sftp_args(sshd), *option):
        assert read(mnt / "ra.bin") == data
        assert _bdi_readahead_kb(mnt) == expect_kb
        subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True)
        assert read(mnt / "ra.bin") == data  # served from the cache's content file


def _pread(path: Path, length: int, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


# -- 3. listing ahead ----------------------------------------------------------------------


def test_subfolders_are_listed_ahead(tmp_path: Path, sshd: SshServer, share: Path) -> None:
    """Reading a folder lists its subfolders in the background (in the transfer
    processes), before anything opens them: they can be walked once the server is gone."""
    names = {}
    for d in range(40):
        folder = share / "tree" / f"d{d:02d}"
        folder.mkdir(parents=True)
        names[folder.name] = {f"f{i}.txt" for i in range(d % 4)}
        for name in names[folder.name]:
            (folder / name).write_bytes(name.encode())
        (folder / "sub").mkdir()
        names[folder.name].add("sub")
    mnt = tmp_path / "mnt"
    with Mount(sshd.address(), mnt, tmp_path / "cache", *sftp_args(sshd), *OFFLINE_ARGS,
               "--attr-timeout", "60", allowed_errors=OFFLINE_LOG):
        assert sorted(ok(lambda: os.listdir(mnt / "tree"))) == sorted(names)
        deadline = time.monotonic() + 20
        pending = set(names)
        while pending and time.monotonic() < deadline:
            pending = {n for n in pending
                       if ok(lambda n=n: os.getxattr(mnt / "tree" / n, STATE_XATTR)) != b"cached"}
            time.sleep(0.1)
        assert not pending, f"subfolders not listed ahead within 20 s: {sorted(pending)}"
        sshd.stop()
        for name, expected in names.items():
            assert set(ok(lambda n=name: os.listdir(mnt / "tree" / n))) == expected, name


@pytest.mark.parametrize("step", ["read", "list"])
def test_a_walk_lists_the_next_folders_ahead(tmp_path: Path, sshd: SshServer, share: Path, step: str) -> None:
    """Lookups or listings that go through a folder's subfolders in order (a program
    reading every file again once the listings are older than the attribute timeout) have
    the next few subfolders listed in the background, not each one when the walk reaches
    it. Seen offline: a file made on the server after the first walk is known in a folder
    ahead of the second walk, not in one far beyond it. (Without callbacks: with them, the
    server tells of both files as they are made.)"""
    for d in range(12):
        (share / "tree" / f"d{d:02d}").mkdir(parents=True)
        (share / "tree" / f"d{d:02d}" / "f").write_bytes(b"%d" % d)
    mnt = tmp_path / "mnt"
    with Mount(sshd.address(), mnt, tmp_path / "cache", *sftp_args(sshd), *OFFLINE_ARGS,
               "--attr-timeout", str(ATTR_TIMEOUT), "--callbacks", "off", allowed_errors=OFFLINE_LOG):
        for d in range(12):
            assert read(mnt / "tree" / f"d{d:02d}" / "f") == b"%d" % d
        for d in (4, 11):
            (share / "tree" / f"d{d:02d}" / "new").write_bytes(b"new")
        time.sleep(ATTR_TIMEOUT + 0.2)  # every listing is stale now
        for d in range(3):  # the walk again: d00, d01, d02; the next ones go ahead
            folder = mnt / "tree" / f"d{d:02d}"
            if step == "read":
                assert read(folder / "f") == b"%d" % d
            else:
                assert ok(lambda f=folder: os.listdir(f)) == ["f"]
        time.sleep(0.5)
        sshd.stop()
        assert ok(lambda: (mnt / "tree" / "d04" / "new").exists()), "d04 was not listed ahead"
        assert not ok(lambda: (mnt / "tree" / "d11" / "new").exists()), "d11 listed too: not a few ahead"


def test_tree_removed_while_listed_ahead(tmp_path: Path, sshd: SshServer, share: Path) -> None:
    """Folders queued to be listed ahead may be gone by the time a lister gets to them
    (``rm -rf`` right after a listing): the mount goes on, and the tree is gone."""
    for d in range(300):
        folder = share / "tree" / f"d{d:03d}" / "sub"
        folder.mkdir(parents=True)
        (folder / "f").write_bytes(b"x")
    mnt = tmp_path / "mnt"
    with Mount(sshd.address(), mnt, tmp_path / "cache", *sftp_args(sshd)) as mount:
        ok(lambda: os.listdir(mnt / "tree"))
        ok(lambda: [os.listdir(mnt / "tree" / f"d{d:03d}") for d in range(0, 300, 7)])
        ok(lambda: shutil.rmtree(mnt / "tree"), deadline=120)
        assert not ok(lambda: os.path.exists(mnt / "tree"))
        time.sleep(1.0)  # the listers reach what was queued
        assert "tree" not in ok(lambda: os.listdir(mnt))
        assert "Traceback" not in mount.log_text(), mount.log_text()[-3000:]
    assert not (share / "tree").exists() or not any((share / "tree").iterdir())


# -- 5. a kill -9 with the server down ------------------------------------------------------


def test_folder_read_survives_kill9_offline(tmp_path: Path, sshd: SshServer, share: Path) -> None:
    """A folder of small files read at once is checkpointed in one go (one syncfs of the
    cache's filesystem, not a fdatasync each): after a kill -9, with the server gone,
    every file is still read whole from the cache, and none counts as partial."""
    folder = share / "many"
    folder.mkdir()
    files = {f"f{i:03}": os.urandom(1000 + 37 * i) for i in range(120)}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    args = [*sftp_args(sshd), *OFFLINE_ARGS]
    first = Mount(sshd.address(), mnt, cache, *args).start()
    try:
        for name, data in files.items():
            assert read(mnt / "many" / name) == data, name
        time.sleep(2.5)  # past the 1 s checkpoint
    finally:
        first.kill9()

    sshd.stop()
    with Mount(sshd.address(), mnt, cache, *args, allowed_errors=OFFLINE_LOG):
        assert status(mnt)["state"] == "offline"
        for name, data in files.items():
            assert read(mnt / "many" / name, deadline=TIMEOUT + SLACK) == data, name
            assert os.getxattr(mnt / "many" / name, STATE_XATTR) == b"cached", name


# -- 6. first mount with nothing cached and no server ---------------------------------------


def test_fresh_mount_with_server_down_fails_clearly(tmp_path: Path, sshd: SshServer) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sshd.stop()
    try:
        result = run_mount_command(sshd.address(), str(mnt), "--cache-dir", str(tmp_path / "cache"),
                                   *sftp_args(sshd), "--timeout", str(TIMEOUT))
        assert result.returncode != 0, f"mount succeeded with no server: {result}"
        assert not is_mounted(mnt)
        message = result.stderr
        assert "cannot reach" in message and "127.0.0.1" in message, message
        assert "empty" in message, message  # says why it cannot mount offline either
        assert "Traceback" not in message, message
    finally:
        fusermount_unmount(mnt)


# -- 7. revalidation ------------------------------------------------------------------------


def test_server_side_changes_are_seen(tmp_path: Path, sshd: SshServer, share: Path) -> None:
    target = share / "doc.txt"
    target.write_bytes(b"version one\n")
    os.utime(target, (1_600_000_000, 1_600_000_000))
    mnt = tmp_path / "mnt"
    with Mount(sshd.address(), mnt, tmp_path / "cache", *sftp_args(sshd)):
        assert read(mnt / "doc.txt") == b"version one\n"
        assert xattr_state(mnt / "doc.txt") == "cached"

        target.write_bytes(b"version two, longer\n")  # another size
        time.sleep(ATTR_TIMEOUT + 0.5)
        assert read(mnt / "doc.txt") == b"version two, longer\n"
        assert ok(lambda: os.stat(mnt / "doc.txt")).st_size == len(b"version two, longer\n")

        target.write_bytes(b"VERSION TWO, LONGER\n")  # the same size, another mtime
        os.utime(target, (1_700_000_000, 1_700_000_000))
        time.sleep(ATTR_TIMEOUT + 0.5)
        assert read(mnt / "doc.txt") == b"VERSION TWO, LONGER\n"
        assert int(ok(lambda: os.stat(mnt / "doc.txt")).st_mtime) == 1_700_000_000

        (share / "new.txt").write_bytes(b"appeared\n")  # listings are refreshed too
        time.sleep(ATTR_TIMEOUT + 0.5)
        assert "new.txt" in ok(lambda: os.listdir(mnt))
        assert read(mnt / "new.txt") == b"appeared\n"


# -- 8. host keys ---------------------------------------------------------------------------


def test_host_key_checks(tmp_path: Path, sshd: SshServer, share: Path) -> None:
    (share / "f.txt").write_bytes(b"data\n")
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    known_hosts = tmp_path / "known_hosts_empty"
    known_hosts.write_text("")
    args = [*sftp_args(sshd, known_hosts), "--timeout", str(TIMEOUT)]
    try:
        refused = run_mount_command(sshd.address(), str(mnt), "--cache-dir", str(cache), *args)
        assert refused.returncode != 0, f"mounted with an unknown host key: {refused}"
        assert not is_mounted(mnt)
        assert "127.0.0.1" in refused.stderr and "--accept-new-host-key" in refused.stderr, refused.stderr
        assert known_hosts.read_text() == ""
    finally:
        fusermount_unmount(mnt)

    with Mount(sshd.address(), mnt, cache, *args, "--accept-new-host-key"):
        assert read(mnt / "f.txt") == b"data\n"
    key_b64 = sshd.host_key_pub.read_text().split()[1]
    recorded = known_hosts.read_text()
    assert key_b64 in recorded and "127.0.0.1" in recorded, recorded

    sshd.regenerate_host_key()
    sshd.restart()
    try:
        changed = run_mount_command(sshd.address(), str(mnt), "--cache-dir", str(cache), *args,
                                    "--accept-new-host-key")
        assert changed.returncode != 0, f"mounted although the host key changed: {changed}"
        assert not is_mounted(mnt)
        assert "127.0.0.1" in changed.stderr and "host key" in changed.stderr.lower(), changed.stderr
        assert known_hosts.read_text() == recorded  # the old key is not replaced
    finally:
        fusermount_unmount(mnt)


# -- 9. the local-directory backend ---------------------------------------------------------


@pytest.mark.parametrize("form", ["path", "file-url"])
def test_local_directory_backend(tmp_path: Path, share: Path, form: str) -> None:
    files = make_tree(share)
    remote = str(share) if form == "path" else share.as_uri()
    mnt = tmp_path / "mnt"
    with Mount(remote, mnt, tmp_path / "cache", "--attr-timeout", str(ATTR_TIMEOUT), *OFFLINE_ARGS,
               allowed_errors=OFFLINE_LOG):
        assert status(mnt)["state"] == "online"
        for relative in ("big.bin", "hello.txt", "a/one.txt", "empty"):
            assert read(mnt / relative) == files[relative], relative
        ok(lambda: os.listdir(mnt / "a"))
        assert ok(lambda: os.readlink(mnt / "link")) == "a/b/c/deep.txt"

        share.rename(tmp_path / "share-gone")
        wait_for_state(mnt, "offline", within=HEARTBEAT + TIMEOUT + SLACK)
        time.sleep(ATTR_TIMEOUT + 0.2)
        for relative in ("big.bin", "hello.txt", "a/one.txt", "empty"):
            assert read(mnt / relative, deadline=TIMEOUT + SLACK) == files[relative], relative
        assert_offline_error(mnt / "later.txt", within=2.0)
        assert "one.txt" in ok(lambda: os.listdir(mnt / "a"))


# -- 10. hostile names ----------------------------------------------------------------------


HOSTILE = {
    b"with  spaces ": b"spaces\n",
    b"new\nline": b"newline\n",
    b"caf\xe9": b"latin-1\n",
    b"n" * 255: b"long name\n",
    b"-leading-dash": b"dash\n",
    "\u00e9t\u00e9 \U0001f600".encode(): b"utf-8\n",
}


def test_hostile_names(tmp_path: Path, sshd: SshServer, share: Path) -> None:
    share_b = os.fsencode(share)
    for name, data in HOSTILE.items():
        with open(os.path.join(share_b, name), "wb") as f:
            f.write(data)
    impostor = os.path.join(share_b, b".cachefs")
    os.mkdir(impostor)
    with open(os.path.join(impostor, b"status"), "wb") as f:
        f.write(b"I am the server's file\n")

    mnt = tmp_path / "mnt"
    mnt_b = os.fsencode(mnt)
    with Mount(sshd.address(), mnt, tmp_path / "cache", *sftp_args(sshd)):
        listed = ok(lambda: os.listdir(mnt_b))
        assert sorted(listed) == sorted(HOSTILE)  # the server's .cachefs is not shown, nor the mount's
        for name, data in HOSTILE.items():
            assert ok(lambda n=name: open(os.path.join(mnt_b, n), "rb").read()) == data, name
        # .cachefs is the mount's own folder, not the server's.
        assert status(mnt)["state"] == "online"
        assert b"I am the server" not in ok(lambda: (mnt / ".cachefs" / "status").read_bytes())


# -- 11. unmount and daemon mode ------------------------------------------------------------


def test_cachefs_unmount_command(tmp_path: Path, sshd: SshServer, share: Path) -> None:
    (share / "f.txt").write_bytes(b"data\n")
    mnt = tmp_path / "mnt"
    with Mount(sshd.address(), mnt, tmp_path / "cache", *sftp_args(sshd)) as mount:
        assert read(mnt / "f.txt") == b"data\n"
        assert mount.process is not None
        # The mount process is our child: reap it while the command waits for it to end
        # (an unreaped zombie would still answer kill(pid, 0)).
        unmount = subprocess.Popen([*cachefs_command(), "unmount", "--wait", "20", str(mnt)],
                                   cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        try:
            assert mount.process.wait(20) == 0
            _, stderr = unmount.communicate(timeout=20)
        finally:
            if unmount.poll() is None:
                unmount.kill()
                unmount.wait()
        assert unmount.returncode == 0, stderr
        assert not is_mounted(mnt)
        assert "unmounted" in mount.log_text()


def test_daemon_mode(tmp_path: Path, sshd: SshServer, share: Path) -> None:
    (share / "f.txt").write_bytes(b"data\n")
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    pid = None
    try:
        result = run_mount_command(sshd.address(), str(mnt), "--cache-dir", str(cache), *sftp_args(sshd))
        assert result.returncode == 0, result.stderr
        assert is_mounted(mnt), "mount.py returned 0 but nothing is mounted"
        assert read(mnt / "f.txt") == b"data\n"
        current = status(mnt)
        pid = int(current["pid"])
        assert current["state"] == "online"

        result = subprocess.run([*cachefs_command(), "unmount", str(mnt)], cwd=REPO,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mnt)
        assert not _alive(pid), f"the mount process {pid} is still running after unmount"
        log_text = (cache / "mount.log").read_text(errors="replace")
        bad = [line for line in log_text.splitlines() if "Traceback" in line or " ERROR " in line]
        assert not bad, log_text
    finally:
        fusermount_unmount(mnt)
        if pid is not None and _alive(pid):
            os.kill(pid, 9)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not alive; it is not our child, but check its state anyway.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def _resident(path: Path) -> int:
    """Bytes of ``path`` in the page cache (util-linux ``fincore``)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, timeout=30, check=True)
    return int(out.stdout.strip())


def _drop_pages(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)  # (dirty pages are not dropped)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _cached_then_stopped(mount_factory, share: Path, tmp_path: Path, encrypted: bool,
                         datas: dict[str, bytes]) -> tuple[list[str], Mount]:
    """``datas`` as files of ``share/tree``, read whole through a first mount (plain or
    encrypted cache), checkpointed and stopped: its options and that mount."""
    args: list[str] = []
    if encrypted:
        (tmp_path / "key").write_bytes(os.urandom(32).hex().encode())
        os.chmod(tmp_path / "key", 0o600)
        args = ["--cache-key-file", str(tmp_path / "key")]
    (share / "tree").mkdir()
    for name, data in datas.items():
        (share / "tree" / name).write_bytes(data)
    first = mount_factory(*args).start()
    for name, data in datas.items():
        assert (first.mountpoint / "tree" / name).read_bytes() == data
    time.sleep(1.5)  # the checkpoint marks the contents whole
    first.stop()
    return args, first


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_a_folder_opened_after_a_remount_has_its_small_files_read_ahead(
        mount_factory, share: Path, tmp_path: Path, encrypted: bool) -> None:
    """The first opendir of a folder by the mount process reads the content files of its
    small whole files into the page cache in the background (an encrypted cache's too: its
    reads decrypt them from there), so that a program reading them next waits for no disk;
    a large file's is left alone."""
    datas = {f"f{i}": os.urandom(4096 + i) for i in range(5)}
    datas["large"] = os.urandom(1 << 20)
    args, first = _cached_then_stopped(mount_factory, share, tmp_path, encrypted, datas)
    contents = sorted((p for p in (first.cache_dir / "data").rglob("*") if p.is_file()),
                      key=lambda p: p.stat().st_size)
    assert len(contents) == len(datas), f"not one content file per file: {contents}"
    large = contents.pop()
    for path in [*contents, large]:
        _drop_pages(path)
    assert sum(_resident(p) for p in [*contents, large]) == 0, "the page cache kept them"
    mount = mount_factory(*args).start()
    assert sorted(os.listdir(mount.mountpoint / "tree")) == sorted(datas)
    wait_for(lambda: all(_resident(p) >= p.stat().st_size for p in contents), 10,
             "the small files' content files read ahead after the opendir")
    assert _resident(large) == 0, "a large file's content was read ahead"
    for name, data in datas.items():
        assert (mount.mountpoint / "tree" / name).read_bytes() == data


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_a_small_file_opened_first_after_a_remount_comes_with_its_open(
        mount_factory, share: Path, tmp_path: Path, encrypted: bool) -> None:
    """The first open of a small cached file by the mount process puts its bytes in the
    kernel's page cache with the open's answer (FUSE notify_store): the program's read asks
    nothing more of the mount. The bytes are the file's; a larger file's are not stored; a
    change on the server is read, not the pages stored before it."""
    datas = {f"f{i}": os.urandom(3000 + i) for i in range(5)}
    datas["large"] = os.urandom(200 << 10)  # (over the size stored, under passthrough's)
    args, _first = _cached_then_stopped(mount_factory, share, tmp_path, encrypted, datas)
    mount = mount_factory(*args).start()
    tree = mount.mountpoint / "tree"
    assert sorted(os.listdir(tree)) == sorted(datas)
    contents = [p for p in (mount.cache_dir / "data").rglob("*") if p.is_file() and p.stat().st_size < 64 << 10]
    wait_for(lambda: all(_resident(p) >= p.stat().st_size for p in contents), 10,
             "the small files' content files read ahead after the opendir")
    for name in sorted(datas):
        # (fincore opens the file, then asks which of its pages the kernel holds: no read)
        resident = _resident(tree / name)
        if name == "large":
            assert resident == 0, "a large file's bytes were stored with its open"
        else:
            pages = -(-len(datas[name]) // 4096) * 4096
            assert resident == pages, f"{name}: {resident} bytes came with the open"
    for name, data in datas.items():
        assert (tree / name).read_bytes() == data
    (share / "tree" / "f0").write_bytes(b"changed on the server")
    time.sleep(float(ATTR_TIMEOUT) + 0.5)
    assert (tree / "f0").read_bytes() == b"changed on the server"


WRITER = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o644)
os.pwrite(fd, b"\\0" * 4096, 0)
print("ready", flush=True)
end, k = time.monotonic() + float(sys.argv[2]), 0
while time.monotonic() < end:
    k += 1
    page = bytes([k % 251 + 1]) * 4096
    os.pwrite(fd, page, 0)
    os.pwrite(fd, b"w" * 10, 4096 + k % 1000)  # (and a write inside the next page)
    if os.pread(fd, 4096, 0) != page:
        print("STALE", k, flush=True)
        break
os.close(fd)
print("last", k % 251 + 1, flush=True)
"""


def test_a_file_being_written_opened_by_another_program_loses_nothing_and_hangs_nothing(
        mount_factory, share: Path) -> None:
    """Review of the bytes given with a first open: a file created here and still being
    written, opened for the first time by another program (a log being tailed): no bytes
    are put over the writer's (its next read gives what it wrote, the server gets its last
    page) and the mount does not hang (the kernel holds a page locked while its write is
    answered: a store into it from the answering thread waited for ever)."""
    mount = mount_factory().start()
    for trial in range(6):
        path = mount.mountpoint / f"log{trial}"
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), "1.5"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
            end = time.monotonic() + 1.0
            while time.monotonic() < end:  # (each open in a new program: a first open)
                reader = subprocess.Popen([sys.executable, "-c", f"open({str(path)!r}, 'rb').read()"])
                deadline = time.monotonic() + 10
                while reader.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.02)
                if reader.poll() is None:  # (hung in the kernel: only an abort frees it)
                    _abort_fuse_connection(mount.mountpoint)
                    pytest.fail(f"trial {trial}: a reader's open hung with the writer writing")
                assert reader.returncode == 0
            out, _ = writer.communicate(timeout=20)
        finally:
            if writer.poll() is None:
                writer.kill()
        assert "STALE" not in out, f"trial {trial}: a write was lost: {out}"
        last = int(out.split()[-1])
        assert path.read_bytes()[:4096] == bytes([last]) * 4096
        sync(mount.mountpoint)
        assert (share / path.name).read_bytes()[:4096] == bytes([last]) * 4096


def _abort_fuse_connection(mountpoint: Path) -> None:
    """Abort the FUSE connection of ``mountpoint`` (its fusectl ``abort``, fusectl mounted
    for it when it is not): what frees programs and a mount process stuck in the kernel."""
    device = next(line.split()[2] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                  if line.split()[4] == str(mountpoint))
    connections = Path("/sys/fs/fuse/connections")
    mounted_here = not any(connections.iterdir())
    if mounted_here:
        subprocess.run(["mount", "-t", "fusectl", "none", str(connections)], check=False)
    try:
        (connections / device.split(":")[1] / "abort").write_text("1")
    finally:
        if mounted_here:
            subprocess.run(["umount", str(connections)], check=False)
