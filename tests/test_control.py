"""The control surface end to end: every command of ``.cachefs/control``, online and
offline, against a real sshd and real mounts (``mount_factory``: --timeout 2,
--attr-timeout 1, --heartbeat 1).

What is checked is what a user or a script sees: the write's errno, ``.cachefs/status``,
the ``user.cachefs.state`` xattr, file contents in the mount (also with the server
stopped) and on the server. Every wait is bounded.
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.mount import _run_with_timeout, status

STATE_XATTR = "user.cachefs.state"
OP_TIMEOUT = 30.0  # any single file-system call
COMMAND_TIMEOUT = 60.0  # one control command (sync, pin)
LATER_NS = 100 * 10**9  # a server-side change also moves mtime well away from the base
CONFLICT_RE = re.compile(r"^(?P<stem>.*) \(conflict \d{4}-\d\d-\d\d \d{6} [^)]+\)(?P<ext>.*)$")
MiB = 1 << 20
#: paramiko logs a reset connection at ERROR when the sshd is stopped under it
SERVER_STOPPED = [r"paramiko\.transport: Socket exception"]


# -- helpers (also used by test_cli, test_any_backend) --------------------------------------

def bounded(function: Callable[[], Any], what: str, timeout: float = OP_TIMEOUT) -> Any:
    """Run a call that could block on a hung mount; AssertionError-like TimeoutError after
    ``timeout``."""
    return _run_with_timeout(function, timeout, what)


def command(mnt: Path, data: bytes | str, timeout: float = COMMAND_TIMEOUT) -> int:
    """Exactly one write(2) of ``data`` to the control file; raises OSError as it does."""
    raw = data.encode("utf-8") if isinstance(data, str) else data

    def write() -> int:
        fd = os.open(Path(mnt) / ".cachefs" / "control", os.O_WRONLY)
        try:
            return os.write(fd, raw)
        finally:
            os.close(fd)

    return bounded(write, f"control {raw[:40]!r}", timeout)


def refused(mnt: Path, data: bytes | str, err: int = errno.EINVAL) -> str:
    """The command fails with ``err``; returns the status's ``last_error``."""
    with pytest.raises(OSError) as info:
        command(mnt, data)
    assert info.value.errno == err, (
        f"{data[:60]!r}: errno {errno.errorcode.get(info.value.errno)}, "
        f"expected {errno.errorcode[err]}")
    last_error = status(mnt)["last_error"]
    assert last_error, f"{data[:60]!r} failed but status has no last_error"
    return last_error


def read(path: Path) -> bytes:
    return bounded(Path(path).read_bytes, f"reading {path}")


def read_at(path: Path, offset: int, size: int) -> bytes:
    def pread() -> bytes:
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)
    return bounded(pread, f"pread {path}@{offset}")


def write(path: Path, data: bytes) -> None:
    bounded(lambda: Path(path).write_bytes(data), f"writing {path}")


def listdir(path: Path) -> list[str]:
    return bounded(lambda: os.listdir(path), f"listing {path}")


def state(path: Path) -> str:
    return bounded(lambda: os.getxattr(path, STATE_XATTR), f"getxattr {path}").decode()


def errno_of(function: Callable[[], Any], what: str) -> int | None:
    """The errno ``function`` fails with, or None when it succeeds."""
    try:
        bounded(function, what)
    except OSError as exc:
        return exc.errno
    return None


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_state(mnt: Path, wanted: str, timeout: float = 15.0) -> None:
    wait_for(lambda: status(mnt)["state"] == wanted, timeout, f"state {wanted} ({status(mnt)})")


def go_offline(mnt: Path) -> None:
    """Work offline by request, after listing the root (so names there are known)."""
    listdir(mnt)
    command(mnt, "offline")
    assert status(mnt)["connectivity"] == "offline-by-request"


def go_online_and_sync(mnt: Path, timeout: float = 20.0) -> None:
    """``online``, then ``sync`` until it succeeds (reconnecting takes a probe)."""
    command(mnt, "online")
    deadline = time.monotonic() + timeout
    while True:
        try:
            command(mnt, "sync")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def change_on_server(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + LATER_NS))


def conflict_copies(folder: Path, name: str) -> list[str]:
    stem, dot, ext = name.rpartition(".")
    out = []
    for entry in os.listdir(folder):
        match = CONFLICT_RE.match(entry)
        if match and match["stem"] == stem and match["ext"] == dot + ext:
            out.append(entry)
    return out


def conflict_records(mnt: Path) -> list[dict]:
    return json.loads(read(Path(mnt) / ".cachefs" / "conflicts"))


