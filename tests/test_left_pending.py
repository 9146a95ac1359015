"""Changes left pending at unmount (issue 22, item 9): ``cachefs unmount`` says how many
stay in the cache, and the next mount replays them as soon as it is online, not at its
first full sync (``--sync-interval``, 300 s by default). Real mounts of the test sshd."""

from __future__ import annotations

import re
import time
from pathlib import Path

from tests.fixtures.mount import is_mounted, status
from tests.test_cli import cachefs, ok
from tests.test_control import go_offline, wait_for, write


def test_unmount_says_how_many_changes_stay_and_the_next_mount_replays_them(
        mount_factory, share: Path) -> None:
    (share / "kept.txt").write_bytes(b"old\n")
    with mount_factory() as mount:
        mnt = mount.mountpoint
        assert (mnt / "kept.txt").read_bytes() == b"old\n"
        go_offline(mnt)
        write(mnt / "new.txt", b"made offline\n")
        write(mnt / "kept.txt", b"changed offline\n")
        (mnt / "sub").mkdir()
        wait_for(lambda: status(mnt)["pending"] == 3, 10, "three changes journaled")
        result = ok(cachefs("unmount", str(mnt)))
        assert not is_mounted(mnt)
        told = [line for line in result.stderr.splitlines() if line.startswith("cachefs:")]
        assert len(told) == 1, result.stderr
        assert re.search(r"\b3 changes are not on the server yet: kept pending", told[0]), told[0]
        assert mount.remote in told[0] and "next mount" in told[0], told[0]
    assert not (share / "new.txt").exists() and not (share / "sub").exists()

    # The next mount (the default --sync-interval: 300 s) is online at once: the
    # changes reach the server within seconds, with no local change to start a replay.
    started = time.monotonic()
    with mount_factory("--sync-interval", "300") as mount:
        wait_for(lambda: (share / "new.txt").exists() and (share / "sub").is_dir()
                 and (share / "kept.txt").read_bytes() == b"changed offline\n", 15,
                 "the changes left by the earlier mount on the server")
        took = time.monotonic() - started
        assert (share / "new.txt").read_bytes() == b"made offline\n"
        wait_for(lambda: status(mount.mountpoint)["pending"] == 0, 10, "nothing pending")
        # nothing left: unmount says nothing of pending changes
        result = ok(cachefs("unmount", str(mount.mountpoint)))
        assert "pending" not in result.stderr, result.stderr
    assert took < 15


def test_changes_left_by_a_mount_that_starts_offline_go_when_the_server_comes_back(
        mount_factory, sshd, share: Path) -> None:
    with mount_factory() as mount:
        mnt = mount.mountpoint
        go_offline(mnt)
        write(mnt / "late.txt", b"waited\n")
        wait_for(lambda: status(mnt)["pending"] == 1, 10, "the change journaled")
        result = ok(cachefs("unmount", str(mnt)))
        assert "cachefs: 1 change is not on the server yet: kept pending" in result.stderr, result.stderr
    sshd.stop()
    try:
        with mount_factory("--sync-interval", "300", check_log=False) as mount:
            assert status(mount.mountpoint)["state"] == "offline"
            time.sleep(1)
            assert not (share / "late.txt").exists()
            sshd.start()
            wait_for(lambda: (share / "late.txt").exists(), 20, "the change replayed once the server is back")
            assert (share / "late.txt").read_bytes() == b"waited\n"
    finally:
        if not sshd.running:
            sshd.start()
