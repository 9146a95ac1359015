"""The behaviours every share must have, whatever protocol carries it: one test each, run
over every backend by the ``backend`` fixture (tests/backends.py: sftp, local, smb, webdav).

Offline reads (the server stopped, a silent network, a remount with the server stopped),
the control file's sync/offline/online, the journal and its replay, conflicts and their
names, pin, eviction, kill -9 with changes journaled and during a replay, faults through a
TCP relay (cut mid-read and mid-upload, stalled, a 1 MB/s link), hostile names as far as
the protocol carries them (a name it refuses fails at once with its errno, not at replay),
symlinks, hard links and modes where carried; where a protocol carries no symlinks or hard
links, that they are refused at once (EPERM), online and offline, with nothing journaled
(tests/backends.py's ``Caps`` say which and why). The faults of a network are tested on
the protocols that have one (``NETWORK_ONLY``).

Most of these tests were SFTP's (test_mount_read, test_control, test_conflicts,
test_writes, test_faults): moved here onto the fixture, not copied. The helpers stay where
they were and are imported from there.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.backends import BACKENDS, Backend

#: the tests of a network's faults run over the protocols that have one (a local path has
#: no link to cut, stall or slow down: those tests are not made for it, rather than skipped)
NETWORK_ONLY = pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "local"], indirect=True)
from tests.fixtures.mount import fusermount_unmount, run_with_timeout, status
from tests.test_conflicts import (REFRESH, assert_recorded, change_on_server, conflict_records,
                                  copies_of, mount_shows, path_state_line, shows_conflict,
                                  state_of)
from tests.test_dav import same_second_rewrite
from tests.test_control import MiB, command, errno_of, listdir, refused, state, wait_state
from tests.test_control import go_offline as offline_by_request
from tests.test_control import read as read_bounded
from tests.test_faults import ChunkReader, check_reader, read_whole_eventually
from tests.test_mount_read import (ATTR_TIMEOUT, HEARTBEAT, SLACK, TIMEOUT, assert_offline_error,
                                   make_tree, ok, read, sha, timed, wait_for_state)
from tests.test_writes import (assert_same_tree, partial_sizes, control, go_offline, no_temp_leftovers, read_all,
                               sync, sync_until_done, wait_for, write_file)

# -- offline reads ----------------------------------------------------------------------------


def test_offline_after_server_stops(backend: Backend) -> None:
    share = backend.share
    files = make_tree(share, links=backend.caps.symlinks)
    with backend.mount() as mount:
        mnt = mount.mountpoint
        for relative in ("big.bin", "hello.txt", "a/one.txt", "a/b/c/deep.txt"):
            read(mnt / relative)
        listed_root = set(ok(lambda: os.listdir(mnt)))
        listed_a = set(ok(lambda: os.listdir(mnt / "a")))

        stopped = time.monotonic()
        backend.go_offline()
        # Right away, before the mount has noticed anything.
        assert_offline_error(mnt / "later.txt", within=2.0)
        for relative in ("big.bin", "hello.txt", "a/one.txt", "a/b/c/deep.txt"):
            assert sha(read(mnt / relative, deadline=TIMEOUT + SLACK)) == sha(files[relative]), relative
        wait_for_state(mnt, "offline", within=HEARTBEAT + TIMEOUT + SLACK - (time.monotonic() - stopped))

        time.sleep(ATTR_TIMEOUT + 0.2)  # past the attribute timeout: no remote to ask
        for relative in ("big.bin", "a/b/c/deep.txt"):
            value, elapsed = timed(lambda r=relative: (mnt / r).read_bytes())
            assert value == files[relative], f"{relative}: {value!r:.100}"
            assert elapsed < 2.0, f"cached read of {relative} offline took {elapsed:.2f} s"
        assert_offline_error(mnt / "later.txt", within=2.0)
        assert_offline_error(mnt / "a/later.bin", within=2.0)
        assert set(ok(lambda: os.listdir(mnt))) == listed_root
        assert set(ok(lambda: os.listdir(mnt / "a"))) == listed_a
        assert ok(lambda: os.stat(mnt / "a/later.bin")).st_size == len(files["a/later.bin"])
        assert status(mnt)["last_error"]


def test_remount_while_server_down(backend: Backend) -> None:
    files = make_tree(backend.share, links=backend.caps.symlinks)
    with backend.mount(name="mnt") as first:
        mnt = first.mountpoint
        for relative in ("big.bin", "a/b/c/deep.txt"):
            read(mnt / relative)
        ok(lambda: os.listdir(mnt / "a"))
    assert first.process is not None and first.process.returncode == 0

    backend.go_offline()
    with backend.mount(name="mnt"):
        assert status(mnt)["state"] == "offline"
        for relative in ("big.bin", "a/b/c/deep.txt"):
            assert read(mnt / relative, deadline=TIMEOUT + SLACK) == files[relative], relative
        assert "one.txt" in ok(lambda: os.listdir(mnt / "a"))
        assert_offline_error(mnt / "later.txt", within=2.0)

        backend.come_back()
        wait_for_state(mnt, "online", within=HEARTBEAT + TIMEOUT + 2 * SLACK)
        assert read(mnt / "later.txt") == files["later.txt"]


@pytest.mark.parametrize("backend", ["local"], indirect=True)  # (the daemon's, whatever the protocol)
def test_signals_during_the_unmount_lose_no_cached_content(backend: Backend) -> None:
    """``kill`` right after ``fusermount -u`` (a session or a service being stopped): the
    mount still records what it fetched before it ends (SIGTERMs are logged, not obeyed),
    so a remount with the server gone reads it all. Before, a SIGTERM in its last
    checkpoint ended it with the content read since the checkpoint before unrecorded (the
    remount offline: EHOSTDOWN)."""
    files = {f"s/f{i:02d}": os.urandom(3000 + i) for i in range(40)}
    for rel, data in files.items():
        (backend.share / rel).parent.mkdir(parents=True, exist_ok=True)
        (backend.share / rel).write_bytes(data)
    first = backend.mount(name="mnt").start()
    mnt = first.mountpoint
    try:
        for rel, data in files.items():
            assert read(mnt / rel) == data, rel
        process = first.process
        assert process is not None
        fusermount_unmount(mnt)
        deadline = time.monotonic() + 30
        # Again and again through all of its ending, until it says it is done (a signal
        # after that, as its index is closed, may end it: nothing is left to save then).
        while "unmounted" not in first.log_text() and process.poll() is None and time.monotonic() < deadline:
            os.kill(process.pid, signal.SIGTERM)
            time.sleep(0.002)
        assert process.wait(30) in (0, -signal.SIGTERM)
    finally:
        first.stop()
    said = first.log_text()
    assert "unmounting already" in said and "unmounted" in said, said[-2000:]

    backend.go_offline()
    with backend.mount(name="mnt"):
        assert status(mnt)["state"] == "offline"
        for rel, data in files.items():
            assert read(mnt / rel, deadline=TIMEOUT + SLACK) == data, rel


@pytest.mark.parametrize("backend", ["sftp"], indirect=True)  # (the daemon's, whatever the protocol)
def test_a_second_sigterm_ends_the_replay_at_unmount_not_the_change(backend: Backend) -> None:
    """Review: a slow replay at unmount (``--sync-at-unmount``) and a second SIGTERM (a
    user insisting, a service manager): the replay ends at once, the process with status
    0 after saving the cache, and the change is replayed by the next mount."""
    proxy = backend.proxied()
    data = os.urandom(6 << 20)
    first = backend.mount("--sync-at-unmount", "120", "--write-back-hold", "60", through=proxy,
                          name="mnt", check_log=False).start()
    mnt = first.mountpoint
    try:
        write_file(mnt / "up.bin", data)
        proxy.throttle(256 << 10)  # (24 s for the file: the replay at unmount is under way)
        process = first.process
        assert process is not None
        fusermount_unmount(mnt)
        wait_for(lambda: "replaying 1 pending" in first.log_text(), 15, "the replay at unmount")
        os.kill(process.pid, signal.SIGTERM)  # (the first: unmounting, as it is already)
        time.sleep(0.5)
        os.kill(process.pid, signal.SIGTERM)
        sent = time.monotonic()
        assert process.wait(30) == 0
        assert time.monotonic() - sent < 5, "the replay at unmount went on after the second SIGTERM"
    finally:
        proxy.throttle(None)
        first.stop()
    assert "unmounting already" in first.log_text()
    assert not (backend.share / "up.bin").exists() or (backend.share / "up.bin").read_bytes() != data
    with backend.mount(name="mnt", through=proxy) as again:  # (the cache's remote: the relay)
        sync_until_done(again.mountpoint, 60)
        assert sha((backend.share / "up.bin").read_bytes()) == sha(data)


@NETWORK_ONLY
def test_offline_after_silent_network_loss(backend: Backend) -> None:
    """The network goes silent (no reset: only a timeout can tell): cached reads go on,
    uncached ones fail with EHOSTDOWN within the timeout, the mount goes offline, and
    comes back online once the network does. Every call of the backend is bounded."""
    proxy = backend.proxied()
    files = make_tree(backend.share, links=backend.caps.symlinks)
    with backend.mount(through=proxy) as mount:
        mnt = mount.mountpoint
        for relative in ("big.bin", "hello.txt", "a/one.txt"):
            assert read(mnt / relative) == files[relative]
        ok(lambda: os.listdir(mnt / "a"))
        time.sleep(ATTR_TIMEOUT + 0.2)  # so that the next open asks the (stalled) remote

        stalled = time.monotonic()
        proxy.stall()
        for relative in ("hello.txt", "big.bin", "a/one.txt"):
            value, elapsed = timed(lambda r=relative: (mnt / r).read_bytes())
            assert value == files[relative], f"{relative} after the stall: {value!r:.200}"
            assert elapsed < TIMEOUT + SLACK, f"cached read of {relative} took {elapsed:.2f} s"
        assert_offline_error(mnt / "later.txt", within=TIMEOUT + SLACK)
        assert_offline_error(mnt / "a/later.bin", within=TIMEOUT + SLACK)
        wait_for_state(mnt, "offline",
                       within=HEARTBEAT + TIMEOUT + SLACK - (time.monotonic() - stalled))

        proxy.resume()
        wait_for_state(mnt, "online", within=HEARTBEAT + TIMEOUT + 2 * SLACK)
        assert read(mnt / "later.txt", deadline=TIMEOUT + SLACK) == files["later.txt"]
        assert mount.process is not None and mount.process.poll() is None


# -- the control file: offline, online, sync; the journal and its replay ------------------------

def test_offline_journals_and_online_sync_replays(backend: Backend) -> None:
    share = backend.share
    (share / "seen.txt").write_bytes(b"seen before\n")
    (share / "unseen.txt").write_bytes(b"never read\n")
    with backend.mount() as mount:
        mnt = mount.mountpoint
        assert read_bounded(mnt / "seen.txt") == b"seen before\n"
        before = status(mnt)
        assert before["state"] == "online" and before["connectivity"] == "online", before
        assert before["pending"] == 0

        offline_by_request(mnt)
        now = status(mnt)
        assert now["state"] == "offline" and now["connectivity"] == "offline-by-request", now
        # No remote access while the server is up: content never read is not fetched.
        assert errno_of(lambda: (mnt / "unseen.txt").read_bytes(), "read unseen") == errno.EHOSTDOWN
        assert read_bounded(mnt / "seen.txt") == b"seen before\n"

        write_file(mnt / "seen.txt", b"changed offline\n")
        write_file(mnt / "new.txt", b"created offline\n")
        assert status(mnt)["pending"] > 0
        time.sleep(1.5)  # a heartbeat or two: still nothing may reach the server
        assert (share / "seen.txt").read_bytes() == b"seen before\n"
        assert not (share / "new.txt").exists()

        last_error = refused(mnt, "sync", errno.EHOSTDOWN)
        assert "offline" in last_error, last_error
        assert status(mnt)["pending"] > 0

        command(mnt, "online")
        wait_state(mnt, "online")
        command(mnt, "sync")
        after = status(mnt)
        assert after["pending"] == 0, after
        assert after["last_sync"], after
        assert (share / "seen.txt").read_bytes() == b"changed offline\n"
        assert (share / "new.txt").read_bytes() == b"created offline\n"
        assert read_bounded(mnt / "unseen.txt") == b"never read\n"


def test_a_file_put_in_place_by_a_rename_reaches_the_server_under_its_name_only(backend: Backend) -> None:
    """Offline, a file written under a temporary name and renamed to its own (git's object
    write where the remote has no hard links; many programs' saves of a new file): where
    the remote's create of a new file refuses a name taken meanwhile (SMB, WebDAV:
    ``exclusive_create``), the replay uploads it once under its final name, no temporary
    name and no rename on the server; elsewhere the rename is replayed (it refuses a file
    another client made there meanwhile). A rename over a file the server has is always
    replayed as a rename."""
    share = backend.share
    (share / "old.txt").write_bytes(b"server version\n")
    with backend.mount() as mount:
        mnt = mount.mountpoint
        assert read_bounded(mnt / "old.txt") == b"server version\n"
        go_offline(mnt)
        write_file(mnt / ".new.txt.tmp", b"put in place\n")
        os.rename(mnt / ".new.txt.tmp", mnt / "new.txt")
        write_file(mnt / ".old.txt.tmp", b"saved over\n")
        os.rename(mnt / ".old.txt.tmp", mnt / "old.txt")
        command(mnt, "online")
        wait_state(mnt, "online")
        command(mnt, "sync")
        assert status(mnt)["pending"] == 0
        assert sorted(os.listdir(share)) == ["new.txt", "old.txt"]
        assert (share / "new.txt").read_bytes() == b"put in place\n"
        assert (share / "old.txt").read_bytes() == b"saved over\n"
        replayed = [line for line in mount.log_text().splitlines() if "cachefs.sync.replay: replay" in line]
        folded = not any("rename" in line and ".new.txt.tmp" in line for line in replayed)
        assert folded == _declared(backend).exclusive_create, replayed
        assert any("rename" in line and ".old.txt.tmp" in line for line in replayed), replayed


def _declared(backend: Backend) -> Any:
    """The capabilities the backend's handler declares."""
    from cachefs.remote.dav import DavRemote
    from cachefs.remote.local import LocalRemote
    from cachefs.remote.sftp import SftpRemote
    from cachefs.remote.smb import SmbRemote
    return {"sftp": SftpRemote, "local": LocalRemote, "smb": SmbRemote, "webdav": DavRemote}[backend.name].capabilities