def make_changed_both(mount_factory_mnt: Path, share: Path, files: dict[str, tuple[bytes, bytes, bytes]]) -> None:
    """For each name: base on the server, read online, change offline (local) and on the
    server (remote), then ``online`` + ``sync``: one changed-both conflict each."""
    mnt = mount_factory_mnt
    for name in files:
        read(mnt / name)
    go_offline(mnt)
    for name, (_base, local, remote) in files.items():
        write(mnt / name, local)
        change_on_server(share / name, remote)
    go_online_and_sync(mnt)


# -- offline, online, sync ----------------------------------------------------------------


def test_sync_right_after_the_server_stopped_does_not_claim_success(mount_factory, sshd, share: Path) -> None:
    """``sync`` succeeds only if the remote answered: nothing pending is no excuse."""
    (share / "f.txt").write_bytes(b"x")
    with mount_factory() as mount:
        mnt = mount.mountpoint
        read(mnt / "f.txt")
        assert status(mnt)["pending"] == 0 and status(mnt)["pinned"] == []
        sshd.stop()
        refused(mnt, "sync", errno.EHOSTDOWN)


# -- pin ------------------------------------------------------------------------------------


def test_pin_offline_of_unknown_content_fails(mount_factory, share: Path) -> None:
    (share / "d").mkdir()
    (share / "d" / "f.txt").write_bytes(b"f")
    with mount_factory() as mount:
        mnt = mount.mountpoint
        go_offline(mnt)
        refused(mnt, "pin d", errno.EHOSTDOWN)
        assert read(mnt / ".cachefs" / "status")  # still answers


# -- xattr states ---------------------------------------------------------------------------

def test_state_xattr_follows_the_content(mount_factory, share: Path) -> None:
    (share / "big.bin").write_bytes(os.urandom(12 * MiB))
    (share / "small.txt").write_bytes(b"small\n")
    (share / "conf.txt").write_bytes(b"base\n")
    (share / "dir").mkdir()
    with mount_factory() as mount:
        mnt = mount.mountpoint
        # read by name, not listed (cp -a, rsync -X would copy it along)
        assert STATE_XATTR not in bounded(lambda: os.listxattr(mnt / "small.txt"), "listxattr")
        assert state(mnt / "big.bin") == "remote"
        assert state(mnt / "small.txt") == "remote"

        assert len(read_at(mnt / "big.bin", 7 * MiB, 4096)) == 4096  # not from the start: no readahead
        assert state(mnt / "big.bin") == "partial"
        assert read(mnt / "small.txt") == b"small\n"
        assert state(mnt / "small.txt") == "cached"

        command(mnt, "pin small.txt")
        assert state(mnt / "small.txt") == "pinned"
        command(mnt, "unpin small.txt")
        assert state(mnt / "small.txt") == "cached"

        read(mnt / "conf.txt")
        go_offline(mnt)
        write(mnt / "small.txt", b"changed offline\n")
        assert state(mnt / "small.txt") == "dirty"

        write(mnt / "conf.txt", b"local version\n")
        change_on_server(share / "conf.txt", b"remote version\n")
        go_online_and_sync(mnt)
        assert state(mnt / "small.txt") in ("cached", "partial", "remote")  # clean again
        assert status(mnt)["conflicts"] == 1, status(mnt)
        assert state(mnt / "conf.txt") == "conflict"
        with pytest.raises(OSError):
            bounded(lambda: os.setxattr(mnt / "small.txt", STATE_XATTR, b"pinned"), "setxattr")


# -- unpin and evict ------------------------------------------------------------------------

def test_unpin_then_evict_drops_content_but_never_dirty_or_pinned(mount_factory, share: Path) -> None:
    (share / "dir").mkdir()
    (share / "dir" / "f1.bin").write_bytes(b"1" * 200_000)
    (share / "dir" / "f2.bin").write_bytes(b"2" * 300_000)
    (share / "notes.txt").write_bytes(b"base notes\n")
    with mount_factory() as mount:
        mnt = mount.mountpoint
        command(mnt, "pin dir")
        time.sleep(1.5)  # past the 1 s checkpoint (see test_evict_right_after_a_read_drops_it)
        used_pinned = status(mnt)["cache_bytes"]
        assert used_pinned >= 500_000, status(mnt)

        command(mnt, "evict dir")  # pinned: nothing goes
        assert state(mnt / "dir/f1.bin") == "pinned"
        assert state(mnt / "dir/f2.bin") == "pinned"
        assert status(mnt)["cache_bytes"] >= 500_000

        command(mnt, "unpin dir")
        assert status(mnt)["pinned"] == []
        assert state(mnt / "dir/f1.bin") == "cached"
        command(mnt, "evict dir/")
        assert state(mnt / "dir/f1.bin") == "remote"
        assert state(mnt / "dir/f2.bin") == "remote"
        assert status(mnt)["cache_bytes"] <= used_pinned - 500_000, status(mnt)
        assert read(mnt / "dir/f2.bin") == b"2" * 300_000  # fetched again

        # Offline: changed content is the only copy; evict (even of the root) keeps it.
        read(mnt / "notes.txt")
        time.sleep(1.5)
        go_offline(mnt)
        write(mnt / "notes.txt", b"changed offline, only here\n")
        command(mnt, "evict notes.txt")
        command(mnt, "evict .")
        assert state(mnt / "notes.txt") == "dirty"
        assert read(mnt / "notes.txt") == b"changed offline, only here\n"
        assert state(mnt / "dir/f2.bin") == "remote"  # the clean one did go
        go_online_and_sync(mnt)
        assert (share / "notes.txt").read_bytes() == b"changed offline, only here\n"


