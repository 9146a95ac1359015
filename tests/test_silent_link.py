"""A link that goes silent (packets dropped, a cable pulled, a server stopped: no reset)
while the mount is online (issue 22, item 8). Until a call's ``--timeout`` says the link
is down, the mount cannot know it; what it has cached must not wait for that: a read,
lookup or listing whose check would need the remote answers from the cache once the link
is *suspect* (a check unanswered for ``Connectivity.grace``, 1 s, and the ping sent
meanwhile too), and at once after
that; what it has not cached fails with EHOSTDOWN within ``--timeout``; and once the link
answers again, everything syncs.

Real mounts of the test sshd through ``TcpProxy``, whose ``stall`` stops moving bytes on
every connection without closing any (the silent link)."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

from tests.fixtures.mount import status
from tests.fixtures.proxy import TcpProxy, proxied
from tests.test_control import command, wait_for
from tests.test_writes import sync_until_done, write_file

TIMEOUT = 6.0  # --timeout: what says the link is down
ATTR_TIMEOUT = 1.0
CACHED_BOUND = 2.5  # a cached answer on a silent link: ~1 s the first time (generous here)
AT_ONCE = 0.5  # ... and afterwards (the link is suspect already)
STAGGER = 3.0  # a second request this long after the first that will find the link down


def read_all(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def timed(function):
    """(seconds, result or the OSError raised)."""
    start = time.monotonic()
    try:
        result = function()
    except OSError as exc:
        result = exc
    return time.monotonic() - start, result


@pytest.mark.parametrize("callbacks", ["off", "auto"])
def test_cached_data_answers_on_a_silent_link(mount_factory, sshd, share: Path, tmp_path: Path,
                                              callbacks: str) -> None:
    (share / "docs").mkdir()
    (share / "docs" / "cached.txt").write_bytes(b"cached\n")
    (share / "docs" / "never-read.txt").write_bytes(b"not cached\n")
    (share / "other").mkdir()
    (share / "other" / "x.txt").write_bytes(b"x\n")
    (share / "a-unlisted").mkdir()  # (before "docs": a walk lists the folders after it ahead)
    (share / "a-unlisted" / "u.txt").write_bytes(b"u\n")
    with TcpProxy(sshd.host, sshd.port) as proxy:
        with proxied(mount_factory, sshd, proxy, tmp_path, "--callbacks", callbacks,
                     timeout=str(TIMEOUT), attr_timeout=str(ATTR_TIMEOUT), heartbeat="30",
                     check_log=False) as mount:
            mnt = mount.mountpoint
            assert read_all(mnt / "docs" / "cached.txt") == b"cached\n"
            assert sorted(os.listdir(mnt / "docs")) == ["cached.txt", "never-read.txt"]
            assert os.listdir(mnt / "other") == ["x.txt"]
            proxy.stall()
            try:
                time.sleep(ATTR_TIMEOUT + 0.5)  # every check has run out: the next needs the remote
                took, got = timed(lambda: read_all(mnt / "docs" / "cached.txt"))
                assert got == b"cached\n", got
                assert took < CACHED_BOUND, f"a cached read waited {took:.2f} s on a silent link"
                took, got = timed(lambda: sorted(os.listdir(mnt / "docs")))
                assert got == ["cached.txt", "never-read.txt"] and took < AT_ONCE, (took, got)
                took, got = timed(lambda: os.listdir(mnt / "other"))
                assert got == ["x.txt"] and took < AT_ONCE, (took, got)
                took, got = timed(lambda: read_all(mnt / "docs" / "cached.txt"))
                assert got == b"cached\n" and took < AT_ONCE, (took, got)
                # never fetched: the remote is needed, and the link is down once a call's
                # --timeout has passed (this one's at most); a folder never listed, asked
                # for meanwhile, fails as soon as that is known, not at its own timeout
                unlisted: list = []
                lister = threading.Thread(target=lambda: (time.sleep(STAGGER), unlisted.append(
                    timed(lambda: os.listdir(mnt / "a-unlisted")))))
                lister.start()
                took, got = timed(lambda: read_all(mnt / "docs" / "never-read.txt"))
                assert isinstance(got, OSError) and got.errno == errno.EHOSTDOWN, got
                assert took < TIMEOUT + 2, f"an uncached read failed only after {took:.2f} s"
                lister.join(TIMEOUT + 5)
                took, got = unlisted[0]
                assert isinstance(got, OSError) and got.errno == errno.EHOSTDOWN, got
                assert took < TIMEOUT - STAGGER + 1.5, f"a folder never listed failed after {took:.2f} s"
                wait_for(lambda: status(mnt)["state"] == "offline", TIMEOUT + 2, "the mount offline")
                took, got = timed(lambda: read_all(mnt / "docs" / "never-read.txt"))
                assert isinstance(got, OSError) and got.errno == errno.EHOSTDOWN and took < AT_ONCE, (took, got)
                # changed while offline: journaled, replayed once the link is back
                write_file(mnt / "docs" / "new.txt", b"written while silent\n")
                (share / "other" / "y.txt").write_bytes(b"made on the server meanwhile\n")
            finally:
                proxy.resume()
            sync_until_done(mnt, 40)
            assert (share / "docs" / "new.txt").read_bytes() == b"written while silent\n"
            assert os.listdir(mnt / "a-unlisted") == ["u.txt"]
            assert read_all(mnt / "docs" / "never-read.txt") == b"not cached\n"
            wait_for(lambda: "y.txt" in os.listdir(mnt / "other"), ATTR_TIMEOUT + 5,
                     "the server's change seen once the link is back")
            assert status(mnt)["pending"] == 0
        assert "Traceback" not in mount.log_text()


def test_a_slow_answer_still_counts(mount_factory, sshd, share: Path, tmp_path: Path) -> None:
    """A link that answers within the grace is not suspect: a server change shows after
    --attr-timeout, as on a healthy link (the check is waited for, not skipped)."""
    (share / "f.txt").write_bytes(b"one\n")
    with TcpProxy(sshd.host, sshd.port) as proxy:
        with proxied(mount_factory, sshd, proxy, tmp_path, "--callbacks", "off",
                     attr_timeout=str(ATTR_TIMEOUT)) as mount:
            mnt = mount.mountpoint
            assert read_all(mnt / "f.txt") == b"one\n"
            proxy.throttle(20_000)  # bytes a second: slower, still answering within 1 s
            (share / "f.txt").write_bytes(b"two, longer\n")
            time.sleep(ATTR_TIMEOUT + 0.3)
            assert read_all(mnt / "f.txt") == b"two, longer\n"
            proxy.throttle(None)


def test_a_long_call_on_a_live_link_makes_no_link_suspect(mount_factory, sshd, share: Path,
                                                           tmp_path: Path) -> None:
    """A call that takes long on a link that answers (a large folder's first listing on
    a slow link) does not make the link suspect: a cached file opened meanwhile is
    checked, and a server change shows within --attr-timeout and a few round trips."""
    (share / "big").mkdir()
    for i in range(4000):
        (share / "big" / f"a-file-with-a-rather-long-name-{i:05}.txt").write_bytes(b"")
    (share / "small").mkdir()
    (share / "small" / "f.txt").write_bytes(b"one\n")
    with TcpProxy(sshd.host, sshd.port) as proxy:
        with proxied(mount_factory, sshd, proxy, tmp_path, "--callbacks", "off",
                     timeout=str(TIMEOUT), attr_timeout=str(ATTR_TIMEOUT), heartbeat="30") as mount:
            mnt = mount.mountpoint
            assert read_all(mnt / "small" / "f.txt") == b"one\n"
            proxy.throttle(100_000)  # bytes a second: the listing of "big" takes seconds
            listed: list = []
            lister = threading.Thread(target=lambda: listed.append(timed(lambda: os.listdir(mnt / "big"))))
            lister.start()
            try:
                time.sleep(1.5)  # (longer than the grace, and --attr-timeout has passed)
                assert not listed, "the listing was not long"
                (share / "small" / "f.txt").write_bytes(b"two, longer\n")
                took, got = timed(lambda: read_all(mnt / "small" / "f.txt"))
                assert got == b"two, longer\n", (took, got)
                assert took < 2.0, took  # (the checks waited for: a few round trips)
                assert not listed, "the listing was not long"
            finally:
                lister.join(TIMEOUT * 3)
                proxy.throttle(None)
            took, got = listed[0]
            assert len(got) == 4000, (took, got)


def test_a_change_made_while_a_check_goes_on_survives_its_answer(mount_factory, sshd, share: Path,
                                                                 tmp_path: Path) -> None:
    """A file's check at open goes on in the background on a suspect link; the file is
    written here meanwhile. When the server answers (its version changed), what it says
    is not applied over the local change: the content stays, the file stays dirty, and
    the change reaches the server (beside the server's version: both changed). (In a
    folder too large to be checked by its listing: the file's own stat is the check.)"""
    from cachefs.cache.listing import CHECK_BY_LISTING
    (share / "big").mkdir()
    for i in range(CHECK_BY_LISTING):
        (share / "big" / f"{i:04}").write_bytes(b"")
    path = share / "big" / "f.txt"
    path.write_bytes(b"one\n")
    with TcpProxy(sshd.host, sshd.port) as proxy:
        with proxied(mount_factory, sshd, proxy, tmp_path, "--callbacks", "off",
                     timeout=str(TIMEOUT), attr_timeout=str(ATTR_TIMEOUT), heartbeat="30",
                     check_log=False) as mount:
            mnt = mount.mountpoint
            assert read_all(mnt / "big" / "f.txt") == b"one\n"
            # opened again through /proc: no lookup, whose folder's check would go first
            held = os.open(mnt / "big" / "f.txt", os.O_RDONLY)
            again = f"/proc/self/fd/{held}"
            proxy.stall()
            try:
                time.sleep(ATTR_TIMEOUT + 0.5)
                path.write_bytes(b"ONE\n")  # the server's version changes
                took, got = timed(lambda: read_all(Path(again)))  # its check goes on in the background
                assert got == b"one\n" and took < CACHED_BOUND, (took, got)
                with open(again, "ab") as f:
                    f.write(b"two\n")
                os.close(held)
                assert os.getxattr(mnt / "big" / "f.txt", "user.cachefs.state") == b"dirty"
                command(mnt, "offline")  # (no replay yet: the check's answer is what is tested)
            finally:
                proxy.resume()
            time.sleep(1.5)  # the check answered, from the server as it was before the change
            assert read_all(mnt / "big" / "f.txt") == b"one\ntwo\n"
            assert os.getxattr(mnt / "big" / "f.txt", "user.cachefs.state") == b"dirty"
            assert status(mnt)["pending"] == 1
            command(mnt, "online")
            sync_until_done(mnt, 40)
            assert status(mnt)["pending"] == 0
            assert sorted(p.read_bytes() for p in (share / "big").iterdir() if p.stat().st_size) \
                == [b"ONE\n", b"one\ntwo\n"]
            assert sorted(read_all(p) for p in (mnt / "big").iterdir() if p.stat().st_size) \
                == [b"ONE\n", b"one\ntwo\n"]
        assert "Traceback" not in mount.log_text()


def test_a_check_leaves_a_file_open_for_writing_as_it_is(mount_factory, share: Path) -> None:
    """A file open for writing that has not been written yet: a check at another open
    that finds the server's version changed does not drop its content under the writer
    (what it writes next changes the version it opened)."""
    from cachefs.cache.listing import CHECK_BY_LISTING
    (share / "big").mkdir()  # (too large to be checked by its listing: the stat is the check)
    for i in range(CHECK_BY_LISTING):
        (share / "big" / f"{i:04}").write_bytes(b"")
    (share / "big" / "f.txt").write_bytes(b"one\n")
    mount = mount_factory("--callbacks", "off", attr_timeout=str(ATTR_TIMEOUT))
    with mount:
        mnt = mount.mountpoint
        assert read_all(mnt / "big" / "f.txt") == b"one\n"
        writer = os.open(mnt / "big" / "f.txt", os.O_WRONLY)
        try:
            (share / "big" / "f.txt").write_bytes(b"server's\n")
            time.sleep(ATTR_TIMEOUT + 0.5)
            assert read_all(Path(f"/proc/self/fd/{writer}")) == b"one\n"  # (no lookup: the file's own check)
            os.pwrite(writer, b"ONE", 0)
        finally:
            os.close(writer)
        assert read_all(mnt / "big" / "f.txt") == b"ONE\n"
        sync_until_done(mnt, 30)
        assert sorted(p.read_bytes() for p in (share / "big").iterdir() if p.stat().st_size) \
            == [b"ONE\n", b"server's\n"]


@pytest.mark.parametrize("callbacks", ["auto", "off"])
def test_a_file_a_listing_left_to_its_writer_is_checked_after(mount_factory, share: Path,
                                                               callbacks: str) -> None:
    """A listing that leaves a file open for writing as it was (the server changed it)
    does not count as its check: once the writer closes without writing, the next open
    gets the server's version (with callbacks, a listing stays current until the next
    change told, and this change's was used up by that listing)."""
    (share / "d").mkdir()
    (share / "d" / "f.txt").write_bytes(b"one\n")
    mount = mount_factory("--callbacks", callbacks, attr_timeout=str(ATTR_TIMEOUT))
    with mount:
        mnt = mount.mountpoint
        assert read_all(mnt / "d" / "f.txt") == b"one\n"
        if callbacks == "auto":
            wait_for(lambda: status(mnt)["callbacks"]["live"], 15, "callbacks live")
        writer = os.open(mnt / "d" / "f.txt", os.O_RDWR)
        try:
            (share / "d" / "f.txt").write_bytes(b"server's new\n")
            time.sleep(ATTR_TIMEOUT + 1.5)  # (the watcher tells; the folder is listed again)
            os.listdir(mnt / "d")  # (listed again, by time, without callbacks)
        finally:
            os.close(writer)  # nothing written
        time.sleep(ATTR_TIMEOUT + 0.5)
        assert read_all(mnt / "d" / "f.txt") == b"server's new\n"


def test_a_writer_of_a_file_deleted_there_keeps_it(mount_factory, share: Path) -> None:
    """A file open for writing that the server deletes stays listed here while open; what
    is written then is journaled and replayed as a file changed here and deleted there
    (it comes back on the server, and the conflict is recorded)."""
    from tests.test_conflicts import assert_recorded
    (share / "d").mkdir()
    (share / "d" / "f.txt").write_bytes(b"one\n")
    mount = mount_factory("--callbacks", "off", attr_timeout=str(ATTR_TIMEOUT))
    with mount:
        mnt = mount.mountpoint
        assert read_all(mnt / "d" / "f.txt") == b"one\n"
        writer = os.open(mnt / "d" / "f.txt", os.O_RDWR)
        try:
            (share / "d" / "f.txt").unlink()
            time.sleep(ATTR_TIMEOUT + 0.5)
            assert os.listdir(mnt / "d") == ["f.txt"]  # (listed again: kept for its writer)
            assert os.pwrite(writer, b"MINE", 0) == 4
        finally:
            os.close(writer)
        assert status(mnt)["pending"]
        sync_until_done(mnt, 30)
        assert (share / "d" / "f.txt").read_bytes() == b"MINE"
        assert_recorded(mnt, "d/f.txt", "deleted-remote-changed-local")
        assert read_all(mnt / "d" / "f.txt") == b"MINE"


def test_a_writer_s_file_deleted_there_goes_once_closed(mount_factory, share: Path) -> None:
    """With callbacks live, a file kept for its writer though the server deleted it is
    gone from the folder once the writer closes without writing (the folder's listing,
    which left it to the writer, is made again)."""
    (share / "d").mkdir()
    (share / "d" / "f.txt").write_bytes(b"one\n")
    mount = mount_factory("--callbacks", "auto", attr_timeout=str(ATTR_TIMEOUT))
    with mount:
        mnt = mount.mountpoint
        assert read_all(mnt / "d" / "f.txt") == b"one\n"
        wait_for(lambda: status(mnt)["callbacks"]["live"], 15, "callbacks live")
        writer = os.open(mnt / "d" / "f.txt", os.O_RDWR)
        try:
            (share / "d" / "f.txt").unlink()
            time.sleep(2.0)  # (the watcher tells; the folder is listed again)
            assert os.listdir(mnt / "d") == ["f.txt"]
        finally:
            os.close(writer)
        time.sleep(0.5)
        assert os.listdir(mnt / "d") == []
        assert status(mnt)["pending"] == 0


# -- the rule itself, in process: calls held in their threads are the silent link ---------

def _silenceable_remote(share: Path, silent: threading.Event):
    """A local folder whose pings wait for ``silent`` once ``mute`` is set (a silent link
    answers nothing, not even a ping)."""
    from cachefs.remote.local import LocalRemote

    class Remote(LocalRemote):
        muted = False

        def ping(self) -> None:
            if self.muted:
                silent.wait(20)
            super().ping()

    return Remote(str(share), 10.0)


def test_suspect_after_the_grace_and_cached_answers_meanwhile(share: Path) -> None:
    import trio

    from cachefs.errors import RemoteError
    from cachefs.link.connectivity import Connectivity

    silent = threading.Event()
    remote = _silenceable_remote(share, silent)

    async def main() -> None:
        conn = Connectivity(remote)
        assert await conn.try_connect()
        assert conn.grace == 1.0 and not conn.suspect

        def held() -> str:
            silent.wait(20)
            return "late answer"

        def long_call() -> str:
            time.sleep(1.6)
            return "long"

        async with trio.open_nursery() as nursery:
            # an answer within the grace is waited for; its errors reach the caller
            async def quick() -> str:
                return await conn.call(conn.remote.stat, b"") and "checked"
            for short in (False, True):
                assert await conn.unless_suspect(quick, nursery, short=short) == "checked"

            async def refused() -> str:
                raise RemoteError(2, "gone")
            for short in (False, True):
                with pytest.raises(RemoteError):
                    await conn.unless_suspect(refused, nursery, short=short)

            # a call that takes long on a live link (a sync's hashes) makes no link suspect
            nursery.start_soon(conn.call, held)
            await trio.sleep(1.3)
            assert not conn.suspect
            assert await conn.unless_suspect(quick, nursery, short=True) == "checked"
            # ... nor does a check that takes long itself: the ping sent meanwhile answers
            async def long_check() -> str:
                return await conn.call(long_call)
            for short in (False, True):
                started = trio.current_time()
                assert await conn.unless_suspect(long_check, nursery, short=short) == "long"
                assert trio.current_time() - started > 1.5 and not conn.suspect

            # the link goes silent: pings too go unanswered
            remote.muted = True
            await trio.sleep(0.3)
            applied: list[str] = []

            async def check() -> str:
                applied.append(await conn.call(held))
                return "fresh"
            for short in (True, False):
                started = trio.current_time()
                assert await conn.unless_suspect(check, nursery, short=short) is None  # the cached answer
                waited = trio.current_time() - started
                if short:
                    assert 0.8 < waited < 1.3, waited  # the grace since the check began
                    assert conn.suspect and conn.online
                else:
                    assert waited < 0.05  # suspect: at once, nothing sent
            silent.set()  # the link answers again: the check that went on is applied
            remote.muted = False
            with trio.fail_after(5):
                while not applied:
                    await trio.sleep(0.01)
            await trio.sleep(0.1)
            assert applied == ["late answer"] and not conn.suspect

    trio.run(main)


@pytest.mark.parametrize("width", [1, 4])
def test_busy_slots_make_no_link_suspect(share: Path, width: int) -> None:
    """Every connection slot held by long calls on a live link (a sync's hashes, a big
    listing): a check, and the ping sent while it waits, wait for a slot; a ping not sent
    yet says nothing of the link, so the check is waited for, not answered from the cache
    (and the link is not suspect); a ping's round trip is timed from when it has its slot."""
    import trio

    from cachefs.link.connectivity import Connectivity
    from cachefs.remote.local import LocalRemote

    remote = LocalRemote(str(share), 10.0)
    remote.parallelism = width

    async def main() -> None:
        conn = Connectivity(remote)
        assert await conn.try_connect()

        def long_call() -> str:
            time.sleep(2.0)
            return "long"

        async def quick() -> str:
            return await conn.call(conn.remote.stat, b"", looks_only=True) and "checked"

        async def long_listing() -> str:
            return await conn.call(long_call, looks_only=True)

        async with trio.open_nursery() as nursery:
            for short, work in ((True, quick), (False, long_listing)):
                for _ in range(width):
                    nursery.start_soon(conn.call, long_call)
                await trio.sleep(0.1)
                started = trio.current_time()
                assert await conn.unless_suspect(work, nursery, short=short) is not None
                assert trio.current_time() - started > 1.5 and not conn.suspect
                await trio.sleep(0.1)
            # the ping's clock starts with its slot
            nursery.start_soon(conn.call, long_call)
            await trio.sleep(0.1)
            await conn.ping()
            assert conn._rtts[-1] < 0.5, conn._rtts

    trio.run(main)


def test_offline_asked_while_a_connection_attempt_runs_stays_offline(tmp_path: Path) -> None:
    """``offline`` written while the probe's connect is under way: the attempt succeeds
    after it, and the mount stays offline by request (it went online, undoing the user's
    word, and an offline test then synced against the server)."""
    import trio

    from cachefs.link.connectivity import Connectivity, State
    from cachefs.remote.local import LocalRemote

    release = threading.Event()
    entered = threading.Event()

    class SlowConnect(LocalRemote):
        def connect(self) -> None:
            entered.set()
            release.wait(10)
            super().connect()

    (tmp_path / "share").mkdir()
    conn = Connectivity(SlowConnect(str(tmp_path / "share"), 10.0), heartbeat=0.1, max_backoff=0.1)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            while not entered.is_set():
                await trio.sleep(0.01)
            conn.work_offline()
            release.set()
            await trio.sleep(0.5)
            assert conn.state is State.WORK_OFFLINE
            assert not await conn.try_connect()
            nursery.cancel_scope.cancel()

    trio.run(main)
