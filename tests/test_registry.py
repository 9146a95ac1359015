"""The registry of shares and the sync schedule: ``cachefs add``, ``remove``, ``shares``,
``mount NAME`` and ``unmount NAME`` through the real ``cachefs`` command against the test
sshd (with ``$XDG_CONFIG_HOME`` in the test's folder), the fstab form with a NAME, pins
applied at mount, and full syncs at mount, every N seconds, when idle and at unmount
(bounded), on real mounts. Every wait is bounded; every mount is taken down.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from cachefs import registry
from tests.fixtures.mount import is_mounted, status
from tests.fixtures.proxy import TcpProxy, proxied
from tests.test_cli import CACHEFS, RUN_TIMEOUT, _stop_daemon, cachefs, ok, this_checkout
from tests.test_control import go_offline, read, state, wait_for, write


def _config(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "config"))


def _access(sshd, tmp_path: Path, cache: str = "cache") -> list[str]:
    """What a mount of the test sshd needs besides REMOTE and MOUNTPOINT."""
    return ["--identity", str(sshd.identity), "--known-hosts", str(sshd.known_hosts),
            "--cache-dir", str(tmp_path / cache), "--timeout", "5", "--heartbeat", "1"]


def _mount_log(tmp_path: Path, cache: str = "cache") -> str:
    path = tmp_path / cache / "mount.log"
    return path.read_text(errors="replace") if path.exists() else ""


def failed(result: subprocess.CompletedProcess[str], status_: int = 1) -> str:
    """The one line a refused command prints (and no traceback)."""
    assert result.returncode == status_, f"{result.args}: exit {result.returncode}\n{result.stdout}{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip()


# -- the file ----------------------------------------------------------------------------

def test_file_round_trip_and_shape(tmp_path: Path) -> None:
    odd = 'a "quoted" \\ back\tslash, ünïcödé, a\nnewline'
    shares = {"w": registry.Share("w", "alice@host:" + odd, "/mnt/" + odd,
                                  {"cache_size": "20G", "allow_other": True, "sync_idle": 60,
                                   "sync_at_mount": True, "sync_interval": 1.5, "fsname": odd},
                                  ["docs", odd])}
    path = tmp_path / "cfg" / "cachefs" / "shares.toml"
    registry.save(shares, path)
    assert registry.load(path) == shares
    data = tomllib.loads(path.read_text())
    assert data["w"]["sync"] == {"at_mount": True, "interval": 1.5, "idle": 60}
    assert "sync_idle" not in data["w"]["options"]
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["shares.toml"]  # no temporary left


def test_names_with_dots_round_trip(tmp_path: Path) -> None:
    """NAME_RE allows '.', but [work.docs] was written bare: TOML reads it as a table
    'docs' inside 'work', and every command that read the registry failed after that
    (shares, mount, add, even remove work.docs). Each name NAME_RE allows is written
    as one key now, with its options and schedule."""
    names = ["work.docs", "a.b.c", "x..y", "9", "v1.2-rc_3", "trailing.", "w" * 64, "plain"]
    assert all(registry.is_share_name(n) for n in names)
    shares = {n: registry.Share(n, f"alice@host:{n}", f"/mnt/{n}", {"cache_size": "1G",
                                                                    "sync_idle": 5}, ["docs"])
              for n in names}
    path = tmp_path / "cfg" / "cachefs" / "shares.toml"
    registry.save(shares, path)
    assert registry.load(path) == shares
    assert sorted(tomllib.loads(path.read_text())) == sorted(names)
    assert '["work.docs".options]' in path.read_text()


def test_add_shares_remove_a_dotted_name(tmp_path: Path) -> None:
    env = _config(tmp_path)
    ok(cachefs("add", "work.docs", "alice@fileserver:docs", "mnt", "--cache-size", "2G",
               "--sync-idle", "60", cwd=tmp_path, env=env))
    ok(cachefs("add", "work", "alice@fileserver:work", "mnt2", cwd=tmp_path, env=env))
    data = tomllib.loads((tmp_path / "config" / "cachefs" / "shares.toml").read_text())
    assert data["work.docs"]["options"] == {"cache_size": "2G"} and data["work.docs"]["sync"] == {"idle": 60}
    assert data["work"]["remote"] == "alice@fileserver:work"
    out = ok(cachefs("shares", env=env)).stdout
    assert "work.docs  alice@fileserver:docs" in out and "work       alice@fileserver:work" in out, out
    ok(cachefs("remove", "work.docs", env=env))
    assert list(registry.load(tmp_path / "config" / "cachefs" / "shares.toml")) == ["work"]
    ok(cachefs("remove", "work", env=env))


@pytest.mark.parametrize("text, says", [
    ("[w\nremote = 1", "not valid TOML"),
    ("[w]\nmountpoint = '/m'\n", "'remote' is missing"),
    ("[w]\nremote = 'h:p'\nmountpoint = '/m'\ncolour = 'red'\n", "unknown key 'colour'"),
    ("[w]\nremote = 'h:p'\nmountpoint = '/m'\n[w.sync]\nweekly = true\n", "unknown key 'weekly'"),
    ("[w]\nremote = 'h:p'\nmountpoint = '/m'\npins = '/x'\n", "'pins' must be a list"),
    ("['a b']\nremote = 'h:p'\nmountpoint = '/m'\n", "a share's name is"),
])
def test_bad_file_is_one_line(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "config" / "cachefs" / "shares.toml"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(registry.RegistryError, match=re.escape(says)):
        registry.load(path)
    line = failed(cachefs("shares", env=_config(tmp_path)))
    assert line.startswith(f"cachefs: {path}") and says in line and "\n" not in line


@pytest.mark.parametrize("options, says", [
    ("timeout = 0", "argument --timeout: must be a number of seconds above 0"),
    ("colour = 'red'", "unknown mount option -o colour=red"),
    ("verbose = 'yes'", "option verbose is true or false, not 'yes'"),
])
def test_bad_option_in_file_names_the_share(tmp_path: Path, options: str, says: str) -> None:
    path = tmp_path / "config" / "cachefs" / "shares.toml"
    path.parent.mkdir(parents=True)
    path.write_text(f"[w]\nremote = 'h:p'\nmountpoint = '{tmp_path / 'm'}'\n[w.options]\n{options}\n")
    line = failed(cachefs("mount", "w", env=_config(tmp_path)))
    assert line.startswith(f"cachefs: share w in {path}: {says}") and "\n" not in line
    assert not (tmp_path / "m").exists()  # nothing made, nothing mounted


# -- add, shares, remove -----------------------------------------------------------------

def test_add_keeps_options_as_written(tmp_path: Path) -> None:
    env = _config(tmp_path)
    ok(cachefs("add", "work", "alice@fileserver:projects", "mnt", "--cache-size", "20G",
               "-o", "allow_other,cache_dir=~/c,noauto,x-systemd.automount", "--no-passthrough",
               "--sync-idle", "60", "--sync-at-mount", "--sync-at-unmount", "0", "--pin", "docs",
               "-o", "pin=src/x", "--identity=key", cwd=tmp_path, env=env))
    data = tomllib.loads((tmp_path / "config" / "cachefs" / "shares.toml").read_text())
    home = os.path.expanduser("~")
    assert data == {"work": {
        "remote": "alice@fileserver:projects", "mountpoint": str(tmp_path / "mnt"),
        "pins": ["src/x", "docs"],
        "options": {"cache_size": "20G", "allow_other": True, "cache_dir": f"{home}/c",
                    "no_passthrough": True, "identity": str(tmp_path / "key")},
        "sync": {"at_mount": True, "at_unmount": 0, "idle": 60}}}
    out = ok(cachefs("shares", env=env)).stdout
    assert out.startswith("work  alice@fileserver:projects  " + str(tmp_path / "mnt") + "  ")
    assert "cache_size=20G" in out and "pin=docs" in out and "(mounted)" not in out
    # the same name twice, a bad name, bad options: refused, the registry unchanged
    before = (tmp_path / "config" / "cachefs" / "shares.toml").read_bytes()
    assert "registered already" in failed(cachefs("add", "work", "h:p", "/m", env=env))
    assert "bad share name" in failed(cachefs("add", "a/b", "h:p", "/m", env=env))
    assert "--timeout" in failed(cachefs("add", "w2", "h:p", "/m", "--timeout", "0", env=env), 2)
    assert "unknown mount option -o foo" in failed(cachefs("add", "w2", "h:p", "/m", "-o", "foo", env=env), 2)
    assert "--foreground" in failed(cachefs("add", "w2", "h:p", "/m", "-f", env=env))
    assert "relative to the mount point" in failed(cachefs("add", "w2", "h:p", "/m", "--pin", "/etc", env=env))
    assert (tmp_path / "config" / "cachefs" / "shares.toml").read_bytes() == before
    ok(cachefs("remove", "work", env=env))
    assert "no share named 'work'" in failed(cachefs("remove", "work", env=env))
    assert ok(cachefs("shares", env=env)).stdout.startswith("no shares registered")


def test_relative_paths_are_stored_absolute(tmp_path: Path) -> None:
    """--password-file pw.txt was kept as "pw.txt" (not among the path options) and
    sshfs's -o IdentityFile=k2 as "k2" (taken for a FUSE option): a unit mounts from /
    and found neither. Every path, in each form it may be given, is kept absolute now;
    sshfs's names are kept as written."""
    env = _config(tmp_path)
    ok(cachefs("add", "w", "alice@fileserver:p", "mnt", "--password-file", "pw.txt",
               "--cache-key-file=ck", "-o", "IdentityFile=k2,UserKnownHostsFile=~/kh,Port=2222",
               cwd=tmp_path, env=env))
    ok(cachefs("add", "w2", "alice@fileserver:p", "mnt", "-o", "password_file=sub/pw,identity=k,known_hosts=kh",
               cwd=tmp_path, env=env))
    data = tomllib.loads((tmp_path / "config" / "cachefs" / "shares.toml").read_text())
    home = os.path.expanduser("~")
    assert data["w"]["options"] == {"password_file": str(tmp_path / "pw.txt"),
                                    "cache_key_file": str(tmp_path / "ck"),
                                    "IdentityFile": str(tmp_path / "k2"),
                                    "UserKnownHostsFile": f"{home}/kh", "Port": "2222"}
    assert data["w2"]["options"] == {"password_file": str(tmp_path / "sub" / "pw"),
                                     "identity": str(tmp_path / "k"), "known_hosts": str(tmp_path / "kh")}


