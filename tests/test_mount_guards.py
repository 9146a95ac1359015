"""What must not end a mount or show more than it should (review of issue 22, items 3, 8
and 9): a pin the server refuses, at mount (``--pin``) or by ``cachefs pin``, is a warning
and an error of that command, never the end of the mount; an encrypted cache's mount
shows no remote as its source to the other users of the machine; and a cache in use is
refused before a password is asked for.

The server refusal needs a user the file permissions apply to: the suite runs as root, so
these tests log in as ``test_login``'s throw-away system user. Every mount is taken down,
every wait bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.fixtures.mount import Mount, is_mounted, status
from tests.test_cli import _stop_daemon, cachefs, failed_with_reason, ok
from tests.test_login import (LoginUser, login_user, mount_args, password_file, put,  # noqa: F401
                              run_mount, server_for, stop_detached)


def _refusing_share(user: LoginUser) -> None:
    """docs/ with a file its owner may not read, locked/ a folder its owner may not list."""
    for folder in ("docs", "locked"):
        (user.share / folder).mkdir()
        os.chown(user.share / folder, *_ids(user))
    put(user, "docs/ok.txt", b"readable\n")
    put(user, "docs/secret.txt", b"no\n")
    put(user, "locked/inside.txt", b"no\n")
    put(user, "top.txt", b"top\n")
    os.chmod(user.share / "docs" / "secret.txt", 0)
    os.chmod(user.share / "locked", 0)


def _ids(user: LoginUser) -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(user.name)
    return entry.pw_uid, entry.pw_gid


def _answers(mnt: Path) -> bool:
    return is_mounted(mnt) and (mnt / "top.txt").read_bytes() == b"top\n"


def test_a_refused_pin_never_ends_the_mount(server_for, login_user: LoginUser, tmp_path: Path) -> None:
    """A registered pin whose walk met EACCES (a file the server would not open, a folder
    it would not list) ended the whole mount: hoard.pin let RemoteError / CacheError out
    of _pin_at_mount into the main nursery. Now each is logged, the mount stays up and
    answers, and 'cachefs pin' of the same path fails with one clear line, the mount
    still up."""
    server = server_for("publickey")
    _refusing_share(login_user)
    try:
        mount = Mount(server.address(), tmp_path / "mnt", tmp_path / "cache", "--known-hosts",
                      str(server.known_hosts), "--identity", str(server.identity), "--timeout", "3",
                      "--pin", "docs", "--pin", "locked", "--pin", "missing", "-v")
        with mount:
            mnt = mount.mountpoint
            deadline = time.monotonic() + 20
            while mount.log_text().count("could not pin") < 3 and time.monotonic() < deadline:
                assert mount.process is not None and mount.process.poll() is None, mount.log_text()
                time.sleep(0.1)
            log = mount.log_text()
            assert log.count("could not pin") == 3, log
            time.sleep(0.5)
            assert mount.process is not None and mount.process.poll() is None, log
            assert _answers(mnt)
            assert (mnt / "docs" / "ok.txt").read_bytes() == b"readable\n"
            for path, words in (("docs", ["Permission denied"]), ("locked", ["Permission denied"]),
                                ("missing", ["missing: No such file or directory"])):
                reason = failed_with_reason(cachefs("pin", str(mnt / path)), "pin", *words)
                assert "Traceback" not in reason
                assert mount.process.poll() is None and _answers(mnt), mount.log_text()
            assert status(mnt)["state"] == "online"
        mount.assert_clean_log()
    finally:
        _empty(login_user)


def _empty(user: LoginUser) -> None:
    """The module's user shares one folder: left empty for the next test."""
    for path in user.share.rglob("*"):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    for path in user.share.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def test_an_encrypted_caches_source_names_no_remote(tmp_path: Path, sshd, share: Path) -> None:
    """The mount's source (fsname) was the full remote, readable by every local user in
    /proc/*/mountinfo, df and findmnt, although an encrypted cache's log names neither
    its remote's host, user nor path. Without --verbose it is 'cachefs' now; -o fsname=
    and --verbose still name what they name; cachefs list still gives the owner the
    remote (from the mount's status)."""
    from tests.test_mounting import _source

    (share / "f.txt").write_bytes(b"sealed\n")
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32).hex().encode())
    os.chmod(key, 0o600)
    access = ["--identity", str(sshd.identity), "--known-hosts", str(sshd.known_hosts), "--cache-key-file", str(key)]
    mnt = {name: tmp_path / name for name in ("plain", "verbose", "named")}
    for path in mnt.values():
        path.mkdir()
    try:
        ok(cachefs("mount", sshd.address(), str(mnt["plain"]), "--cache-dir", str(tmp_path / "c1"), *access))
        ok(cachefs("mount", sshd.address(), str(mnt["verbose"]), "--cache-dir", str(tmp_path / "c2"), *access, "-v"))
        ok(cachefs("mount", sshd.address(), str(mnt["named"]), "--cache-dir", str(tmp_path / "c3"), *access,
                   "-o", "fsname=work"))
        assert (mnt["plain"] / "f.txt").read_bytes() == b"sealed\n"
        remote = status(mnt["plain"])["remote"]
        assert remote.startswith("sftp://") and str(share) in remote, remote
        assert _source(mnt["plain"]) == ("cachefs", "fuse.cachefs")
        assert _source(mnt["verbose"]) == (remote, "fuse.cachefs")
        assert _source(mnt["named"]) == ("work", "fuse.cachefs")
        with open("/proc/self/mountinfo") as f:
            line = next(line for line in f if f" {mnt['plain']} " in line)
        assert str(share) not in line and sshd.user not in line.split(" - ")[1], line
        df = subprocess.run(["df", str(mnt["plain"])], capture_output=True, text=True, timeout=10).stdout
        assert df.splitlines()[1].startswith("cachefs "), df
        rows = {r["mountpoint"]: r for r in json.loads(ok(cachefs("list", "--json")).stdout)}
        assert rows[str(mnt["plain"])]["remote"] == remote and rows[str(mnt["plain"])]["state"] == "online"
    finally:
        for path in mnt.values():
            _stop_daemon(path)


