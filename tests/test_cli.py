"""The ``cachefs`` command against real mounts: every sub-command as a user types it
(``.venv/bin/cachefs`` in a subprocess), its output, its exit status, progress on a
terminal and off one, and the fstab / ``mount -t fuse.cachefs`` forms. Every wait is bounded
and every mount is taken down.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.mount import REPO, fusermount_unmount, is_mounted, status
from tests.fixtures.proxy import TcpProxy, proxied
from tests.test_control import (
    MiB, change_on_server, conflict_copies, go_offline, read, state, wait_for, write,
)

CACHEFS = str(Path(sys.executable).with_name("cachefs"))
RUN_TIMEOUT = 60.0
SUBCOMMANDS = {
    "mount": ["--cache-dir", "--identity", "--cache-size", "--sync-interval", "-o", "--nonempty"],
    "unmount": ["--lazy", "--wait"],
    "status": ["--json"],
    "sync": ["PATH"],
    "offline": ["PATH"],
    "online": ["PATH"],
    "pin": ["PATH"],
    "unpin": ["PATH"],
    "evict": ["PATH"],
    "conflicts": ["--json"],
    "resolve": ["--keep", "local", "remote", "both"],
    "list": ["--json", "--timeout"],
    "caches": ["--remove", "--force", "--json"],
}


def this_checkout(env: dict | None = None) -> dict:
    """The environment with this checkout's ``cachefs`` first on the path: the installed
    ``cachefs`` script imports whichever checkout the virtualenv was made from."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def cachefs(*args: str, cwd: Path | str = REPO, env: dict | None = None,
            timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CACHEFS, *args], cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, env=this_checkout(env))


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args}: exit {result.returncode}\n{result.stdout}{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


def failed_with_reason(result: subprocess.CompletedProcess[str], *words: str) -> str:
    """Non-zero exit, no traceback, and one ``cachefs: ...`` line that names the reason."""
    assert result.returncode != 0, f"{result.args} succeeded:\n{result.stdout}{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    reasons = [line for line in result.stderr.splitlines() if line.startswith("cachefs:")]
    assert len(reasons) == 1, f"expected one 'cachefs: reason' line:\n{result.stderr}"
    for word in words:
        assert word in reasons[0], reasons[0]
    return reasons[0]


def run_on_pty(args: list[str], cwd: Path, timeout: float = RUN_TIMEOUT) -> tuple[int, str]:
    """Run a command with stdout and stderr on a pseudo-terminal; (exit status, output)."""
    master, slave = pty.openpty()
    try:
        process = subprocess.Popen(args, cwd=cwd, stdin=slave, stdout=slave, stderr=slave,
                                   close_fds=True, env=this_checkout(dict(os.environ, COLUMNS="100")))
    finally:
        os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                raise AssertionError(f"{args} did not finish within {timeout} s: {b''.join(chunks)!r}")
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the other side is closed
                    data = b""
                if not data:
                    break
                chunks.append(data)
            elif process.poll() is not None:
                break
        return process.wait(10), b"".join(chunks).decode(errors="replace")
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
            process.wait()


# -- status ---------------------------------------------------------------------------------

def test_status_human_and_json(mount_factory, share: Path) -> None:
    (share / "sub").mkdir()
    (share / "sub" / "f.txt").write_bytes(b"f")
    with mount_factory() as mount:
        mnt = mount.mountpoint
        text = ok(cachefs("status", str(mnt))).stdout
        for label in ("state:", "remote:", "pending changes:", "conflicts:", "cache use:",
                      "pinned:", "last sync:", "last error:"):
            assert any(line.startswith(label) for line in text.splitlines()), f"no {label!r} line:\n{text}"
        assert "online" in text and "sftp://" in text
        # From a folder inside the mount, without a PATH.
        assert ok(cachefs("status", cwd=mnt / "sub")).stdout == text
        parsed = json.loads(ok(cachefs("status", "--json", str(mnt / "sub" / "f.txt"))).stdout)
        assert parsed["state"] == "online" and parsed["pending"] == 0
        assert parsed["pid"] == mount.pid

        outside = failed_with_reason(cachefs("status", str(share)), "not inside a cachefs mount")
        assert str(share) in outside


# -- sync, offline, online -----------------------------------------------------------------

def test_sync_offline_online(mount_factory, share: Path) -> None:
    (share / "f.txt").write_bytes(b"base")
    with mount_factory() as mount:
        mnt = mount.mountpoint
        ok(cachefs("sync", str(mnt)))
        assert status(mnt)["last_sync"]
        read(mnt / "f.txt")

        ok(cachefs("offline", str(mnt)))
        assert status(mnt)["connectivity"] == "offline-by-request"
        write(mnt / "f.txt", b"changed offline")
        failed_with_reason(cachefs("sync", str(mnt)), "sync:", "offline")
        assert (share / "f.txt").read_bytes() == b"base"

        ok(cachefs("online", cwd=mnt))
        wait_for(lambda: status(mnt)["state"] == "online", 15, "online")
        ok(cachefs("sync", cwd=mnt))
        assert (share / "f.txt").read_bytes() == b"changed offline"
        assert status(mnt)["pending"] == 0


# -- pin, unpin, evict ---------------------------------------------------------------------

def test_pin_unpin_evict_relative_and_absolute(mount_factory, share: Path) -> None:
    (share / "docs" / "deep").mkdir(parents=True)
    (share / "docs" / "deep" / "a.txt").write_bytes(b"a" * 1000)
    (share / "docs" / "b.txt").write_bytes(b"b" * 1000)
    (share / "c.txt").write_bytes(b"c" * 1000)
    with mount_factory() as mount:
        mnt = mount.mountpoint
        docs = mnt / "docs"
        ok(cachefs("pin", "deep", cwd=docs))  # relative to the current folder
        assert status(mnt)["pinned"] == ["/docs/deep"]
        assert state(docs / "deep" / "a.txt") == "pinned"
        ok(cachefs("pin", str(mnt / "c.txt"), "../b.txt", cwd=docs / "deep"))  # absolute and ../
        assert sorted(status(mnt)["pinned"]) == ["/c.txt", "/docs/b.txt", "/docs/deep"]
        assert state(mnt / "c.txt") == "pinned" and state(docs / "b.txt") == "pinned"

        ok(cachefs("unpin", "deep/a.txt", "b.txt", cwd=docs))  # a.txt is under a pinned root
        assert state(docs / "b.txt") == "cached"
        ok(cachefs("unpin", str(docs / "deep"), str(mnt / "c.txt")))
        assert status(mnt)["pinned"] == []
        time.sleep(1.5)  # past the cache's checkpoint
        ok(cachefs("evict", ".", cwd=docs))
        assert state(docs / "b.txt") == "remote"
        assert state(docs / "deep" / "a.txt") == "remote"
        assert state(mnt / "c.txt") == "cached"  # outside docs
        ok(cachefs("evict", str(mnt / "c.txt")))
        assert state(mnt / "c.txt") == "remote"

        failed_with_reason(cachefs("pin", "no-such-file", cwd=mnt), "pin:")
        failed_with_reason(cachefs("pin", str(share / "c.txt")), "not inside a cachefs mount")
        assert status(mnt)["state"] == "online"



def test_pin_through_a_symbolic_link_into_the_mount(mount_factory, share: Path, tmp_path: Path) -> None:
    """A path whose text leads into the mount through a symbolic link (a link in the home
    folder to a folder of the mount) names the file it leads to."""
    (share / "docs").mkdir()
    (share / "docs" / "b.txt").write_bytes(b"b" * 1000)
    with mount_factory() as mount:
        link = tmp_path / "to-docs"
        link.symlink_to(mount.mountpoint / "docs")
        ok(cachefs("pin", str(link / "b.txt")))
        assert status(mount.mountpoint)["pinned"] == ["/docs/b.txt"]
        ok(cachefs("unpin", str(link / "b.txt")))
        assert status(mount.mountpoint)["pinned"] == []

# -- conflicts and resolve -----------------------------------------------------------------

def test_conflicts_and_resolve(mount_factory, share: Path) -> None:
    (share / "r.txt").write_bytes(b"base")
    (share / "k.txt").write_bytes(b"base")
    with mount_factory() as mount:
        mnt = mount.mountpoint
        assert ok(cachefs("conflicts", str(mnt))).stdout.strip() == "no conflicts"
        read(mnt / "r.txt")
        read(mnt / "k.txt")
        go_offline(mnt)
        write(mnt / "r.txt", b"local r")
        write(mnt / "k.txt", b"local k")
        change_on_server(share / "r.txt", b"remote r")
        change_on_server(share / "k.txt", b"remote k")
        ok(cachefs("online", str(mnt)))
        wait_for(lambda: cachefs("sync", str(mnt)).returncode == 0, 20, "sync")

        records = json.loads(ok(cachefs("conflicts", "--json", cwd=mnt)).stdout)
        assert {r["path"] for r in records} == {"r.txt", "k.txt"}, records
        human = ok(cachefs("conflicts", str(mnt))).stdout
        assert "/r.txt" in human and "changed-both" in human and "other version" in human

        failed_with_reason(cachefs("resolve", "nothing.txt", "--keep", "local", cwd=mnt), "resolve:")
        bad = cachefs("resolve", "r.txt", "--keep", "mine", cwd=mnt)
        assert bad.returncode != 0 and "invalid choice" in bad.stderr

        ok(cachefs("resolve", "r.txt", "--keep", "remote", cwd=mnt))
        ok(cachefs("resolve", str(mnt / "k.txt"), "--keep", "local"))
        assert ok(cachefs("conflicts", str(mnt))).stdout.strip() == "no conflicts"
        assert status(mnt)["conflicts"] == 0
        ok(cachefs("sync", str(mnt)))
        assert (share / "r.txt").read_bytes() == b"remote r" and conflict_copies(share, "r.txt") == []
        assert (share / "k.txt").read_bytes() == b"local k" and conflict_copies(share, "k.txt") == []


# -- help -----------------------------------------------------------------------------------

@pytest.mark.parametrize("sub", sorted(SUBCOMMANDS))
def test_help_of_every_subcommand(sub: str) -> None:
    text = ok(cachefs(sub, "--help")).stdout
    assert text.startswith("usage: cachefs " + sub), text
    for word in SUBCOMMANDS[sub]:
        assert word in text, f"cachefs {sub} --help does not mention {word}:\n{text}"


def test_top_level_help_lists_every_subcommand() -> None:
    text = ok(cachefs("--help")).stdout
    for sub in SUBCOMMANDS:
        assert sub in text, sub


# -- progress --------------------------------------------------------------------------------

@pytest.fixture
def big_share(share: Path) -> Path:
    folder = share / "big"
    folder.mkdir()
    chunk = os.urandom(MiB)
    for i in range(8):  # 40 MiB over 8 files
        (folder / f"part{i}.bin").write_bytes(chunk * 5 + bytes([i]))
    return folder


def test_pin_progress_on_a_terminal(mount_factory, sshd, big_share: Path, tmp_path: Path) -> None:
    # Through a link of 8 MB/s a connection, so that the pin lasts long enough to draw.
    with TcpProxy(sshd.host, sshd.port) as proxy, \
            proxied(mount_factory, sshd, proxy, tmp_path, timeout="5") as mount:
        proxy.throttle(8e6)
        mnt = mount.mountpoint
        code, output = run_on_pty([CACHEFS, "pin", "big"], cwd=mnt)
        assert code == 0, output
        assert "Traceback" not in output, output
        assert "\r" in output and "[" in output and "#" in output, f"no progress bar: {output!r}"
        assert "/8 items" in output, output
        assert "pin big: done" in output, output
        for i in range(8):
            assert state(mnt / "big" / f"part{i}.bin") == "pinned"


def test_pin_progress_off_a_terminal_is_plain_lines(mount_factory, big_share: Path) -> None:
    with mount_factory(timeout="5") as mount:
        mnt = mount.mountpoint
        result = ok(cachefs("pin", "big", cwd=mnt))
        output = result.stdout + result.stderr
        assert "\r" not in output and "\x1b" not in output, repr(output)
        assert "pin big: done" in output, output
        assert status(mnt)["pinned"] == ["/big"]


# -- mounting: fstab form, -o errors, mount -t fuse.cachefs ---------------------------------

def _stop_daemon(mnt: Path) -> None:
    """Clean up after a daemonized mount: unmount, then make sure its process is gone."""
    pid = None
    if is_mounted(mnt):
        try:
            pid = int(status(mnt, timeout=5)["pid"])
        except Exception:
            pass
    fusermount_unmount(mnt)
    if pid is not None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.kill(pid, 9)


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError as exc:
        return str(exc)


def _alive(pid: int) -> bool:
    """Running, and not a zombie waiting for a parent that is not us."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return _proc_state(pid).rsplit(")", 1)[-1].split()[:1] != ["Z"]


def test_fstab_form_daemonizes_and_unmounts(tmp_path: Path, sshd, share: Path) -> None:
    (share / "f.txt").write_bytes(b"fstab\n")
    mnt, cache = tmp_path / "fmnt", tmp_path / "fcache"
    mnt.mkdir()
    try:
        options = f"cache_dir={cache},identity={sshd.identity},known_hosts={sshd.known_hosts},noauto,attr_timeout=1"
        ok(cachefs(sshd.address(), str(mnt), "-o", options))
        assert is_mounted(mnt), "cachefs returned 0 but nothing is mounted"
        assert read(mnt / "f.txt") == b"fstab\n"
        assert status(mnt)["cache_dir"] == str(cache)
        pid = int(status(mnt)["pid"])
        ok(cachefs("unmount", str(mnt)))
        assert not is_mounted(mnt)
        assert not _alive(pid), f"mount process {pid} still running: {_proc_state(pid)}"
    finally:
        _stop_daemon(mnt)


def test_unknown_dash_o_option_is_refused_clearly(tmp_path: Path, sshd) -> None:
    mnt = tmp_path / "bmnt"
    mnt.mkdir()
    try:
        result = cachefs(sshd.address(), str(mnt), "-o", f"cache_dir={tmp_path / 'c'},bogus")
        assert result.returncode != 0
        assert "unknown mount option -o bogus" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert not is_mounted(mnt)
        result = cachefs(sshd.address(), str(mnt), "-o", "cache_size=lots")
        assert result.returncode != 0 and "cache_size=lots" in result.stderr, result.stderr
    finally:
        _stop_daemon(mnt)


def test_mount_t_fuse_cachefs(tmp_path: Path, sshd, share: Path) -> None:
    (share / "f.txt").write_bytes(b"via mount(8)\n")
    mnt, cache = tmp_path / "tmnt", tmp_path / "tcache"
    mnt.mkdir()
    env = dict(os.environ, PATH=f"{Path(CACHEFS).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    mount_cmd = shutil.which("mount", path=env["PATH"]) or "/bin/mount"
    options = f"cache_dir={cache},identity={sshd.identity},known_hosts={sshd.known_hosts}"
    # mount(8) runs helpers with its own safe PATH, so "-t fuse.cachefs" finds cachefs only
    # when it is installed system-wide; otherwise name the program: "-t fuse PROG#REMOTE".
    if shutil.which("cachefs", path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"):
        how = ["-t", "fuse.cachefs", sshd.address()]
    else:
        how = ["-t", "fuse", f"{CACHEFS}#{sshd.address()}"]
    try:
        result = subprocess.run([mount_cmd, *how[:2], "-o", options, how[2], str(mnt)],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=RUN_TIMEOUT, env=this_checkout(env))
        assert result.returncode == 0, result.stdout + result.stderr
        assert is_mounted(mnt)
        assert read(mnt / "f.txt") == b"via mount(8)\n"
        assert status(mnt)["state"] == "online"
        ok(cachefs("unmount", str(mnt)))
        assert not is_mounted(mnt)
    finally:
        _stop_daemon(mnt)


def _many_clients(mnt: Path, tag: str, threads: int = 8, rounds: int = 120) -> None:
    """Threads that create, stat, read back, rename and unlink files side by side: many
    requests in flight at once, read by whichever FUSE task is reading on."""
    import threading

    failures: list[str] = []

    def work(k: int) -> None:
        try:
            folder = mnt / f"{tag}{k}"
            folder.mkdir()
            for i in range(rounds):
                data = f"{k}:{i}\n".encode() * (1 + i % 7)
                path = folder / f"f{i}"
                path.write_bytes(data)
                if path.stat().st_size != len(data) or path.read_bytes() != data:
                    failures.append(f"{path}: read back differs")
                if i % 2:
                    path.rename(folder / f"g{i}")
                else:
                    path.unlink()
            names = sorted(p.name for p in folder.iterdir())
            if names != sorted(f"g{i}" for i in range(1, rounds, 2)):
                failures.append(f"{folder}: {len(names)} names left")
        except OSError as exc:
            failures.append(f"thread {k}: {exc!r}")

    workers = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert not any(w.is_alive() for w in workers), "a client hung"
    assert not failures, failures[:5]


def test_request_spin(mount_factory, sshd, tmp_path: Path) -> None:
    """The mount reads on for the next request (50 us by default, scripts/build-passthrough's
    pyfuse3): concurrent clients are all answered right, with spin and with it off; a
    value out of range is refused before anything is mounted."""
    with mount_factory() as mount:
        assert "request spin: 50 us" in mount.log_text(), mount.log_text()[-2000:]
        _many_clients(mount.mountpoint, "spin")
    with mount_factory("-o", "request_spin=0", name="mnt0", cache="cache0") as mount:
        assert "request spin: off (--request-spin 0)" in mount.log_text()
        _many_clients(mount.mountpoint, "nospin", threads=4, rounds=40)
    mnt = tmp_path / "bad"
    mnt.mkdir()
    result = cachefs(sshd.address(), str(mnt), "--request-spin", "-5")
    assert result.returncode == 2, result
    assert "must be 0 to 10000 microseconds" in result.stderr, result.stderr
    assert not is_mounted(mnt)


# -- bad values: a usage error naming the option, nothing mounted ---------------------------

BAD_VALUES = [
    # (arguments, words the one error line must hold)
    (["--cache-size", "inf"], ["argument --cache-size", "not a size: 'inf'"]),
    (["--cache-size", "nan"], ["argument --cache-size", "not a size"]),
    (["--cache-size=-1G"], ["argument --cache-size", "not a size: '-1G'"]),
    (["--cache-size", "0"], ["argument --cache-size", "too small: at least 1M"]),
    (["--cache-size", "20"], ["argument --cache-size", "too small", "without a unit is bytes"]),
    (["--cache-size", "1e400"], ["argument --cache-size", "not a size"]),
    (["--cache-size", "9000000P"], ["argument --cache-size", "too large"]),
    (["--cache-size", "10X"], ["argument --cache-size", "not a size: '10X'"]),
    (["--cache-size", "10GG"], ["argument --cache-size", "not a size"]),
    (["--cache-size", "1_000M"], ["argument --cache-size", "not a size"]),
    (["--readahead", "inf"], ["argument --readahead", "not a size"]),
    (["--readahead", "1T"], ["argument --readahead", "too large: at most 1G"]),
    (["--readahead", "100"], ["argument --readahead", "too small: at least 4K"]),
    (["-o", "cache_size=inf"], ["-o cache_size=inf", "not a size"]),
    (["-o", "cache_size=0"], ["-o cache_size=0", "too small"]),
    (["-o", "readahead=2G"], ["-o readahead=2G", "too large"]),
    (["--timeout", "inf"], ["argument --timeout", "at most 604800"]),
    (["--timeout", "1e300"], ["argument --timeout", "at most 604800"]),
    (["--timeout", "nan"], ["argument --timeout", "above 0"]),
    (["--attr-timeout", "-1"], ["argument --attr-timeout", "above 0"]),
    (["--heartbeat", "inf"], ["argument --heartbeat"]),
    (["--sync-interval", "inf"], ["argument --sync-interval"]),
    (["-o", "write_back_hold=inf"], ["-o write_back_hold=inf", "at most"]),
    (["--connections", "100000"], ["argument --connections", "1 to 64"]),
    (["--connections", "0"], ["argument --connections", "1 to 64"]),
    (["-o", "connections=x"], ["-o connections=x", "not a whole number"]),
    (["--port", "70000"], ["argument -p/--port", "1 to 65535"]),
    (["-o", "timeout="], ["-o timeout needs a value"]),
    (["-o", "verbose=0"], ["-o verbose=0", "takes no value"]),
    (["-o", "allow_other=yes"], ["-o allow_other=yes", "takes no value"]),
    (["-o", "fsname"], ["-o fsname needs a value"]),
    (["-o", "max_read=4096"], ["-o max_read=4096", "not supported"]),
    (["-o", "blksize=4096"], ["-o blksize=4096", "not supported"]),
]


@pytest.mark.parametrize("extra,words", BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_bad_mount_values_are_usage_errors(tmp_path: Path, extra: list[str], words: list[str]) -> None:
    """Each used to end in a traceback (inf, 1e400: OverflowError), a mount process that
    died with no reason (--timeout inf: time_t overflow in the socket), a mount that went
    away at once (-o max_read), libfuse's complaint sent to a detached mount's /dev/null,
    or 100,000 forked transfer processes. Now: argparse's exit status 2 and one line."""
    mnt = tmp_path / "m"
    mnt.mkdir()
    result = cachefs("mount", str(tmp_path / "no-share"), str(mnt), "--cache-dir", str(tmp_path / "c"),
                     *extra, timeout=30)
    assert result.returncode == 2, f"{extra}: exit {result.returncode}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("cachefs mount: error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert not is_mounted(mnt)
    assert not (tmp_path / "c").exists(), "a refused command made the cache directory"


def test_parse_size_bounds() -> None:
    from cachefs.defaults import MAX_SIZE, parse_size

    assert parse_size("1.5 GiB") == 3 << 29 and parse_size("10gb") == 10 << 30
    assert parse_size(".5K") == 512 and parse_size("500B") == 500 and parse_size("2P") == 2 << 50
    assert parse_size("8191P") == 8191 << 50
    for bad in ("inf", "nan", "infinity", "-1", "+1G", "1e3", "0x10", "1_000", "1,5G", "G", "5Q",
                "5 KiBB", "0", "0.0001", "9000000P"):
        with pytest.raises(ValueError):
            parse_size(bad)
    with pytest.raises(ValueError, match="too large"):
        parse_size(str(MAX_SIZE + 1))
    assert parse_size(str(MAX_SIZE)) == MAX_SIZE
    with pytest.raises(ValueError, match="at least 4K"):
        parse_size("3K", minimum=4096)


# -- stale and stuck mounts -------------------------------------------------------------------

def _crash(mount) -> None:
    """kill -9 of the mount process, leaving its FUSE mount behind (stale), past the
    mount's attribute timeout (1 s), so that the kernel no longer answers stats from it."""
    import signal

    os.kill(mount.pid, signal.SIGKILL)
    mount.process.wait(10)
    time.sleep(1.5)
    assert is_mounted(mount.mountpoint), "the killed mount left no stale mount behind"


def test_stale_mount_every_command_says_so(mount_factory, sshd, share: Path, tmp_path: Path) -> None:
    """A mount whose process was killed: each command used to end in an ENOTCONN
    traceback, 'cachefs mount' in an uncaught OSError, 'cachefs unmount' (-z too) in
    "is not mounted". Now each says in one line that the mount is stale and what to do;
    'unmount' (with and without -z) takes it down and a new mount replays the pending change."""
    (share / "sub").mkdir()
    (share / "f.txt").write_bytes(b"base")
    mount = mount_factory(check_log=False)
    mount.start()
    mnt = mount.mountpoint
    read(mnt / "f.txt")
    go_offline(mnt)
    write(mnt / "f.txt", b"changed before the crash")
    _crash(mount)

    for args in (["status", str(mnt)], ["status", "--json", str(mnt / "sub")], ["sync", str(mnt)],
                 ["offline", str(mnt)], ["online", str(mnt)], ["pin", str(mnt / "f.txt")],
                 ["unpin", str(mnt / "f.txt")], ["evict", str(mnt / "sub")], ["conflicts", str(mnt)],
                 ["conflicts", "--json", str(mnt)], ["resolve", "--keep", "local", str(mnt / "f.txt")]):
        reason = failed_with_reason(cachefs(*args), "stale", f"cachefs unmount {mnt}")
        assert reason.count("\n") == 0 and str(mnt) in reason
    mount_args = [sshd.address(), str(mnt), "--cache-dir", str(mount.cache_dir), "--identity",
                  str(sshd.identity), "--known-hosts", str(sshd.known_hosts), "--attr-timeout", "1"]
    failed_with_reason(cachefs("mount", *mount_args), "stale", f"cachefs unmount {mnt}")
    assert is_mounted(mnt)

    notice = ok(cachefs("unmount", str(mnt))).stderr  # without -z
    assert "was a stale mount" in notice and not is_mounted(mnt), notice
    failed_with_reason(cachefs("unmount", str(mnt)), "is not mounted")

    try:
        ok(cachefs("mount", *mount_args))  # detached, as a user mounts again
        assert read(mnt / "f.txt") == b"changed before the crash"
        pid = int(status(mnt)["pid"])
        os.kill(pid, 9)
        wait_for(lambda: not _alive(pid), 10, "the killed mount process to end")
        time.sleep(1.5)
        failed_with_reason(cachefs("status", str(mnt)), "stale")
        assert "was a stale mount" in ok(cachefs("unmount", "-z", str(mnt))).stderr
        assert not is_mounted(mnt)

        ok(cachefs("mount", *mount_args))  # replays the change left pending once online
        ok(cachefs("online", str(mnt)))
        wait_for(lambda: cachefs("sync", str(mnt)).returncode == 0, 20, "sync")
        assert (share / "f.txt").read_bytes() == b"changed before the crash"
        assert status(mnt)["pending"] == 0
        ok(cachefs("unmount", str(mnt)))
    finally:
        _stop_daemon(mnt)


def test_stuck_mount_is_named_and_detached(mount_factory) -> None:
    """A mount process that is alive but does not answer (SIGSTOP): 'status' says so after
    10 s instead of hanging, and 'unmount -z' detaches it without waiting on it."""
    import signal

    mount = mount_factory(check_log=False)
    mount.start()
    mnt = mount.mountpoint
    os.kill(mount.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        failed_with_reason(cachefs("status", str(mnt), timeout=40), "does not answer within 10 s",
                           f"cachefs unmount -z {mnt}")
        assert time.monotonic() - started < 30
        ok(cachefs("unmount", "-z", str(mnt), timeout=40))
        assert not is_mounted(mnt)
    finally:
        os.kill(mount.pid, signal.SIGKILL)
        mount.process.wait(10)


def test_mount_paths_of_the_wrong_kind_are_refused(tmp_path: Path) -> None:
    """A cache dir that is a file ended in "cannot start: [Errno 17] File exists"; an
    --identity or --known-hosts that is a folder was taken as no key ("0 key(s) offered")
    or an empty known_hosts. Each is now named in one line, before anything starts."""
    mnt, share, a_file, a_dir = tmp_path / "m", tmp_path / "share", tmp_path / "f", tmp_path / "d"
    for folder in (mnt, share, a_dir):
        folder.mkdir()
    a_file.write_bytes(b"x")
    base = ["mount", str(share), str(mnt)]
    failed_with_reason(cachefs(*base, "--cache-dir", str(a_file)), str(a_file), "is not a directory")
    for option in ("--identity", "--known-hosts", "--cache-key-file"):
        failed_with_reason(cachefs(*base, "--cache-dir", str(tmp_path / "c"), option, str(a_dir)),
                           option, "is a directory, not a file")
    assert not is_mounted(mnt) and not (tmp_path / "c").exists()


def test_commands_load_only_what_they_need(tmp_path: Path) -> None:
    """``cachefs status`` (and every command that only talks to a mount) starts without
    loading trio, LMDB, paramiko, pyfuse3 or the cryptography library: it loaded them all
    (about 200 ms) to read two default values."""
    script = (
        "import sys\n"
        "from cachefs import cli\n"
        "try:\n"
        f"    cli.main(['status', {str(tmp_path)!r}])\n"
        "except SystemExit as exc:\n"
        "    print(exc.code, file=sys.stderr)\n"
        "heavy = ('trio', 'lmdb', 'paramiko', 'pyfuse3', 'cryptography', 'cachefs.sync', 'cachefs.store.index')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "is not inside a cachefs mount" in result.stderr
    assert result.stdout.strip() == "[]", result.stdout