def test_every_path_option_is_made_absolute() -> None:
    """Each option of cachefs mount that takes a path (type Path) is among those a share
    keeps absolute, and so is each sshfs name that stands for one."""
    from cachefs import cli

    parser = argparse.ArgumentParser()
    cli.add_mount_arguments(parser)
    paths = {cli._OPTION_NAMES[a.dest] for a in parser._actions if a.type is Path}
    assert paths == cli._PATH_OPTIONS
    assert {name for name, dest in cli.SSHFS_OPTIONS.items()
            if isinstance(dest, str) and cli._OPTION_NAMES.get(dest) in paths} == {"identityfile",
                                                                                "userknownhostsfile",
                                                                                "uidfile", "gidfile"}


def test_mount_of_unknown_name_is_one_line(tmp_path: Path) -> None:
    env = _config(tmp_path)
    line = failed(cachefs("mount", "nosuch", env=env, cwd=tmp_path))
    assert "'nosuch' is not a registered share" in line
    (tmp_path / "mnt").mkdir()
    line = failed(cachefs("mount", "nosuch", str(tmp_path / "mnt"), env=env, cwd=tmp_path))
    assert "neither a registered share" in line and "nor a remote" in line
    assert not is_mounted(tmp_path / "mnt")


# -- mount NAME on real mounts -----------------------------------------------------------

