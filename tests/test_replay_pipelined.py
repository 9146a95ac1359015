"""The pipelined replay (issue 21): the uploads of a batch go together, many small files
on one connection in a few round trips; order is kept where paths depend on each other;
a kill -9 or a cut link in the middle of such a pass loses nothing and leaves nothing
behind on the server.

Real mounts against the test sshd; faults through ``TcpProxy``. Speed is not asserted
here (the relay benchmarks measure it); that the uploads went together is, from the
mount's log.
"""

from __future__ import annotations

import os
import re
import stat
import time
from pathlib import Path

import pytest

from tests.fixtures.proxy import TcpProxy, proxied
from tests.test_writes import control, go_offline, no_temp_leftovers, status, sync_until_done, wait_for, write_file


def _server_tree(share: Path) -> dict[str, object]:
    """Every path under ``share``: a folder's mode, a file's bytes and mode, a link's target."""
    tree: dict[str, object] = {}
    for folder, dirs, files in os.walk(share):
        for name in dirs + files:
            path = Path(folder) / name
            rel = str(path.relative_to(share))
            st = path.lstat()
            if stat.S_ISDIR(st.st_mode):
                tree[rel] = ("dir", stat.S_IMODE(st.st_mode))
            elif stat.S_ISLNK(st.st_mode):
                tree[rel] = ("link", os.readlink(path))
            else:
                tree[rel] = ("file", path.read_bytes(), stat.S_IMODE(st.st_mode))
    return tree


def _grouped_uploads(log: str) -> list[int]:
    """How many files each grouped upload of the log carried."""
    return [int(n) for n in re.findall(r"uploading (\d+) files in \d+ jobs", log)]


@pytest.mark.parametrize("folders", [1, 4])
def test_a_hundred_creates_reach_the_server_together(mount_factory, share: Path, folders: int) -> None:
    files = {f"d{i % folders}/f{i}": os.urandom(4096) for i in range(100)}
    with mount_factory() as mount:
        mnt = mount.mountpoint
        for f in range(folders):
            os.mkdir(mnt / f"d{f}")  # (a folder made here, then files inside: in that order)
        for name, data in files.items():
            write_file(mnt / name, data)
        sync_until_done(mnt)
        assert status(mnt)["pending"] == 0
        grouped = _grouped_uploads(mount.log_text())
    for name, data in files.items():
        assert (share / name).read_bytes() == data, name
    assert no_temp_leftovers(share) == []
    assert sum(grouped) == 100 and max(grouped) > 1, f"the creates were not uploaded together: {grouped}"


def test_attributes_of_many_files_go_together(mount_factory, share: Path) -> None:
    """chmod and touch of 60 files the server has, in three folders: sent at once, each
    lands on its own file."""
    for f in range(3):
        (share / f"s{f}").mkdir()
        for i in range(20):
            (share / f"s{f}" / f"x{i}").write_bytes(b"x")
    with mount_factory() as mount:
        mnt = mount.mountpoint
        for f in range(3):
            for i in range(20):
                path = mnt / f"s{f}" / f"x{i}"
                os.chmod(path, 0o600 if i % 2 else 0o640)
                os.utime(path, (1_000_000_000 + i, 1_000_000_000 + i))
        sync_until_done(mnt)
        assert status(mnt)["pending"] == 0 and status(mnt)["conflicts"] == 0
        grouped = [int(n) for n in re.findall(r"setting the attributes of (\d+) objects at once", mount.log_text())]
    for f in range(3):
        for i in range(20):
            st = (share / f"s{f}" / f"x{i}").stat()
            assert stat.S_IMODE(st.st_mode) == (0o600 if i % 2 else 0o640), (f, i)
            assert int(st.st_mtime) == 1_000_000_000 + i, (f, i)
    assert grouped and max(grouped) > 1, f"the attributes were not sent together: {grouped}"


def test_a_file_open_for_writing_holds_back_only_itself_and_what_follows(mount_factory, share: Path) -> None:
    """Its upload waits for its last close; the creates beside it in the same batch go."""
    others = {f"o{i}": os.urandom(100) for i in range(10)}
    with mount_factory() as mount:
        mnt = mount.mountpoint
        with open(mnt / "held.log", "wb") as held:
            held.write(b"first line\n")
            held.flush()
            for name, data in others.items():
                write_file(mnt / name, data)
            wait_for(lambda: all((share / n).exists() for n in others), 20,
                     "the files beside the open one on the server")
            assert not (share / "held.log").exists()
            held.write(b"second line\n")
        sync_until_done(mnt)
    assert (share / "held.log").read_bytes() == b"first line\nsecond line\n"
    for name, data in others.items():
        assert (share / name).read_bytes() == data