def test_sync_with_server_stopped_fails_and_says_why(backend: Backend) -> None:
    (backend.share / "f.txt").write_bytes(b"x")
    with backend.mount() as mount:
        mnt = mount.mountpoint
        read_bounded(mnt / "f.txt")
        backend.go_offline()
        wait_state(mnt, "offline")  # the heartbeat (1 s) notices
        last_error = refused(mnt, "sync", errno.EHOSTDOWN)
        assert "offline" in last_error or "reach" in last_error, last_error
        assert status(mnt)["state"] == "offline"
        assert status(mnt)["connectivity"] == "offline"  # detected, not by request
        assert read_bounded(mnt / "f.txt") == b"x"


def test_unmount_online_flushes_journal(backend: Backend) -> None:
    mount = backend.mount()
    mount.start()
    mnt = mount.mountpoint
    go_offline(mnt)
    write_file(mnt / "flushed.txt", b"must reach the server")
    os.mkdir(mnt / "flushed_dir")
    control(mnt, "online")
    mount.stop()
    assert mount.process is not None and mount.process.poll() is not None
    assert (backend.share / "flushed.txt").read_bytes() == b"must reach the server"
    assert (backend.share / "flushed_dir").is_dir()
    mount.assert_clean_log()


def _prepare(root: Path) -> None:
    (root / "edit.txt").write_bytes(b"0123456789")
    (root / "gone.txt").write_bytes(b"bye")
    (root / "old.txt").write_bytes(b"old name")
    (root / "over_src.txt").write_bytes(b"source")
    (root / "over_dst.txt").write_bytes(b"destination to be replaced")
    (root / "emptydir").mkdir()
    (root / "tree" / "sub").mkdir(parents=True)
    (root / "tree" / "top.txt").write_bytes(b"top")
    (root / "tree" / "sub" / "deep.txt").write_bytes(b"deep")