@pytest.mark.parametrize("name", ["proj", "work.docs"])
def test_add_mount_unmount_remove_by_name(tmp_path: Path, sshd, share: Path, name: str) -> None:
    env = _config(tmp_path)
    (share / "docs").mkdir()
    (share / "docs" / "a.txt").write_bytes(b"pinned at mount\n")
    (share / "f.txt").write_bytes(b"by name\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ok(cachefs("add", name, sshd.address(), str(mnt), *_access(sshd, tmp_path),
               "--pin", "docs", env=env))
    try:
        ok(cachefs("mount", name, env=env))
        assert is_mounted(mnt)
        assert read(mnt / "f.txt") == b"by name\n"
        st = status(mnt)
        assert st["state"] == "online" and st["cache_dir"] == str(tmp_path / "cache")
        # the pin, applied in the background once the mount is up
        wait_for(lambda: status(mnt)["pinned"] == ["/docs"], 20, "docs pinned at mount")
        wait_for(lambda: "pinned docs" in _mount_log(tmp_path), 20, "the pin's fetch done")
        assert "(mounted)" in ok(cachefs("shares", env=env)).stdout
        go_offline(mnt)  # the pinned file was fetched whole: it reads offline
        assert read(mnt / "docs" / "a.txt") == b"pinned at mount\n"
        assert state(mnt / "docs" / "a.txt") == "pinned"
        ok(cachefs("unmount", name, env=env, cwd=tmp_path))
        assert not is_mounted(mnt)
        # the command line wins over the registry: another mount point, another option
        other = tmp_path / "other"
        other.mkdir()
        ok(cachefs("mount", name, str(other), "--attr-timeout", "7", env=env))
        assert read(other / "f.txt") == b"by name\n" and not is_mounted(mnt)
        ok(cachefs("unmount", str(other), env=env))
    finally:
        _stop_daemon(mnt)
        _stop_daemon(tmp_path / "other")
    ok(cachefs("remove", name, env=env))
    assert "not a registered share" in failed(cachefs("mount", name, env=env, cwd=tmp_path))


