"""Reading over a slow, distant link (issue 21): the first small-file read in a folder
brings the small files of its sibling folders in the background, and a program's own read
never waits behind that prefetch. Real sshd behind ``devtools.wanrelay`` (a delaying,
rate-capped link), real mounts."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.test_replay_pipelined import _through_relay
from tests.test_writes import wait_for


def _state(path: Path) -> str:
    return os.getxattr(path, "user.cachefs.state").decode()


def test_a_first_small_read_brings_the_sibling_folders_before_and_after_it(
        mount_factory, sshd, share: Path, tmp_path: Path) -> None:
    """A tree read in an order of its own (git reads objects/xx/ by hash): a read in the
    last folder brings the folders before it too, not only those after it."""
    from devtools.wanrelay import WanRelay

    folders = [f"{i:02x}" for i in range(16)]
    for name in folders:
        (share / "objs" / name).mkdir(parents=True)
        for j in range(3):
            (share / "objs" / name / f"o{j}").write_bytes(os.urandom(300))
    with WanRelay(target=(sshd.host, sshd.port), rtt_ms=50, rate_bit=100e6) as relay:
        with _through_relay(mount_factory, sshd, relay, tmp_path, timeout="10") as mount:
            objs = mount.mountpoint / "objs"
            assert os.listdir(objs) == folders or sorted(os.listdir(objs)) == folders
            for name in folders:  # (listed: what a lookup's look-ahead does)
                os.listdir(objs / name)
            assert _state(objs / "00" / "o0") == "remote"
            assert (objs / folders[-1] / "o1").read_bytes() == (share / "objs" / folders[-1] / "o1").read_bytes()
            wait_for(lambda: all(_state(objs / name / f"o{j}") == "cached" for name in folders for j in range(3)),
                     10, "the sibling folders' small files to be cached")
            for name in folders:  # what came is the server's content
                for j in range(3):
                    assert (objs / name / f"o{j}").read_bytes() == (share / "objs" / name / f"o{j}").read_bytes()
            mount.assert_clean_log()


def test_a_read_does_not_wait_behind_the_prefetch_of_its_folder(
        mount_factory, sshd, share: Path, tmp_path: Path) -> None:
    """10 Mbit/s, 50 ms: a first read queues ~4 MiB of sibling folders' small files (3 s
    of the link); a file near the end of that queue, read at once, comes on the connection
    kept for programs' own requests, not after the files queued before it (it used to
    wait 1.6 s; now 0.8)."""
    from devtools.wanrelay import WanRelay

    folders = [f"d{i:02d}" for i in range(6)]
    for name in folders:
        (share / "tree" / name).mkdir(parents=True)
        for j in range(20):
            (share / "tree" / name / f"f{j:02d}").write_bytes(os.urandom(48 << 10))
    with WanRelay(target=(sshd.host, sshd.port), rtt_ms=50, rate_bit=10e6) as relay:
        with _through_relay(mount_factory, sshd, relay, tmp_path, timeout="10") as mount:
            tree = mount.mountpoint / "tree"
            for name in folders:
                os.listdir(tree / name)
            (tree / folders[0] / "f00").read_bytes()  # queues the rest
            wanted = tree / folders[4] / "f19"
            assert _state(wanted) == "remote"
            started = time.monotonic()
            got = wanted.read_bytes()
            took = time.monotonic() - started
            queued = sum(_state(tree / name / f"f{j:02d}") != "cached" for name in folders for j in range(20))
            relay.set(unlimited=True)
    assert got == (share / "tree" / folders[4] / "f19").read_bytes()
    assert queued > 20, "the prefetch was over before the read: nothing was measured"
    assert took < 1.2, f"the read waited {took:.2f} s behind the prefetch"