def _change(root: Path) -> None:
    write_file(root / "new.txt", b"brand new\n" * 3)
    os.mkdir(root / "newdir")
    write_file(root / "newdir" / "inner.txt", b"inner")
    with open(root / "edit.txt", "r+b") as f:
        f.seek(3)
        f.write(b"XYZ")
    os.truncate(root / "over_src.txt", 3)
    os.rmdir(root / "emptydir")
    os.unlink(root / "gone.txt")
    os.rename(root / "old.txt", root / "renamed.txt")
    os.rename(root / "over_src.txt", root / "over_dst.txt")
    os.rename(root / "tree", root / "moved_tree")
    os.rename(root / "newdir" / "inner.txt", root / "moved_tree" / "sub" / "inner.txt")


def _contents(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (not .cachefs), a folder as None: what any protocol keeps."""
    found: dict[str, bytes | None] = {}
    for folder, dirs, files in os.walk(root):
        rel = os.path.relpath(folder, root)
        if rel == ".":
            dirs[:] = [d for d in dirs if d != ".cachefs"]
        for d in dirs:
            found[os.path.normpath(os.path.join(rel, d))] = None
        for f in files:
            found[os.path.normpath(os.path.join(rel, f))] = Path(folder, f).read_bytes()
    return found


def test_each_change_offline_is_journaled_then_replayed(backend: Backend, tmp_path: Path) -> None:
    """Write, create, mkdir, rename (a file over another, a folder), unlink, rmdir offline
    (the server stopped): journaled, shown offline, replayed after the server is back.
    Contents and names only (test_writes checks modes and times where they are kept)."""
    _prepare(backend.share)
    model = tmp_path / "model"
    model.mkdir()
    _prepare(model)
    with backend.mount() as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        backend.go_offline()
        wait_state(mnt, "offline")
        _change(mnt)
        _change(model)
        assert _contents(mnt) == _contents(model)
        assert status(mnt)["pending"] > 0
        backend.come_back()
        assert (backend.share / "old.txt").exists() and not (backend.share / "new.txt").exists()
        sync_until_done(mnt)
        shown = status(mnt)
        assert shown["pending"] == 0 and shown["conflicts"] == 0, shown
        assert _contents(backend.share) == _contents(model)
        assert _contents(mnt) == _contents(model)
    assert no_temp_leftovers(backend.share) == []


# -- conflicts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("server_change", ["plain", "keeping size and mtime second"])
def test_changed_on_both_sides(backend: Backend, server_change: str) -> None:
    """Changed here offline and on the server: the server's version keeps the name, this
    side's goes to a conflict copy, recorded. ``keeping size and mtime second``: the
    server's change keeps both (a fix of one character saved twice in a second), which
    each protocol's version still tells (SFTP: the SHA-256 the server computes before a
    replace; a local path: the mtime's nanoseconds; WebDAV: the ETag; SMB: file id and
    change time)."""
    share = backend.share
    (share / "report.txt").write_bytes(b"base version")
    theirs = b"remote version" if server_change == "plain" else b"server edit!"
    with backend.mount() as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        go_offline(mnt)
        write_file(mnt / "report.txt", b"local version, longer")
        if server_change == "plain":
            change_on_server(share / "report.txt", theirs)
        else:
            same_second_rewrite(share / "report.txt", theirs)
        control(mnt, "online")
        sync(mnt)
        assert (share / "report.txt").read_bytes() == theirs
        copies = copies_of(share, "report.txt")
        assert len(copies) == 1, os.listdir(share)
        assert (share / copies[0]).read_bytes() == b"local version, longer"
        record = assert_recorded(mnt, "report.txt", "changed-both")
        assert record.get("conflict_path") == copies[0]
        assert status(mnt)["pending"] == 0
        mount_shows(mnt, {"report.txt": theirs, copies[0]: b"local version, longer"})
        assert sorted(os.listdir(mnt)) == sorted(["report.txt", copies[0]])
        shows_conflict(mnt / "report.txt", mnt / copies[0])
        assert path_state_line(mnt / copies[0]).split(None, 2)[2] == "conflict (changed-both)"
        control(mnt, "resolve report.txt both")
        assert state_of(mnt / "report.txt") != "conflict"
        assert state_of(mnt / copies[0]) != "conflict"




def test_a_change_of_letter_case_is_a_rename_not_a_conflict(backend: Backend) -> None:
    """``mv readme README``, online and replayed from offline: one file under the new
    name, no conflict copy — on a case-insensitive server (SMB) too, where the new name
    already names the file itself."""
    share = backend.share
    (share / "readme").write_bytes(b"one")
    (share / "notes").write_bytes(b"two")
    with backend.mount() as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        os.rename(mnt / "readme", mnt / "README")
        sync(mnt)
        go_offline(mnt)
        os.rename(mnt / "notes", mnt / "Notes")
        control(mnt, "online")
        sync(mnt)
        assert sorted(os.listdir(share)) == ["Notes", "README"]
        assert (share / "README").read_bytes() == b"one" and (share / "Notes").read_bytes() == b"two"
        assert sorted(os.listdir(mnt)) == ["Notes", "README"]
        assert status(mnt)["conflicts"] == 0 and status(mnt)["pending"] == 0


def test_deleted_here_changed_there(backend: Backend) -> None:
    """Offline because the server went away."""
    (backend.share / "notes.txt").write_bytes(b"base")
    with backend.mount() as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        backend.go_offline()
        wait_state(mnt, "offline")
        os.unlink(mnt / "notes.txt")
        change_on_server(backend.server_side / "notes.txt", b"changed there")
        backend.come_back()
        wait_state(mnt, "online")
        sync(mnt)
        share = backend.share
        assert (share / "notes.txt").read_bytes() == b"changed there"
        assert copies_of(share, "notes.txt") == []
        assert_recorded(mnt, "notes.txt", "deleted-local-changed-remote")
        mount_shows(mnt, {"notes.txt": b"changed there"})
        # (the server's version came back: its name carries the state)
        shows_conflict(mnt / "notes.txt")
        assert path_state_line(mnt / "notes.txt").endswith("conflict (deleted-local-changed-remote)")


def test_changed_here_deleted_there(backend: Backend) -> None:
    share = backend.share
    (share / "draft.md").write_bytes(b"base")
    with backend.mount() as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        go_offline(mnt)
        write_file(mnt / "draft.md", b"changed here")
        (share / "draft.md").unlink()
        control(mnt, "online")
        sync(mnt)
        assert (share / "draft.md").read_bytes() == b"changed here"
        assert_recorded(mnt, "draft.md", "deleted-remote-changed-local")
        mount_shows(mnt, {"draft.md": b"changed here"})
        shows_conflict(mnt / "draft.md")
        control(mnt, "resolve draft.md local")
        assert state_of(mnt / "draft.md") != "conflict"


def test_created_here_onto_name_that_appeared_there(backend: Backend) -> None:
    share = backend.share
    with backend.mount() as mount:
        mnt = mount.mountpoint
        go_offline(mnt)
        write_file(mnt / "new.txt", b"made here")
        (share / "new.txt").write_bytes(b"made there!")
        control(mnt, "online")
        sync(mnt)
        assert (share / "new.txt").read_bytes() == b"made there!"
        copies = copies_of(share, "new.txt")
        assert len(copies) == 1, os.listdir(share)
        assert (share / copies[0]).read_bytes() == b"made here"
        assert_recorded(mnt, "new.txt", "changed-both")
        mount_shows(mnt, {"new.txt": b"made there!", copies[0]: b"made here"})
        shows_conflict(mnt / "new.txt", mnt / copies[0])


def test_renamed_here_onto_name_that_appeared_there(backend: Backend) -> None:
    """A rename here onto a name that was free, made there meanwhile: the server's file
    keeps the name (the rename refuses an existing target on every protocol)."""
    share = backend.share
    (share / "a.txt").write_bytes(b"content of a")
    with backend.mount() as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        go_offline(mnt)
        os.rename(mnt / "a.txt", mnt / "b.txt")
        (share / "b.txt").write_bytes(b"b made there")
        control(mnt, "online")
        sync(mnt)
        assert not (share / "a.txt").exists()
        assert (share / "b.txt").read_bytes() == b"b made there"
        copies = copies_of(share, "b.txt")
        assert len(copies) == 1, os.listdir(share)
        assert (share / copies[0]).read_bytes() == b"content of a"
        assert status(mnt)["conflicts"] >= 1
        assert any(r.get("conflict_path") == copies[0] for r in conflict_records(mnt)), \
            conflict_records(mnt)
        mount_shows(mnt, {"b.txt": b"b made there", copies[0]: b"content of a"})
        wait_for(lambda: "a.txt" not in os.listdir(mnt), REFRESH, "a.txt gone from the mount")
        record = assert_recorded(mnt, "a.txt", "renamed-onto-new-remote")
        assert record.get("target") == "b.txt", record
        shows_conflict(mnt / "b.txt", mnt / copies[0])


# -- pin and eviction ---------------------------------------------------------------------------

def test_pinned_folder_reads_whole_with_server_stopped(backend: Backend) -> None:
    share = backend.share
    docs = share / "docs"
    (docs / "sub").mkdir(parents=True)
    files = {
        "docs/a.txt": b"alpha\n",
        "docs/big.bin": os.urandom(5 * MiB + 17),
        "docs/empty": b"",
        "docs/sub/c.txt": b"gamma\n" * 1000,
    }
    for rel, data in files.items():
        (share / rel).write_bytes(data)
    (share / "outside.txt").write_bytes(b"not pinned\n")
    with backend.mount() as mount:
        mnt = mount.mountpoint
        listdir(mnt)
        assert state(mnt / "docs/big.bin") == "remote"
        command(mnt, "pin docs")
        current = status(mnt)
        assert current["pinned"] == ["/docs"], current
        for rel in files:
            assert state(mnt / rel) == "pinned", rel
        assert state(mnt / "outside.txt") == "remote"

        # Appears on the server after the pin: fetched at the next sync.
        files["docs/sub/later.txt"] = b"added on the server later\n"
        (share / "docs/sub/later.txt").write_bytes(files["docs/sub/later.txt"])
        command(mnt, "sync")

        backend.go_offline()
        for rel, data in files.items():
            assert read_bounded(mnt / rel) == data, f"{rel} differs with the server stopped"
            assert state(mnt / rel) == "pinned", rel
        assert errno_of(lambda: (mnt / "outside.txt").read_bytes(), "read outside") == errno.EHOSTDOWN
        assert status(mnt)["state"] == "offline"
        assert status(mnt)["pinned"] == ["/docs"]


def test_a_walk_through_small_files_brings_the_next_folders_ahead(backend: Backend) -> None:
    """On a fast link too: the second small file read in a folder looks like a program
    going through a tree (grep -r, tar, a build); the folder's other small files and those
    of its listed sibling folders are fetched in the background (the same cap as on a slow
    link, 4 MiB), so the next folders do not each begin with a wait. The bytes that come
    are the server's; a folder not listed yet is not fetched; a big file is not."""
    share = backend.share
    folders = [f"d{i:02d}" for i in range(8)]
    files = {f"{name}/f{j}": os.urandom(500 + j) for name in folders for j in range(4)}
    for rel, data in files.items():
        (share / "tree" / rel).parent.mkdir(parents=True, exist_ok=True)
        (share / "tree" / rel).write_bytes(data)
    (share / "tree" / "d00" / "big.bin").write_bytes(os.urandom(2 * MiB))
    (share / "other").mkdir()
    (share / "other" / "f").write_bytes(b"not listed")
    with backend.mount() as mount:
        tree = mount.mountpoint / "tree"
        for name in folders:  # (listed: what a walk's look-ahead does)
            listdir(tree / name)
        for rel in ("d00/f0", "d00/f1"):
            assert (tree / rel).read_bytes() == files[rel]
        wait_for(lambda: all(state(tree / rel) == "cached" for rel in files), 10,
                 "the small files of the folder and of its siblings to be cached")
        assert state(tree / "d00" / "big.bin") == "remote"
        assert state(mount.mountpoint / "other" / "f") == "remote"
        backend.go_offline()
        for rel, data in files.items():
            assert read_bounded(tree / rel) == data, rel


