"""Server callbacks (``cache.callbacks``, ``remote.watch``): a watcher on the server tells
each change; while it runs, cached listings and attributes are used without a look at the
remote, and a change on the server shows on the mount within 2 s. Real sshd, real
mounts, the real watchers (inotifywait and the python3 script), a real stalled link."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from cachefs.remote.watch import ChangeStream
from tests.fixtures.mount import status
from tests.fixtures.proxy import TcpProxy, proxied

WATCHERS = ["inotifywait", "python3"]


def _wait_for(what: str, test: Callable[[], Any], within: float) -> float:
    """Seconds until ``test()`` is true; fails after ``within``."""
    start = time.monotonic()
    while True:
        try:
            if test():
                return time.monotonic() - start
        except OSError:
            pass
        if time.monotonic() - start > within:
            raise AssertionError(f"{what}: not within {within:g} s")
        time.sleep(0.05)


def _live(mnt: Path, within: float = 15) -> None:
    _wait_for("callbacks live", lambda: status(mnt)["callbacks"]["live"], within)


def _watcher_niceness(share: Path) -> list[int]:
    """The niceness of the watcher processes on the server (this machine) watching ``share``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if os.fsencode(share) in args and any(a.endswith((b"inotifywait", b"python3")) for a in args[:1]):
            found.append(int(fields[16]))  # (field 19 of /proc/PID/stat: nice)
    return found


def _fill(share: Path) -> None:
    (share / "d").mkdir()
    for i in range(5):
        (share / "d" / f"f{i}").write_bytes(b"x" * 100)
    (share / "top.txt").write_bytes(b"top")


@pytest.mark.parametrize("watcher", WATCHERS)
def test_a_server_change_shows_on_the_mount_within_2s(mount_factory, share: Path, watcher: str) -> None:
    """With --attr-timeout 60 only the callbacks can bring these changes in time: new file,
    content, mode, removal, a new folder and a file in it, a rename."""
    _fill(share)
    with mount_factory("--callbacks", watcher, attr_timeout="60") as m:
        mnt = m.mountpoint
        assert sorted(os.listdir(mnt / "d")) == [f"f{i}" for i in range(5)]
        assert (mnt / "d" / "f0").read_bytes() == b"x" * 100
        _live(mnt)
        assert os.stat(mnt / "d" / "f1").st_mode & 0o777 != 0o600

        (share / "d" / "new").write_bytes(b"new")
        _wait_for("new file", lambda: (mnt / "d" / "new").read_bytes() == b"new", 2)
        (share / "d" / "f0").write_bytes(b"changed!")
        _wait_for("changed content", lambda: (mnt / "d" / "f0").read_bytes() == b"changed!", 2)
        os.chmod(share / "d" / "f1", 0o600)
        _wait_for("mode", lambda: os.stat(mnt / "d" / "f1").st_mode & 0o777 == 0o600, 2)
        (share / "d" / "f2").unlink()
        _wait_for("removal", lambda: not (mnt / "d" / "f2").exists(), 2)
        (share / "d" / "sub").mkdir()
        (share / "d" / "sub" / "inner").write_bytes(b"in")
        _wait_for("new folder", lambda: (mnt / "d" / "sub" / "inner").read_bytes() == b"in", 2)
        os.rename(share / "top.txt", share / "d" / "moved.txt")
        _wait_for("rename", lambda: not (mnt / "top.txt").exists()
                  and (mnt / "d" / "moved.txt").read_bytes() == b"top", 2)
        st = status(mnt)
        assert st["callbacks"]["live"] and st["callbacks"]["changes"] > 0
        assert _watcher_niceness(share) == [10], "the watcher runs at a lower priority (renice 10)"
        m.assert_clean_log()


def test_cached_data_costs_no_round_trip_while_callbacks_live(mount_factory, sshd, share: Path,
                                                              tmp_path: Path) -> None:
    """Past --attr-timeout, listings, stats and reads of cached files are answered at once
    with the link stalled: nothing waits for a check (without callbacks each would wait
    for --timeout)."""
    _fill(share)
    with TcpProxy(sshd.host, sshd.port) as proxy:
        with proxied(mount_factory, sshd, proxy, tmp_path, timeout="8", heartbeat="60") as m:
            mnt = m.mountpoint
            _live(mnt)
            names = sorted(os.listdir(mnt / "d"))
            contents = {n: (mnt / "d" / n).read_bytes() for n in names}
            assert (mnt / "top.txt").read_bytes() == b"top"
            time.sleep(2.5)  # past --attr-timeout (1 s) and the kernel's own caches
            proxy.stall()
            try:
                start = time.monotonic()
                assert sorted(os.listdir(mnt / "d")) == names
                for n in names:
                    os.stat(mnt / "d" / n)
                    assert (mnt / "d" / n).read_bytes() == contents[n]
                assert (mnt / "top.txt").read_bytes() == b"top"
                took = time.monotonic() - start
            finally:
                proxy.resume()
            assert took < 2, f"cached reads waited on the stalled link: {took:.1f} s"