def test_evict_right_after_a_read_drops_it(mount_factory, share: Path) -> None:
    """Content fetched a moment ago (not yet checkpointed into the index) is evictable too."""
    (share / "fresh.bin").write_bytes(b"f" * 300_000)
    with mount_factory() as mount:
        mnt = mount.mountpoint
        assert read(mnt / "fresh.bin") == b"f" * 300_000
        assert state(mnt / "fresh.bin") == "cached"
        command(mnt, "evict fresh.bin")
        assert state(mnt / "fresh.bin") == "remote"
        assert status(mnt)["cache_bytes"] == 0, status(mnt)


def test_cache_size_limit_keeps_changed_files_and_says_so(mount_factory, share: Path) -> None:
    limit = 2 * MiB
    (share / "seed.txt").write_bytes(b"seed")
    with mount_factory("--cache-size", "2M") as mount:
        mnt = mount.mountpoint
        assert status(mnt)["cache_limit"] == limit
        # Changed content beyond the limit: kept, and reported.
        go_offline(mnt)
        dirty = {f"d{i}.bin": os.urandom(MiB) for i in range(3)}
        for name, content in dirty.items():
            write(mnt / name, content)
        try:
            wait_for(lambda: status(mnt)["over_limit_pinned"] is True, 5, "over_limit_pinned")
            reported = None
        except AssertionError:
            reported = f"over_limit_pinned stayed false with 3 MiB of changes: {status(mnt)}"
        for name, content in dirty.items():
            assert state(mnt / name) == "dirty"
            assert read(mnt / name) == content
        go_online_and_sync(mnt)
        for name, content in dirty.items():
            assert (share / name).read_bytes() == content
        wait_for(lambda: status(mnt)["cache_bytes"] <= limit and not status(mnt)["over_limit_pinned"],
                 10, f"clean again and back under the limit ({status(mnt)})")
        assert reported is None, reported


# -- resolve ------------------------------------------------------------------------------

def test_resolve_local_remote_both(mount_factory, share: Path) -> None:
    files = {
        "l.txt": (b"base l\n", b"local l, ours\n", b"remote l\n"),
        "r.txt": (b"base r\n", b"local r, ours\n", b"remote r\n"),
        "b.txt": (b"base b\n", b"local b, ours\n", b"remote b\n"),
    }
    for name, (base, _l, _r) in files.items():
        (share / name).write_bytes(base)
    with mount_factory() as mount:
        mnt = mount.mountpoint
        make_changed_both(mnt, share, files)
        assert status(mnt)["conflicts"] == 3, status(mnt)
        copies = {name: conflict_copies(share, name) for name in files}
        assert all(len(c) == 1 for c in copies.values()), os.listdir(share)
        records = conflict_records(mnt)
        assert {r["path"] for r in records} == set(files), records

        refused(mnt, "resolve l.txt sideways")
        refused(mnt, "resolve l.txt")
        refused(mnt, "resolve ../l.txt local")
        refused(mnt, "resolve nothing-here.txt local", errno.ENOENT)

        command(mnt, "resolve l.txt local")
        assert status(mnt)["conflicts"] == 2
        # The name shows our version at once (the kernel must not keep the old entry).
        assert read(mnt / "l.txt") == b"local l, ours\n"
        command(mnt, "resolve r.txt remote")
        assert status(mnt)["conflicts"] == 1
        command(mnt, f"resolve {copies['b.txt'][0]} both")  # by the copy's name
        assert status(mnt)["conflicts"] == 0
        assert conflict_records(mnt) == []
        command(mnt, "sync")
        assert status(mnt)["pending"] == 0

        assert (share / "l.txt").read_bytes() == b"local l, ours\n"
        assert conflict_copies(share, "l.txt") == []
        assert (share / "r.txt").read_bytes() == b"remote r\n"
        assert conflict_copies(share, "r.txt") == []
        assert (share / "b.txt").read_bytes() == b"remote b\n"
        assert (share / copies["b.txt"][0]).read_bytes() == b"local b, ours\n"
        assert read(mnt / "l.txt") == b"local l, ours\n"
        for name in files:
            assert state(mnt / name) != "conflict", name