def test_fstab_form_with_a_name(tmp_path: Path, sshd, share: Path) -> None:
    """``cachefs NAME MOUNTPOINT -o OPTIONS``, as mount.fuse3 runs it for an fstab line whose
    source is a registered NAME (mount(8)'s own options among them, ignored)."""
    env = _config(tmp_path)
    (share / "f.txt").write_bytes(b"fstab\n")
    mnt = tmp_path / "fmnt"
    mnt.mkdir()
    ok(cachefs("add", "proj", sshd.address(), str(tmp_path / "elsewhere"), *_access(sshd, tmp_path), env=env))
    try:
        ok(cachefs("proj", str(mnt), "-o", "rw,noauto,_netdev,x-systemd.automount,timeout=4", env=env))
        assert read(mnt / "f.txt") == b"fstab\n"
        ok(cachefs("unmount", str(mnt), env=env))
    finally:
        _stop_daemon(mnt)


def test_mount_t_fuse_with_a_name(tmp_path: Path, sshd, share: Path) -> None:
    env = _config(tmp_path)
    (share / "f.txt").write_bytes(b"via mount(8)\n")
    mnt = tmp_path / "tmnt"
    mnt.mkdir()
    ok(cachefs("add", "proj", sshd.address(), str(mnt), *_access(sshd, tmp_path), env=env))
    env["PATH"] = f"{Path(CACHEFS).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    mount_cmd = shutil.which("mount", path=env["PATH"]) or "/bin/mount"
    # as test_cli's test: "-t fuse PROG#SOURCE" when cachefs is not installed system-wide
    if shutil.which("cachefs", path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"):
        how = ["-t", "fuse.cachefs", "proj"]
    else:
        how = ["-t", "fuse", f"{CACHEFS}#proj"]
    try:
        result = subprocess.run([mount_cmd, *how[:2], "-o", "noauto", how[2], str(mnt)],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=RUN_TIMEOUT, env=this_checkout(env))
        assert result.returncode == 0, result.stdout + result.stderr
        assert read(mnt / "f.txt") == b"via mount(8)\n"
        ok(cachefs("unmount", "proj", env=env, cwd=tmp_path))
        assert not is_mounted(mnt)
    finally:
        _stop_daemon(mnt)


def test_systemd_template_unit() -> None:
    """contrib/systemd/cachefs@.service mounts the instance's share in the foreground and
    unmounts it by name; its command lines parse as cachefs's."""
    from cachefs.cli import build_parser

    unit = (Path(__file__).resolve().parents[1] / "contrib" / "systemd" / "cachefs@.service").read_text()
    lines = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    start, stop = lines["ExecStart"].split(), lines["ExecStop"].split()
    assert start[0].endswith("/cachefs") and start[1:] == ["mount", "--foreground", "%i"]
    assert stop[0].endswith("/cachefs") and stop[1:] == ["unmount", "%i"]
    args = build_parser().parse_args(["mount", "--foreground", "proj"])
    assert args.foreground and args.remote == "proj" and args.mountpoint is None
    assert build_parser().parse_args(["unmount", "proj"]).mountpoint == "proj"


# -- the schedule ----------------------------------------------------------------------

def _leave_pending(mount_factory, name: str) -> None:
    """A change left pending by a mount (made offline by request, not replayed at unmount):
    the next mount starts with it in its journal."""
    with mount_factory("--sync-at-unmount", "0", check_log=False) as m:
        go_offline(m.mountpoint)
        write(m.mountpoint / name, b"made offline\n")
        assert status(m.mountpoint)["pending"] == 1


def test_sync_every_n_seconds_replays(mount_factory, share: Path) -> None:
    _leave_pending(mount_factory, "every.txt")
    assert not (share / "every.txt").exists()
    with mount_factory("--sync-interval", "1") as m:
        # watched on the server's side: nothing here opens anything in the mount
        wait_for(lambda: (share / "every.txt").exists(), 15, "the change replayed")
        wait_for(lambda: "scheduled sync" in m.log_text(), 5, "the scheduled pass logged")
        assert (share / "every.txt").read_bytes() == b"made offline\n"


def test_sync_when_idle_replays_once_per_quiet_spell(mount_factory, share: Path) -> None:
    _leave_pending(mount_factory, "idle.txt")
    with mount_factory("--sync-idle", "2") as m:
        # busy: a file opened every 0.2 s, so no idle pass comes
        busy_until = time.monotonic() + 4
        while time.monotonic() < busy_until:
            read(m.mountpoint / "idle.txt")
            time.sleep(0.2)
        assert "sync when idle" not in m.log_text()
        wait_for(lambda: "sync when idle" in m.log_text(), 10, "an idle pass")
        wait_for(lambda: (share / "idle.txt").exists(), 10, "the change replayed")
        assert (share / "idle.txt").read_bytes() == b"made offline\n"
        time.sleep(4)  # still idle: no second pass until something is opened again
        assert m.log_text().count("sync when idle") == 1
        read(m.mountpoint / "idle.txt")
        wait_for(lambda: m.log_text().count("sync when idle") == 2, 10, "a second idle pass")


def test_sync_at_mount(mount_factory) -> None:
    with mount_factory("--sync-at-mount") as m:
        wait_for(lambda: status(m.mountpoint)["last_sync"] is not None, 10, "a full sync at mount")
        assert "sync at mount" in m.log_text()
    with mount_factory(name="mnt2") as m:  # not asked for: none
        time.sleep(2)
        assert "sync at mount" not in m.log_text()


def test_sync_at_unmount_pushes_before_unmount_returns(tmp_path: Path, mount_factory, share: Path) -> None:
    _leave_pending(mount_factory, "late.txt")
    m = mount_factory("--sync-at-unmount", "20").start()
    try:
        ok(cachefs("unmount", str(m.mountpoint)))
        assert (share / "late.txt").read_bytes() == b"made offline\n"
    finally:
        m.stop(grace=5)


def test_sync_at_unmount_is_bounded(tmp_path: Path, mount_factory, sshd, share: Path) -> None:
    """A replay that cannot finish (a 4 MiB upload over a 32 KiB/s link) ends the unmount
    after --sync-at-unmount; the change is kept and replayed by the next mount (at once:
    --sync-at-mount)."""
    data = os.urandom(4 << 20)
    with TcpProxy("127.0.0.1", sshd.port) as proxy:
        m = proxied(mount_factory, sshd, proxy, tmp_path, "--sync-at-unmount", "2",
                    timeout="5", check_log=False).start()
        try:
            proxy.throttle(32 << 10)
            write(m.mountpoint / "big.bin", data)
            assert status(m.mountpoint)["pending"] == 1
            started = time.monotonic()
            result = cachefs("unmount", str(m.mountpoint), "--wait", "30")
            took = time.monotonic() - started
        finally:
            m.stop(grace=5)
        ok(result)
        assert took < 2 + 5, took  # the bound, and slack for a loaded machine
        assert "still pending" in m.log_text()
        proxy.throttle(None)
        with proxied(mount_factory, sshd, proxy, tmp_path, "--sync-at-mount", timeout="5",
                     check_log=False):
            wait_for(lambda: (share / "big.bin").exists()
                     and (share / "big.bin").stat().st_size == len(data),
                     60, "the change replayed by the next mount", interval=0.5)
    assert (share / "big.bin").read_bytes() == data