def test_folders_listed_as_the_callbacks_go_live_stay_current(mount_factory, sshd, share: Path,
                                                              tmp_path: Path) -> None:
    """50 ms link: a program lists folders over and over while the watcher starts, so a
    listing is on its way as the callbacks go live. Every folder is listed again once they
    are live (the one on its way too: begun before, it counted by time only), and past
    --attr-timeout none of them costs a round trip (that one used to cost one)."""
    from devtools.wanrelay import WanRelay
    from tests.test_replay_pipelined import _through_relay

    folders = [f"d{i:02d}" for i in range(30)]
    for name in folders:
        (share / name).mkdir()
        (share / name / "f").write_bytes(b"f")
    with WanRelay(target=(sshd.host, sshd.port), rtt_ms=50, rate_bit=100e6) as relay:
        with _through_relay(mount_factory, sshd, relay, tmp_path, timeout="8", heartbeat="60") as m:
            mnt = m.mountpoint
            while not status(mnt)["callbacks"]["live"]:
                for name in folders:
                    os.listdir(mnt / name)
            time.sleep(2.5)  # past --attr-timeout (1 s) and the kernel's own caches
            start = time.monotonic()
            for name in folders:
                os.listdir(mnt / name)
                os.stat(mnt / name / "f")
            took = time.monotonic() - start
    assert took < 0.05, f"listings past --attr-timeout waited on the link: {took:.2f} s"


def test_without_callbacks_checks_by_time(mount_factory, share: Path) -> None:
    """--callbacks off: status says so; a server change shows after --attr-timeout."""
    _fill(share)
    with mount_factory("--callbacks", "off", attr_timeout="1") as m:
        mnt = m.mountpoint
        assert (mnt / "d" / "f0").read_bytes() == b"x" * 100
        st = status(mnt)["callbacks"]
        assert not st["live"] and "off" in st["off"]
        (share / "d" / "f0").write_bytes(b"changed!")
        _wait_for("changed content by time", lambda: (mnt / "d" / "f0").read_bytes() == b"changed!", 4)


def test_a_server_that_runs_no_commands_gets_time_checks(tmp_path: Path, share: Path) -> None:
    """ForceCommand internal-sftp: the watcher never starts; the mount says why and works."""
    from devtools.devserver import SshServer
    from tests.fixtures.mount import Mount

    _fill(share)
    server = SshServer(tmp_path / "sshd-sftp-only", share=share, force_internal_sftp=True)
    server.start()
    try:
        with Mount(server.address(), tmp_path / "mnt", tmp_path / "cache", "--identity", str(server.identity),
                   "--known-hosts", str(server.known_hosts), "--timeout", "2", "--attr-timeout", "1",
                   "-v") as m:
            mnt = m.mountpoint
            assert (mnt / "d" / "f0").read_bytes() == b"x" * 100
            _wait_for("the reason", lambda: "no commands" in (status(mnt)["callbacks"]["off"] or ""), 10)
            assert not status(mnt)["callbacks"]["live"]
            (share / "d" / "f0").write_bytes(b"changed!")
            _wait_for("changed content by time", lambda: (mnt / "d" / "f0").read_bytes() == b"changed!", 4)
    finally:
        server.stop()


def _watchers_of(share: Path) -> list[int]:
    """The inotifywait processes watching ``share``."""
    out = subprocess.run(["pgrep", "-x", "inotifywait"], capture_output=True, text=True).stdout
    found = []
    for pid in map(int, out.split()):
        try:
            if str(share).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


def test_a_watcher_that_dies_means_time_checks_at_once_then_a_new_watcher(mount_factory, share: Path) -> None:
    _fill(share)
    with mount_factory("--callbacks", "inotifywait", attr_timeout="1") as m:
        mnt = m.mountpoint
        _live(mnt)
        pids = _watchers_of(share)
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGKILL)
        _wait_for("callbacks off", lambda: not status(mnt)["callbacks"]["live"], 3)
        (share / "d" / "f0").write_bytes(b"changed!")
        _wait_for("changed content by time", lambda: (mnt / "d" / "f0").read_bytes() == b"changed!", 4)
        _live(mnt, within=20)  # started again after its first wait (5 s)
        (share / "d" / "f1").write_bytes(b"again")
        _wait_for("changed content by callback", lambda: (mnt / "d" / "f1").read_bytes() == b"again", 2)
    _wait_for("the watcher ended with the mount", lambda: not _watchers_of(share), 5)


def test_a_local_folder_is_watched_too(mount_factory, share: Path) -> None:
    _fill(share)
    with mount_factory(remote=str(share), attr_timeout="60") as m:
        mnt = m.mountpoint
        assert (mnt / "d" / "f0").read_bytes() == b"x" * 100
        _live(mnt)
        (share / "d" / "f0").write_bytes(b"local change")
        _wait_for("local change", lambda: (mnt / "d" / "f0").read_bytes() == b"local change", 2)
        assert len(_watchers_of(share)) == 1
    _wait_for("the watcher ended with the mount", lambda: not _watchers_of(share), 5)