def test_cache_size_limit_evicts_lru_but_not_pinned(backend: Backend) -> None:
    share = backend.share
    limit = 2 * MiB
    data = {}
    for i in range(5):
        data[f"a{i}.bin"] = os.urandom(MiB)
    (share / "pinned").mkdir()
    for i in range(3):
        data[f"pinned/p{i}.bin"] = os.urandom(MiB)
    for rel, content in data.items():
        (share / rel).write_bytes(content)
    with backend.mount("--cache-size", "2M") as mount:
        mnt = mount.mountpoint
        assert status(mnt)["cache_limit"] == limit
        listdir(mnt)
        for i in range(5):
            assert read_bounded(mnt / f"a{i}.bin") == data[f"a{i}.bin"]
            wait_for(lambda: status(mnt)["cache_bytes"] <= limit, 10,
                     f"usage under the limit after reading a{i}.bin ({status(mnt)})")
        assert state(mnt / "a4.bin") == "cached"  # the most recent stays
        assert state(mnt / "a0.bin") == "remote"  # the least recent went
        assert status(mnt)["over_limit_pinned"] is False

        # Pinned data alone beyond the limit: kept whole, and reported.
        command(mnt, "pin pinned")
        wait_for(lambda: status(mnt)["over_limit_pinned"] is True, 10,
                 f"over_limit_pinned with 3 MiB pinned ({status(mnt)})")
        assert status(mnt)["cache_bytes"] >= 3 * MiB
        backend.go_offline()
        for i in range(3):
            rel = f"pinned/p{i}.bin"
            assert state(mnt / rel) == "pinned"
            assert read_bounded(mnt / rel) == data[rel], rel