def test_dependent_paths_keep_their_order(mount_factory, share: Path) -> None:
    """Made offline, replayed in one pass: folders before what goes in them, a rename
    after the create of what it renames, a name used again after its file moved away,
    a mode set after the create."""
    (share / "old").mkdir()
    (share / "old" / "kept.txt").write_bytes(b"kept")
    with mount_factory() as mount:
        mnt = mount.mountpoint
        os.listdir(mnt / "old")
        go_offline(mnt)
        os.makedirs(mnt / "a" / "b")
        for i in range(20):
            write_file(mnt / "a" / "b" / f"f{i}", b"f%d" % i)
        write_file(mnt / "g", b"g first")
        os.rename(mnt / "g", mnt / "a" / "b" / "g2")
        write_file(mnt / "g", b"g second")  # (the name again, another file)
        write_file(mnt / "x", b"x")
        os.rename(mnt / "x", mnt / "y")
        os.chmod(mnt / "y", 0o600)
        os.mkdir(mnt / "c")
        write_file(mnt / "c" / "h", b"h")
        os.rename(mnt / "c", mnt / "c2")
        write_file(mnt / "c2" / "i", b"i")
        os.rename(mnt / "old" / "kept.txt", mnt / "a" / "kept.txt")
        os.rmdir(mnt / "old")
        control(mnt, "online")
        sync_until_done(mnt)
        assert status(mnt)["pending"] == 0 and status(mnt)["conflicts"] == 0
    tree = _server_tree(share)
    expected_files = {f"a/b/f{i}": b"f%d" % i for i in range(20)}
    expected_files.update({"a/b/g2": b"g first", "g": b"g second", "y": b"x", "c2/h": b"h",
                           "c2/i": b"i", "a/kept.txt": b"kept"})
    assert {k for k, v in tree.items() if v[0] == "file"} == set(expected_files)
    for name, data in expected_files.items():
        assert tree[name][1] == data, name
    assert tree["y"][2] == 0o600
    assert {k for k, v in tree.items() if v[0] == "dir"} == {"a", "a/b", "c2"}


def _offline_creates(mnt: Path, count: int, size: int) -> dict[str, bytes]:
    go_offline(mnt)
    os.mkdir(mnt / "up")
    files = {f"up/f{i:03}": os.urandom(size) for i in range(count)}
    for name, data in files.items():
        write_file(mnt / name, data)
    return files


def _check_all_there(share: Path, files: dict[str, bytes]) -> None:
    wrong = [name for name, data in files.items()
             if not (share / name).exists() or (share / name).read_bytes() != data]
    assert not wrong, f"missing or wrong on the server: {wrong[:5]}"
    assert sorted(os.listdir(share / "up")) == sorted(n.split("/")[1] for n in files), \
        "other files on the server (conflict copies, temporary files)"


def test_kill9_in_the_middle_of_a_pipelined_pass_loses_nothing(mount_factory, sshd, share: Path,
                                                               tmp_path: Path) -> None:
    with TcpProxy(sshd.host, sshd.port) as proxy:
        mount = proxied(mount_factory, sshd, proxy, tmp_path, check_log=False).start()
        files = _offline_creates(mount.mountpoint, 100, 24 << 10)
        proxy.throttle(150_000)  # (a pass of several seconds)
        control(mount.mountpoint, "online")
        wait_for(lambda: any(".cachefs-tmp-" in n for n in os.listdir(share / "up")), 20,
                 "the pass to start uploading", interval=0.005)
        landed = len([n for n in os.listdir(share / "up") if ".cachefs-tmp-" not in n])
        mount.kill9()
        assert landed < 100, "the pass ended before the kill"
        proxy.throttle(None)
        with proxied(mount_factory, sshd, proxy, tmp_path, name="mnt2") as again:
            sync_until_done(again.mountpoint, 60)
            assert status(again.mountpoint)["pending"] == 0
            assert status(again.mountpoint)["conflicts"] == 0
            for name, data in files.items():
                assert (again.mountpoint / name).read_bytes() == data, name
    _check_all_there(share, files)