def test_the_change_stream_gives_share_relative_paths() -> None:
    stream = ChangeStream(b"/srv/share")
    assert stream.feed(b"/srv/share/a/b\0/srv/share/c") == [b"a/b"]
    assert stream.feed(b"\xff\n\0/srv/share/\0/srv/share\0/srv/other/x\0") == [b"c\xff\n", b"", b""]
    assert stream.feed(b"/srv/share/d/\0") == [b"d"]
    root = ChangeStream(b"/")
    assert root.feed(b"/etc/x\0/\0") == [b"etc/x", b""]


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}).stdout


@pytest.mark.parametrize("callbacks", ["auto", "off"])
def test_git_commit_then_status_is_clean_while_the_server_tells_the_replay(mount_factory, share: Path,
                                                                           callbacks: str) -> None:
    """The replay's own changes come back as callbacks: the folders they touch are listed
    again while the journal still holds later changes of them. Nothing of the local state
    may go back to an older server state (git saw its new commit's files as changed)."""
    repo = share / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    for i in range(20):
        (repo / f"f{i}.txt").write_text(f"file {i}\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "one")
    with mount_factory("--callbacks", callbacks, timeout="10") as m:
        mnt = m.mountpoint / "repo"
        if callbacks != "off":
            _live(m.mountpoint)
        for round_ in range(3):
            assert _git(mnt, "status", "--porcelain") == ""
            (mnt / "f3.txt").write_text(f"changed {round_}\n")
            assert _git(mnt, "status", "--porcelain") == " M f3.txt\n"
            _git(mnt, "commit", "-qam", f"change {round_}")
            assert _git(mnt, "status", "--porcelain") == ""
            _wait_for("replayed", lambda: status(m.mountpoint)["pending"] == 0, 30)
            time.sleep(1.5)
            assert _git(mnt, "status", "--porcelain") == "", f"round {round_}"
        assert (mnt / "f3.txt").read_text() == "changed 2\n"
        assert status(m.mountpoint)["conflicts"] == 0
    assert _git(repo, "status", "--porcelain") == ""
    assert _git(repo, "log", "--format=%s", "-1") == "change 2\n"


def test_a_share_on_a_network_file_system_gets_time_checks(mount_factory, share: Path) -> None:
    """inotify sees only the changes made on its own machine: a share on NFS, SMB or FUSE
    (here: another cachefs mount) is never watched; the mount says why and checks by time."""
    _fill(share)
    with mount_factory(name="inner", cache="cache-inner") as inner:
        assert (inner.mountpoint / "d" / "f0").read_bytes() == b"x" * 100
        with mount_factory(remote=str(inner.mountpoint), name="outer", cache="cache-outer") as outer:
            assert (outer.mountpoint / "d" / "f0").read_bytes() == b"x" * 100
            _wait_for("the reason", lambda: "the share is on fuse" in (status(outer.mountpoint)["callbacks"]["off"] or ""), 10)
            assert not status(outer.mountpoint)["callbacks"]["live"]


def test_a_folder_renamed_here_is_checked_again_once_replayed(tmp_path: Path) -> None:
    """While a folder's rename waits in the journal, the server's changes under its old path
    find no folder here: once the rename is replayed, nothing listed before is trusted (in
    process: a real store and cache over a local share; the journal settled by hand)."""
    import trio

    from cachefs.cache.cache import Cache, CacheConfig
    from cachefs.link.connectivity import Connectivity
    from cachefs.remote.local import LocalRemote
    from cachefs.store.index import ROOT_INO, Store

    share = tmp_path / "share"
    (share / "A" / "sub").mkdir(parents=True)
    (share / "A" / "sub" / "f").write_bytes(b"v1")
    (tmp_path / "cache").mkdir(mode=0o700)
    store = Store(tmp_path / "cache", f"file://{share}")
    conn = Connectivity(LocalRemote(str(share), 10.0))

    async def main() -> None:
        await conn.first_connect()
        cache = Cache(store, conn, CacheConfig(attr_timeout=0.2, dir_timeout=0.2))
        listings = cache._listings
        listings.trust(time.monotonic() - 0.001)  # the callbacks went live
        folder = (await cache.lookup(ROOT_INO, b"A")).ino
        sub = (await cache.lookup(folder, b"sub")).ino
        await cache.listdir(sub)
        f = store.child(sub, b"f")
        assert f is not None
        await cache.rename(ROOT_INO, b"A", ROOT_INO, b"B")  # journaled, not replayed
        (share / "A" / "sub" / "f").write_bytes(b"version 2")  # told under a path unknown here
        assert listings.changed_remotely([b"A/sub/f"]) == {}
        os.rename(share / "A", share / "B")  # the replay
        for op in store.journal_ops():
            store.transact(lambda t, seq=op.seq: t.delete_op(seq))
            listings.op_done(op)
        await trio.sleep(0.5)  # past --attr-timeout
        node = store.get(f.ino)
        assert node is not None
        assert not listings.checked(node), "a listing from before the rename was still trusted"

    try:
        trio.run(main)
    finally:
        store.close()