# -- kill -9 ------------------------------------------------------------------------------------

def test_kill9_during_offline_writes(backend: Backend, tmp_path: Path) -> None:
    """Offline because the server stopped; the mount is killed; everything survives."""
    share = backend.share
    (share / "existing.txt").write_bytes(b"old content")
    model = tmp_path / "model"
    shutil.copytree(share, model)
    mount = backend.mount(name="mnt", check_log=False)
    mount.start()
    mnt = mount.mountpoint
    read_all(mnt)
    backend.go_offline()
    wait_state(mnt, "offline")

    def work(root: Path) -> None:
        for i in range(8):
            write_file(root / f"f{i}.bin", bytes([i]) * (1000 * (i + 1)), fsync=i % 2 == 0)
        os.mkdir(root / "sub")
        write_file(root / "sub" / "inner.txt", b"inner", fsync=True)
        with open(root / "existing.txt", "ab") as f:
            f.write(b" + appended")

    work(mnt)
    work(model)
    mount.kill9()
    assert "Traceback" not in mount.log_text()
    backend.come_back()
    assert not (share / "f0.bin").exists()
    with backend.mount(name="mnt") as again:
        control(again.mountpoint, "online")
        sync_until_done(again.mountpoint)
        assert status(again.mountpoint)["pending"] == 0
        assert _contents(share) == _contents(model)
        assert _contents(again.mountpoint) == _contents(model)
        if backend.caps.modes:
            assert_same_tree(share, model, "the server")
    assert no_temp_leftovers(share) == []