def test_a_cut_link_in_the_middle_of_a_pipelined_pass_loses_nothing(mount_factory, sshd, share: Path,
                                                                    tmp_path: Path) -> None:
    with TcpProxy(sshd.host, sshd.port) as proxy:
        with proxied(mount_factory, sshd, proxy, tmp_path, check_log=False) as mount:
            mnt = mount.mountpoint
            files = _offline_creates(mnt, 100, 24 << 10)
            proxy.throttle(150_000)
            control(mnt, "online")
            wait_for(lambda: any(".cachefs-tmp-" in n for n in os.listdir(share / "up")), 20,
                     "the pass to start uploading", interval=0.005)
            proxy.cut()
            assert status(mnt)["pending"] > 0, "the pass ended before the cut"
            proxy.throttle(None)
            proxy.resume()
            sync_until_done(mnt, 60)
            assert status(mnt)["pending"] == 0 and status(mnt)["conflicts"] == 0
    _check_all_there(share, files)


# -- trickle: write-back on a weak link -----------------------------------------------------

def _through_relay(mount_factory, sshd, relay, tmp_path: Path, *extra: str, **kw):
    """A mount of ``sshd``'s share through a ``WanRelay`` (its own known_hosts line)."""
    known_hosts = tmp_path / "known_hosts_relay"
    key_type, key_b64 = sshd.host_key_pub.read_text().split()[:2]
    known_hosts.write_text(f"[127.0.0.1]:{relay.port} {key_type} {key_b64}\n")
    remote = sshd.address().replace(f":{sshd.port}/", f":{relay.port}/", 1)
    return mount_factory(*extra, remote=remote, known_hosts=known_hosts, **kw)


def test_a_read_during_a_large_upload_on_a_slow_link_is_not_starved(mount_factory, sshd, share: Path,
                                                                      tmp_path: Path) -> None:
    """1 Mbit/s, 50 ms: an uncached 100 KiB file read while a 3 MiB upload (25 s of the
    link) is under way comes within 2 s: the upload keeps its queue on the link short."""
    from devtools.wanrelay import WanRelay

    (share / "docs").mkdir()
    wanted = os.urandom(100 << 10)
    (share / "docs" / "wanted.bin").write_bytes(wanted)
    big = os.urandom(3 << 20)
    with WanRelay(target=(sshd.host, sshd.port), rtt_ms=50, rate_bit=1e6) as relay:
        with _through_relay(mount_factory, sshd, relay, tmp_path, timeout="10", attr_timeout="3") as mount:
            mnt = mount.mountpoint
            os.listdir(mnt / "docs")
            write_file(mnt / "big.bin", big)
            wait_for(lambda: any(".cachefs-tmp-" in n and (share / n).stat().st_size > (64 << 10)
                                 for n in os.listdir(share)), 30, "the upload to be under way")
            started = time.monotonic()
            got = (mnt / "docs" / "wanted.bin").read_bytes()
            took = time.monotonic() - started
            uploading = any(".cachefs-tmp-" in n for n in os.listdir(share))
            relay.set(unlimited=True)
            sync_until_done(mnt, 60)
    assert got == wanted
    assert uploading, "the upload ended before the read did: nothing was measured"
    assert took <= 2.0, f"the read took {took:.2f} s during the upload"
    assert (share / "big.bin").read_bytes() == big


def test_the_upload_limit_caps_the_write_back(mount_factory, share: Path) -> None:
    data = os.urandom(1 << 20)
    with mount_factory("-o", "upload_limit=256K") as mount:
        mnt = mount.mountpoint
        write_file(mnt / "capped.bin", data)
        started = time.monotonic()
        wait_for(lambda: (share / "capped.bin").exists(), 30, "the upload", interval=0.02)
        took = time.monotonic() - started
    assert (share / "capped.bin").read_bytes() == data
    assert took >= 0.8 * len(data) / (256 << 10), f"1 MiB sent in {took:.2f} s under a 256 KiB/s cap"


@pytest.mark.parametrize("text, rate", [("256K", 256 << 10), ("2M", 2 << 20), ("8Mbit", 1e6),
                                        ("100kbit/s", 12500), ("1048576", 1 << 20)])
def test_upload_limit_rates(text: str, rate: float) -> None:
    from cachefs.cli import _upload_limit

    assert _upload_limit(text) == rate


@pytest.mark.parametrize("text", ["", "fast", "-1M", "1X", "100", "0.5K"])
def test_upload_limit_refuses(text: str) -> None:
    import argparse

    from cachefs.cli import _upload_limit

    with pytest.raises(argparse.ArgumentTypeError):
        _upload_limit(text)