# -- bad commands ---------------------------------------------------------------------------

BAD_COMMANDS = [
    pytest.param(b"frobnicate now", id="unknown-verb"),
    pytest.param(b"pin ../x", id="dotdot"),
    pytest.param(b"pin dir/../../x", id="dotdot-inside"),
    pytest.param(b"pin /etc", id="absolute"),
    pytest.param(b"\xff\xfe\x80\x81 pin \xc3\x28", id="not-utf8"),
    pytest.param(b"pin " + b"a" * 100_000, id="100KB"),
    pytest.param(b"\n", id="only-newline"),
    pytest.param(b"   ", id="blank"),
    pytest.param(b"sync\noffline", id="embedded-newline"),
    pytest.param(b"sync\0", id="nul"),
    pytest.param(b"pin", id="pin-without-path"),
    pytest.param(b"sync now", id="sync-with-argument"),
    pytest.param(b"pin .cachefs/status", id="control-folder"),
]


def test_bad_commands_fail_with_einval_and_the_mount_keeps_running(mount_factory, share: Path) -> None:
    (share / "f.txt").write_bytes(b"still here\n")
    (share / "dir").mkdir()
    # One mount for every case (a mount each would cost seconds apiece).
    with mount_factory() as mount:
        mnt = mount.mountpoint
        problems = []
        for param in BAD_COMMANDS:
            data = param.values[0]
            try:
                last_error = refused(mnt, data)
            except (AssertionError, OSError, TimeoutError) as exc:
                problems.append(f"{param.id}: {exc}")
                continue
            if param.id == "100KB":
                assert "too long" in last_error, last_error
            if param.id == "unknown-verb":
                assert "frobnicate" in last_error, last_error
            assert read(mnt / "f.txt") == b"still here\n", param.id
            assert status(mnt)["state"] == "online", param.id
        # An empty write(2) may never reach the file system (the kernel answers 0 itself);
        # if it does reach it, it must be refused.
        try:
            assert command(mnt, b"") == 0
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                problems.append(f"empty write: errno {errno.errorcode.get(exc.errno)}")
        assert not problems, "\n".join(problems)
        command(mnt, "sync")  # a good command still works, and clears the error
        assert status(mnt)["last_error"] is None, status(mnt)
        assert (share / "f.txt").read_bytes() == b"still here\n"


def test_control_file_is_write_only_and_status_read_only(mount_factory) -> None:
    with mount_factory() as mount:
        mnt = mount.mountpoint
        assert errno_of(lambda: (mnt / ".cachefs/control").read_bytes(), "read control") == errno.EACCES
        assert errno_of(lambda: (mnt / ".cachefs/status").write_bytes(b"{}"), "write status") == errno.EACCES
        assert errno_of(lambda: (mnt / ".cachefs/conflicts").write_bytes(b"[]"), "write conflicts") == errno.EACCES
        assert json.loads(read(mnt / ".cachefs/conflicts")) == []
        assert sorted(listdir(mnt / ".cachefs")) == ["conflicts", "control", "status"]


# -- the .cachefs folder belongs to the mount, not the share ------------------------------

def test_cachefs_folder_cannot_be_changed_and_is_not_sent(mount_factory, share: Path) -> None:
    (share / "f.txt").write_bytes(b"f")
    with mount_factory() as mount:
        mnt = mount.mountpoint
        dot = mnt / ".cachefs"
        attempts: dict[str, Callable[[], Any]] = {
            "mkdir .cachefs": lambda: os.mkdir(dot),
            "rmdir .cachefs": lambda: os.rmdir(dot),
            "unlink .cachefs": lambda: os.unlink(dot),
            "rename .cachefs away": lambda: os.rename(dot, mnt / "elsewhere"),
            "rename onto .cachefs": lambda: os.rename(mnt / "f.txt", dot),
            "create in .cachefs": lambda: (dot / "new").write_bytes(b"x"),
            "mkdir in .cachefs": lambda: os.mkdir(dot / "sub"),
            "unlink status": lambda: os.unlink(dot / "status"),
            "rename status": lambda: os.rename(dot / "status", mnt / "status"),
            "rename file into .cachefs": lambda: os.rename(mnt / "f.txt", dot / "f.txt"),
            "symlink .cachefs": lambda: os.symlink("x", dot),
            "chmod control": lambda: os.chmod(dot / "control", 0o666),
        }
        succeeded = [what for what, attempt in attempts.items() if errno_of(attempt, what) is None]
        assert not succeeded, f"these changed the .cachefs folder: {succeeded}"
        assert ".cachefs" not in listdir(mnt)  # reached by name only (test_root_listing)
        assert read(mnt / "f.txt") == b"f"
        command(mnt, "sync")
        assert sorted(os.listdir(share)) == ["f.txt"], os.listdir(share)
        assert status(mnt)["pending"] == 0