def test_kill9_during_replay(backend: Backend, tmp_path: Path) -> None:
    share = backend.share
    model = tmp_path / "model"
    model.mkdir()
    count = 300
    mount = backend.mount(name="mnt", check_log=False)
    mount.start()
    mnt = mount.mountpoint
    go_offline(mnt)
    for root in (mnt, model):
        os.mkdir(root / "many")
        for i in range(count):
            write_file(root / "many" / f"n{i:03d}.txt", f"file {i}\n".encode() * (i % 7 + 1))
    start_pending = status(mnt)["pending"]
    assert start_pending >= count
    control(mnt, "online")
    began = time.monotonic()
    seen = start_pending
    while time.monotonic() - began < 10:
        seen = status(mnt)["pending"]
        if 0 < seen < start_pending - 20 or (time.monotonic() - began > 0.2 and seen < start_pending):
            break
        time.sleep(0.01)
    mount.kill9()
    on_server = len(os.listdir(share / "many")) if (share / "many").exists() else 0
    assert on_server < count, "the replay finished before the kill: the test proves nothing"
    with backend.mount(name="mnt") as again:
        sync_until_done(again.mountpoint)
        assert status(again.mountpoint)["pending"] == 0
        assert _contents(share) == _contents(model)
        assert _contents(again.mountpoint) == _contents(model)
        if backend.caps.modes:
            assert_same_tree(share, model, "the server")
    assert no_temp_leftovers(share) == []


# -- faults through the relay -------------------------------------------------------------------

@NETWORK_ONLY
def test_cut_mid_read_of_large_file(backend: Backend) -> None:
    """The link is cut while a large file is read: every read returns the right bytes or
    an errno, never wrong bytes, and the file reads whole once the link is back."""
    proxy = backend.proxied()
    data = os.urandom(40 << 20)
    (backend.share / "big.bin").write_bytes(data)
    with backend.mount(through=proxy, check_log=False) as mount:
        mnt = mount.mountpoint
        reader = ChunkReader(mnt / "big.bin", data)
        reader.start()
        assert reader.first.wait(30)
        proxy.cut()
        reader.go.set()
        check_reader(reader)
        proxy.resume()
        read_whole_eventually(mnt / "big.bin", data)
        assert status(mnt)["state"] in ("online", "syncing")
        assert "Traceback" not in mount.log_text()