def test_a_cache_in_use_is_refused_before_a_password_is_asked(server_for, login_user: LoginUser,
                                                              tmp_path: Path) -> None:
    """log_in_once (which may ask for a password) ran before the check that the cache is
    free: a second mount of a cache in use asked for the password, then was refused. The
    check comes first now: askpass is never run."""
    server = server_for("password")
    put(login_user, "a.txt", b"first\n")
    secret = password_file(tmp_path, login_user.password)
    calls = tmp_path / "askpass-calls"
    askpass = tmp_path / "askpass"
    askpass.write_text(f"#!/bin/sh\necho \"$1\" >> {calls}\necho {login_user.password}\n")
    os.chmod(askpass, 0o700)
    first = mount_args(server, tmp_path, "--password-file", str(secret))
    second = [first[0], str(tmp_path / "mnt2"), *mount_args(server, tmp_path)[2:]]
    env = dict(os.environ, SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force")
    try:
        result = run_mount(first)
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "mnt" / "a.txt").read_bytes() == b"first\n"
        for foreground in ([], ["-f"]):
            result = run_mount([*second, *foreground], env=env)
            assert result.returncode == 1 and "is in use by another cachefs mount" in result.stderr, result
            assert not calls.exists(), calls.read_text()
            assert not is_mounted(tmp_path / "mnt2")
    finally:
        stop_detached(tmp_path / "mnt")
        stop_detached(tmp_path / "mnt2")
        _empty(login_user)


def test_a_cache_in_use_is_refused_before_its_passphrase_is_asked(tmp_path: Path, sshd) -> None:
    """The same for the cache key's passphrase, asked on the terminal by cachefs mount."""
    from tests.test_login import Terminal

    key = tmp_path / "key"
    key.write_bytes(os.urandom(32).hex().encode())
    os.chmod(key, 0o600)
    access = ["--cache-dir", str(tmp_path / "cache"), "--identity", str(sshd.identity),
              "--known-hosts", str(sshd.known_hosts)]
    (tmp_path / "mnt").mkdir()
    try:
        ok(cachefs("mount", sshd.address(), str(tmp_path / "mnt"), *access, "--cache-key-file", str(key)))
        terminal = Terminal([sshd.address(), str(tmp_path / "mnt2"), *access, "--encrypt-cache"])
        terminal.read(30, until=b"passphrase")
        if b"passphrase" in terminal.out:  # asked: it would wait for an answer
            os.kill(terminal.pid, signal.SIGKILL)
        code = terminal.wait()
        assert b"passphrase" not in terminal.out, terminal.out
        assert code == 1 and b"is in use by another cachefs mount" in terminal.out, terminal.out
    finally:
        _stop_daemon(tmp_path / "mnt")
        stop_detached(tmp_path / "mnt2")