@NETWORK_ONLY
def test_trickle_link_transfers_complete_and_stay_online(backend: Backend) -> None:
    """A link of 1 MB/s: reading 4 MiB and uploading 3 MiB each take longer than the
    2-second timeout; both complete, correct, and the mount never goes offline."""
    proxy = backend.proxied()
    big = os.urandom(4 << 20)
    (backend.share / "slow-read.bin").write_bytes(big)
    upload = os.urandom(3 << 20)
    with backend.mount(through=proxy, check_log=False) as mount:
        mnt = mount.mountpoint
        os.listdir(mnt)
        go_offline(mnt)
        write_file(mnt / "slow-write.bin", upload)
        control(mnt, "online")
        wait_for(lambda: status(mnt)["connectivity"] == "online", 15, "the mount to reconnect")
        proxy.throttle(1_000_000)
        states = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                states.append(status(mnt)["connectivity"])
                time.sleep(0.25)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            start = time.monotonic()
            got = run_with_timeout(lambda: (mnt / "slow-read.bin").read_bytes(), 60, "a slow read")
            took = time.monotonic() - start
            assert sha(got) == sha(big)
            assert took > 2, f"the read took {took:.1f} s: the link was not slow"
            sync_until_done(mnt, 60)
        finally:
            stop.set()
            watcher.join(5)
            proxy.throttle(None)
        assert sha((backend.share / "slow-write.bin").read_bytes()) == sha(upload)
        assert set(states) == {"online"}, f"went offline on a slow link: {states}"


@NETWORK_ONLY
def test_link_cut_mid_upload_leaves_no_half_file(backend: Backend) -> None:
    """The link is cut while a file written offline is being uploaded: nobody sees half of
    it under its name on the server, and it is uploaded whole once the link is back."""
    proxy = backend.proxied()
    data = os.urandom(1 << 20) * 16
    size, digest = len(data), hashlib.sha256(data).hexdigest()
    share = backend.share
    with backend.mount(through=proxy, check_log=False) as mount:
        mnt = mount.mountpoint
        go_offline(mnt)
        write_file(mnt / "big.bin", data)
        proxy.throttle(4 << 20)  # 4 s for the whole file: time to cut it in the middle
        control(mnt, "online")
        # (a file's bytes count in the progress once it is sent whole: the pass's start
        # is what shows; at 4 MiB/s, a second later the file is a quarter on its way)
        wait_for(lambda: status(mnt)["progress"] is not None, 15, "the replay to begin",
                 interval=0.01)
        time.sleep(1.0)
        proxy.cut()
        try:
            seen_partial = partial_sizes(share, {"big.bin": size}, 3)
            assert not seen_partial, f"big.bin seen with partial sizes {seen_partial[:5]}"
            assert not (share / "big.bin").exists(), "the upload finished before the cut"
            assert status(mnt)["pending"] > 0
        finally:
            proxy.throttle(None)
            proxy.resume()
        sync_until_done(mnt, 60)
        assert (share / "big.bin").stat().st_size == size
        assert hashlib.sha256((share / "big.bin").read_bytes()).hexdigest() == digest
        assert status(mnt)["pending"] == 0
    assert no_temp_leftovers(share) == [], "temporary upload files left on the server"


@NETWORK_ONLY
def test_stall_during_replay(backend: Backend) -> None:
    """The link goes silent while files are replayed: none is seen half written under its
    name, and all are replayed whole once the link moves again."""
    proxy = backend.proxied()
    share = backend.share
    files = {f"up{i}.bin": os.urandom(6 << 20) for i in range(4)}
    with backend.mount(through=proxy, check_log=False) as mount:
        mnt = mount.mountpoint
        go_offline(mnt)
        for name, data in files.items():
            write_file(mnt / name, data)
        proxy.throttle(4 << 20)  # 1.5 s a file: the stall finds the replay under way
        control(mnt, "online")
        wait_for(lambda: status(mnt)["progress"] is not None, 15, "the replay to begin",
                 interval=0.005)
        time.sleep(0.5)
        proxy.stall()
        try:
            partial = partial_sizes(share, {name: len(data) for name, data in files.items()}, 4)
            assert not partial, f"partial files under their real names: {partial[:5]}"
            assert status(mnt)["pending"] > 0, "the replay finished before the stall"
        finally:
            proxy.throttle(None)
            proxy.resume()
        sync_until_done(mnt, 60)
        for name, data in files.items():
            assert sha((share / name).read_bytes()) == sha(data), name
        assert status(mnt)["pending"] == 0
        assert no_temp_leftovers(share) == []


# -- names --------------------------------------------------------------------------------------

HOSTILE = [b"with  spaces", "\u00e9t\u00e9 \U0001f600".encode(), b"#hash%percent?query",
           b"new\nline", b"ctl\x01\x07\x1b[31mred", b"bad\xff\xfeutf8", b"tab\tand space ",
           b"n" * 251 + b".txt", b"-rf", b"\xe2\x80\xaeevil", b"trailing dot.", b"CON"]


def test_hostile_names(backend: Backend) -> None:
    """Names the protocol carries: a server's file is listed, read and written back
    unchanged, and one made offline reaches the server under the same bytes. Names it
    refuses: made in the mount they fail at once with a clear errno, never later at replay."""
    carried = [n for n in HOSTILE if backend.refuses(n) is None]
    refused_names = {n: why for n in HOSTILE if (why := backend.refuses(n)) is not None}
    share_b = os.fsencode(backend.share)
    for i, name in enumerate(carried):
        with open(os.path.join(share_b, name), "wb") as f:
            f.write(b"content %d" % i)
    with backend.mount(allowed_errors=[r"cannot|invalid|name"]) as mount:
        mnt = os.fsencode(mount.mountpoint)
        listed = set(os.listdir(mnt)) - {b".cachefs"}
        assert listed == set(carried), f"listed {sorted(listed)}"
        for i, name in enumerate(carried):
            with open(os.path.join(mnt, name), "rb") as f:
                assert f.read() == b"content %d" % i, name
        for name in refused_names:
            want, why = refused_names[name]
            began = time.monotonic()
            attempts = {
                "create": lambda n=name: open(os.path.join(mnt, n), "xb").close(),
                "mkdir": lambda n=name: os.mkdir(os.path.join(mnt, n)),
                "rename onto": lambda n=name: os.rename(os.path.join(mnt, carried[0]), os.path.join(mnt, n)),
            }
            for what, attempt in attempts.items():
                got = errno_of(attempt, f"{what} {name!r}")
                assert got == want, f"{what} {name!r}: {got and errno.errorcode[got]}, " \
                                    f"want {errno.errorcode[want]} ({why})"
            assert time.monotonic() - began < 3.0, f"refusing {name!r} took long"
        assert status(mount.mountpoint)["pending"] == 0  # a refused name left nothing to replay
        for i, name in enumerate(carried):
            with open(os.path.join(mnt, name), "ab") as f:
                f.write(b"!")
        sync_until_done(mount.mountpoint)
        for i, name in enumerate(carried):
            with open(os.path.join(share_b, name), "rb") as f:
                assert f.read() == b"content %d!" % i, name
        # made offline, replayed under the same bytes; a refused name fails offline too
        go_offline(mount.mountpoint)
        os.mkdir(os.path.join(mnt, b"made"))
        for name in refused_names:
            got = errno_of(lambda n=name: open(os.path.join(mnt, b"made", n), "xb").close(),
                           f"create {name!r} offline")
            assert got == refused_names[name][0], f"create {name!r} offline: {got}"
        for i, name in enumerate(carried):
            with open(os.path.join(mnt, b"made", name), "wb") as f:
                f.write(b"made %d" % i)
        control(mount.mountpoint, "online")
        sync_until_done(mount.mountpoint)
        shown = status(mount.mountpoint)
        assert shown["pending"] == 0 and shown["conflicts"] == 0, shown
        assert set(os.listdir(os.path.join(share_b, b"made"))) == set(carried)
        for i, name in enumerate(carried):
            with open(os.path.join(share_b, b"made", name), "rb") as f:
                assert f.read() == b"made %d" % i, name


def test_symlinks_where_carried_else_eperm_at_once(backend: Backend) -> None:
    share = backend.share
    (share / "target.txt").write_bytes(b"target")
    with backend.mount() as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        if not backend.caps.symlinks:
            began = time.monotonic()
            assert errno_of(lambda: os.symlink("target.txt", mnt / "link"), "symlink") == errno.EPERM
            assert time.monotonic() - began < 2.0
            assert status(mnt)["pending"] == 0
            go_offline(mnt)  # (offline too: refused at once, nothing journaled)
            assert errno_of(lambda: os.symlink("target.txt", mnt / "link"), "symlink") == errno.EPERM
            assert status(mnt)["pending"] == 0 and not os.path.lexists(mnt / "link")
            return
        go_offline(mnt)
        os.symlink("target.txt", mnt / "link")
        os.symlink("../no/such/thing", mnt / "dangling")
        assert os.readlink(mnt / "link") == "target.txt"
        control(mnt, "online")
        sync_until_done(mnt)
        assert os.readlink(share / "link") == "target.txt"
        assert os.readlink(share / "dangling") == "../no/such/thing"
        assert (mnt / "link").read_bytes() == b"target"


def test_hard_links_where_carried_else_eperm_at_once(backend: Backend) -> None:
    share = backend.share
    (share / "first.txt").write_bytes(b"one file")
    with backend.mount() as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        if not backend.caps.hard_links:
            began = time.monotonic()
            assert errno_of(lambda: os.link(mnt / "first.txt", mnt / "second.txt"), "link") == errno.EPERM
            assert time.monotonic() - began < 2.0
            assert status(mnt)["pending"] == 0
            go_offline(mnt)  # (offline too: refused at once, nothing journaled)
            assert errno_of(lambda: os.link(mnt / "first.txt", mnt / "second.txt"), "link") == errno.EPERM
            assert status(mnt)["pending"] == 0 and not os.path.lexists(mnt / "second.txt")
            return
        go_offline(mnt)
        os.link(mnt / "first.txt", mnt / "second.txt")
        assert os.stat(mnt / "first.txt").st_ino == os.stat(mnt / "second.txt").st_ino
        control(mnt, "online")
        sync_until_done(mnt)
        assert os.stat(share / "first.txt").st_ino == os.stat(share / "second.txt").st_ino
        assert (share / "second.txt").read_bytes() == b"one file"


def test_modes_reach_the_server_where_kept(backend: Backend) -> None:
    """chmod reaches the server on a protocol that keeps permission bits. Elsewhere it is
    accepted and kept in the cache, nothing is refused or left pending, the server's file
    is untouched, and the server's answer wins at its next listing (docs/handlers.md)."""
    share = backend.share
    (share / "f.txt").write_bytes(b"mode")
    os.chmod(share / "f.txt", 0o644)
    with backend.mount() as mount:
        mnt = mount.mountpoint
        read_all(mnt)
        os.chmod(mnt / "f.txt", 0o600)
        sync_until_done(mnt)
        shown = status(mnt)
        assert shown["pending"] == 0 and shown["conflicts"] == 0, shown
        time.sleep(ATTR_TIMEOUT + 0.5)  # the server's attributes are read again
        os.listdir(mnt)
        here = stat.S_IMODE(os.stat(mnt / "f.txt").st_mode)
        there = stat.S_IMODE(os.stat(share / "f.txt").st_mode)
        if backend.caps.modes:
            assert (here, there) == (0o600, 0o600), (oct(here), oct(there))
        else:  # the protocol has no chmod
            assert (here, there) == (0o644, 0o644), (oct(here), oct(there))
