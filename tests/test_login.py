"""Logins that need a secret: a password, keyboard-interactive answers, a key's passphrase;
given by --password-file, SSH_ASKPASS or typed on a terminal before the mount detaches,
and never asked again when the mount reconnects (the pool, the transfer processes).
Also the sshfs -o names (IdentityFile, Port, StrictHostKeyChecking, ...).

Password and keyboard-interactive logins need a system user with a password: the
``login_user`` fixture makes a throw-away one (``useradd``, a random name and password,
its home a folder under /tmp) and deletes it afterwards; the private sshd checks its
password against the shadow file (password) or through PAM (keyboard-interactive). The
suite runs as root: not root, these tests fail with that reason rather than skip.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pty
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import pytest

from cachefs import cli
from devtools.devserver import SshServer, descendants
from tests.fixtures.mount import MOUNT_SCRIPT, REPO, Mount, fusermount_unmount, is_mounted, status


@dataclass
class LoginUser:
    name: str
    password: str
    home: Path
    share: Path


@pytest.fixture(scope="module")
def login_user() -> Iterator[LoginUser]:
    """A throw-away system user with a known password, deleted afterwards."""
    assert os.geteuid() == 0, "these tests make a system user: run the suite as root"
    name = "cfslogin" + secrets.token_hex(4)
    password = secrets.token_urlsafe(12)
    home = Path(tempfile.mkdtemp(prefix="cachefs-login-"))
    os.chmod(home, 0o755)  # the user reads its share and authorized_keys below
    subprocess.run(["useradd", "-M", "-d", str(home), "-s", "/bin/sh",
                    "-c", "cachefs test user (throw-away)", name], check=True, timeout=30)
    try:
        subprocess.run(["chpasswd"], input=f"{name}:{password}\n".encode(), check=True, timeout=30)
        share = home / "share"
        share.mkdir()
        shutil.chown(share, name, name)
        yield LoginUser(name, password, home, share)
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], timeout=30)  # sessions left by a failure
        subprocess.run(["userdel", name], check=True, timeout=30)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def server_for(login_user: LoginUser) -> Iterator:
    """``make(logins, methods=None)``: a private sshd where ``login_user`` logs in with those."""
    made: list[SshServer] = []

    def make(*logins: str, methods: str | None = None) -> SshServer:
        server = SshServer(Path(tempfile.mkdtemp(prefix="sshd-", dir=login_user.home)),
                           share=login_user.share, user=login_user.name, logins=logins,
                           authentication_methods=methods)
        os.chmod(server.workdir, 0o755)
        os.chmod(server.authorized_keys, 0o644)  # sshd reads it as the user
        server.start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


def put(user: LoginUser, name: str, data: bytes) -> None:
    path = user.share / name
    path.write_bytes(data)
    shutil.chown(path, user.name, user.name)


def cut_sessions(server: SshServer) -> None:
    """Kill the server's per-connection processes: every connection of the mount ends."""
    assert server._process is not None
    sessions = descendants(server._process.pid)
    assert sessions, "the mount has no connection to cut"
    for pid in sessions:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # one of PAM's helpers, ended meanwhile
            pass


def password_file(tmp_path: Path, secret: str, mode: int = 0o600) -> Path:
    path = tmp_path / "secret"
    path.write_text(secret + "\n")
    os.chmod(path, mode)
    return path


def locked_key(tmp_path: Path, server: SshServer, passphrase: str) -> Path:
    """A passphrase-protected key that ``server`` accepts."""
    key = tmp_path / "locked_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", "locked", "-f", str(key)],
                   check=True, timeout=30, stdin=subprocess.DEVNULL)
    with open(server.authorized_keys, "a") as f:
        f.write(key.with_suffix(".pub").read_text())
    return key


def mount_args(server: SshServer, tmp_path: Path, *extra: str) -> list[str]:
    return [server.address(), str(tmp_path / "mnt"), "--cache-dir", str(tmp_path / "cache"),
            "--known-hosts", str(server.known_hosts), "--timeout", "3", "--heartbeat", "1",
            "--attr-timeout", "0.5", "-v", *extra]


def run_mount(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``cachefs mount`` with no terminal (detaching); its outcome."""
    (Path(args[1])).mkdir(exist_ok=True)
    return subprocess.run([sys.executable, str(MOUNT_SCRIPT), *args], cwd=REPO, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60, env=env)


class Terminal:
    """``cachefs mount ARGS`` run on a new pseudo-terminal (its controlling terminal)."""

    def __init__(self, args: list[str]) -> None:
        Path(args[1]).mkdir(exist_ok=True)
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the mount command
            os.chdir(REPO)
            os.execv(sys.executable, [sys.executable, str(MOUNT_SCRIPT), *args])
        self.out = b""
        self.closed = False

    def read(self, seconds: float, until: bytes | None = None) -> None:
        """What the command writes, for ``seconds`` or until ``until`` shows after the
        last answer or the terminal closes."""
        deadline = time.monotonic() + seconds
        start = len(self.out)
        while not self.closed and time.monotonic() < deadline:
            if until is not None and until in self.out[start:]:
                return
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:  # EIO: every other end of the terminal closed
                    data = b""
                self.out += data
                self.closed = not data

    def answer(self, prompt: bytes, text: bytes) -> None:
        self.read(30, until=prompt)
        assert prompt in self.out, self.out
        os.write(self.fd, text + b"\n")

    def wait(self) -> int:
        self.read(60)
        _, code = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(code)


def mount_on_terminal(args: list[str], answers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    """``cachefs mount`` (detaching) on a new pseudo-terminal, answering each prompt in
    turn; its exit status and everything it wrote there."""
    terminal = Terminal(args)
    for prompt, text in answers:
        terminal.answer(prompt, text)
    return terminal.wait(), terminal.out


def stop_detached(mnt: Path) -> None:
    """Unmount a detached mount and wait for its process to end."""
    if not is_mounted(mnt):
        return
    try:
        pid = int(status(mnt)["pid"])
    except Exception:
        pid = None
    fusermount_unmount(mnt)
    deadline = time.monotonic() + 20
    while pid is not None and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def logins(log: Path | Terminal) -> int:
    """How many connections logged in so far (the mount's and its transfer processes')."""
    if isinstance(log, Terminal):
        log.read(0.1)
        return log.out.count(b": authenticated with ")
    return log.read_text(errors="replace").count(": authenticated with ")


def read_after_reconnect(mnt: Path, server: SshServer, user: LoginUser, name: str, log: Path,
                         terminal: Terminal | None = None) -> None:
    """Once the mount's 4 connections are open (its own and the 3 transfer processes'),
    cut them all, then read a file never read (a transfer process fetches it over a new
    connection) and list the share (the mount's own new connection): each logs in again
    with what it remembered."""
    where = log if terminal is None else terminal  # a foreground mount logs to its terminal
    wait_until(lambda: logins(where) >= 4, "the 4 connections logged in")
    time.sleep(0.3)
    before = logins(where)
    cut_sessions(server)
    data = os.urandom(3 << 20)  # large: fetched by the transfer processes in ranges
    put(user, name, data)
    wait_until(lambda: (mnt / name).read_bytes() == data, f"{name} read after the cut")
    assert name in os.listdir(mnt)
    wait_until(lambda: logins(where) >= before + 2, "two logins again after the cut")
    assert status(mnt)["state"] == "online", status(mnt)


def wait_until(check, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


# -- password and keyboard-interactive logins ---------------------------------------------------

@pytest.mark.parametrize("logins", [("password",), ("keyboard-interactive",)])
def test_password_file_logs_in_and_reconnects(server_for, login_user: LoginUser, tmp_path: Path,
                                              logins: tuple[str, ...]) -> None:
    server = server_for(*logins)
    put(login_user, "a.txt", b"hello\n")
    secret = password_file(tmp_path, login_user.password)
    with Mount(server.address(), tmp_path / "mnt", tmp_path / "cache", "--known-hosts",
               str(server.known_hosts), "--password-file", str(secret), "--timeout", "3",
               "--heartbeat", "1", "--attr-timeout", "0.5", "-v") as mount:
        assert (mount.mountpoint / "a.txt").read_bytes() == b"hello\n"
        read_after_reconnect(mount.mountpoint, server, login_user, "b.txt", mount.log_path)
        text = mount.log_text()
    assert login_user.password not in text, "the password is in the log"


@contextlib.contextmanager
def _password_file_mount(server: SshServer, user: LoginUser, tmp_path: Path,
                         **kwargs: Any) -> Iterator[tuple[Mount, Path]]:
    """A mount of ``server`` logged in with ``--password-file`` (its file: the second item),
    a.txt read through it; the user's password as it was once the block ends (a test may
    change it)."""
    put(user, "a.txt", b"hello\n")
    secret = password_file(tmp_path, user.password)
    try:
        with Mount(server.address(), tmp_path / "mnt", tmp_path / "cache", "--known-hosts",
                   str(server.known_hosts), "--password-file", str(secret), "--timeout", "3",
                   "--heartbeat", "1", "--attr-timeout", "0.5", "-v", **kwargs) as mount:
            assert (mount.mountpoint / "a.txt").read_bytes() == b"hello\n"
            yield mount, secret
    finally:
        _set_password(user, user.password)


def _set_password(user: LoginUser, password: str) -> None:
    subprocess.run(["chpasswd"], input=f"{user.name}:{password}\n".encode(), check=True, timeout=30)


def _refusals(text: str) -> int:
    """Logins refused, as the mount's log (-v) tells them (its own and its transfer
    processes')."""
    return text.count(": password refused") + text.count(": keyboard-interactive login refused")


def _settled(mount: Mount) -> tuple[int, int]:
    """Once the mount's 4 connections are in: the refusals so far, and the logins. (A
    transfer process's first login at mount, made side by side with the others, is
    sometimes refused by this test's sshd, the right password given, before this
    session's changes and after alike: counted from here.)"""
    wait_until(lambda: logins(mount.log_path) >= 4, "the 4 connections logged in")
    return _refusals(mount.log_text()), logins(mount.log_path)


def _read_after_cuts(server: SshServer, user: LoginUser, mnt: Path, rounds: int) -> None:
    """Cut every connection, then read a new large file (the transfer processes log in
    again) and check it, ``rounds`` times."""
    for round_ in range(rounds):
        cut_sessions(server)
        data = os.urandom(3 << 20)
        put(user, f"b{round_}", data)
        wait_until(lambda: (mnt / f"b{round_}").read_bytes() == data, f"b{round_} read after a cut")


def test_a_password_changed_in_its_file_is_taken_when_the_mount_reconnects(
        server_for, login_user: LoginUser, tmp_path: Path) -> None:
    """--password-file is read again at each login: a password changed on the server and
    in the file is taken by the next reconnection, without a remount (the mount kept the
    password read when it started, was refused, and stayed offline)."""
    server = server_for("password")
    new = login_user.password + "-changed"
    with _password_file_mount(server, login_user, tmp_path) as (mount, secret):
        _set_password(login_user, new)
        secret.write_text(new + "\n")
        _read_after_cuts(server, login_user, mount.mountpoint, 1)
        assert status(mount.mountpoint)["state"] == "online"
        text = mount.log_text()
    assert new not in text and login_user.password not in text, "a password is in the log"


def test_a_password_written_to_its_file_before_the_server_takes_it_costs_no_refusal(
        server_for, login_user: LoginUser, tmp_path: Path) -> None:
    """The order that avoids an outage: the new password goes to the file first. What
    worked is tried first, so no login is refused meanwhile (reviewed: the file's line
    first cost a refused login at every connection, which an account lockout counts)."""
    server = server_for("password")
    with _password_file_mount(server, login_user, tmp_path) as (mount, secret):
        before, _logins = _settled(mount)
        secret.write_text(login_user.password + "-next\n")  # not yet on the server
        _read_after_cuts(server, login_user, mount.mountpoint, 2)
        assert status(mount.mountpoint)["state"] == "online"
        assert _refusals(mount.log_text()) == before


def test_a_password_changed_in_its_file_is_answered_to_keyboard_interactive(
        server_for, login_user: LoginUser, tmp_path: Path) -> None:
    """A server that asks by keyboard-interactive only: after a change on the server and in
    the file, the refused remembered answer is followed by the file's line, once per
    connection at most, then remembered (reviewed: the file was never read again there,
    and the mount stayed offline)."""
    server = server_for("keyboard-interactive")
    new = login_user.password + "-changed"
    with _password_file_mount(server, login_user, tmp_path) as (mount, secret):
        before, connections = _settled(mount)
        _set_password(login_user, new)
        secret.write_text(new + "\n")
        _read_after_cuts(server, login_user, mount.mountpoint, 2)
        time.sleep(1)
        assert status(mount.mountpoint)["state"] == "online"
        refused = _refusals(mount.log_text()) - before
    # (at most once per connection, plus one: this test sshd now and then refuses one of
    # several logins made side by side with the right answer, as at mount (``_settled``):
    # CI on f14b9d3 counted 6 for 5 connections; a refusal loop would count many more)
    assert 1 <= refused <= connections + 1, (refused, connections)


def test_a_password_file_others_may_read_now_is_said_in_the_log(
        server_for, login_user: LoginUser, tmp_path: Path) -> None:
    """A password file replaced by one others may read is not read again, and the log
    says why (reviewed: it was passed over without a word, and the refusal blamed the
    password from the file)."""
    server = server_for("password")
    new = login_user.password + "-changed"
    with _password_file_mount(server, login_user, tmp_path, allowed_errors=[r".*"]) as (mount, secret):
        _set_password(login_user, new)
        aside = tmp_path / "secret.new"
        aside.write_text(new + "\n")
        os.chmod(aside, 0o644)
        os.replace(aside, secret)
        cut_sessions(server)
        wait_until(lambda: "may be read by others" in mount.log_text(), "the warning")
        wait_until(lambda: status(mount.mountpoint)["state"] == "offline", "offline")
        text = mount.log_text()
    assert new not in text and login_user.password not in text, "a password is in the log"


def test_password_file_checks(server_for, login_user: LoginUser, tmp_path: Path) -> None:
    server = server_for("password")
    wrong = password_file(tmp_path, "not-" + login_user.password)
    result = run_mount(mount_args(server, tmp_path, "--password-file", str(wrong)))
    assert result.returncode == 1, result
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert "the password from --password-file" in result.stderr and "was refused" in result.stderr
    open_to_all = password_file(tmp_path, login_user.password, 0o644)
    result = run_mount(mount_args(server, tmp_path, "-o", f"password_file={open_to_all}"))
    assert result.returncode == 1 and "may be read by others" in result.stderr, result.stderr
    assert not is_mounted(tmp_path / "mnt")


def test_no_way_to_ask_for_a_password_is_one_clear_line(server_for, login_user: LoginUser,
                                                        tmp_path: Path) -> None:
    server = server_for("keyboard-interactive")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSH_ASKPASS")}
    result = run_mount(mount_args(server, tmp_path), env=env)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "no terminal to ask on" in result.stderr and "--password-file" in result.stderr, result.stderr
    assert "SSH_ASKPASS" in result.stderr


def test_password_typed_on_the_terminal_once(server_for, login_user: LoginUser, tmp_path: Path) -> None:
    """The default (detaching) mount asks on the terminal before it detaches; the password
    is typed once (echo off), and reconnects use it without asking."""
    server = server_for("password")
    put(login_user, "a.txt", b"typed\n")
    mnt = tmp_path / "mnt"
    try:
        code, out = mount_on_terminal(mount_args(server, tmp_path),
                                      [(b"'s password: ", login_user.password.encode())])
        assert code == 0, out
        assert out.count(b"password: ") == 1, out
        assert login_user.password.encode() not in out, "the password was echoed"
        assert (mnt / "a.txt").read_bytes() == b"typed\n"
        read_after_reconnect(mnt, server, login_user, "b.txt", tmp_path / "cache" / "mount.log")
        log = (tmp_path / "cache" / "mount.log").read_text()
        assert login_user.password not in log
    finally:
        stop_detached(mnt)


def test_no_passphrase_asked_where_keys_cannot_log_in(server_for, login_user: LoginUser,
                                                      tmp_path: Path) -> None:
    """A passphrase-protected key and a server that takes passwords only: the password is
    asked for, the passphrase never (ssh would not ask it either)."""
    server = server_for("password")
    key = locked_key(tmp_path, server, "key-secret")
    mnt = tmp_path / "mnt"
    try:
        code, out = mount_on_terminal(mount_args(server, tmp_path, "--identity", str(key)),
                                      [(b"'s password: ", login_user.password.encode())])
        assert code == 0, out
        assert b"Enter passphrase" not in out and out.count(b"password: ") == 1, out
    finally:
        stop_detached(mnt)


def test_foreground_mount_keeps_its_terminal_and_never_asks_again(
        server_for, login_user: LoginUser, tmp_path: Path) -> None:
    """With -f the mount keeps the terminal it was started on: a reconnect still must not
    ask there (the password typed at the start is used)."""
    server = server_for("password")
    put(login_user, "a.txt", b"fg\n")
    mnt = tmp_path / "mnt"
    terminal = Terminal(mount_args(server, tmp_path, "-f"))
    try:
        terminal.answer(b"'s password: ", login_user.password.encode())
        wait_until(lambda: is_mounted(mnt), "mounted")
        assert (mnt / "a.txt").read_bytes() == b"fg\n"
        terminal.read(0.5)
        read_after_reconnect(mnt, server, login_user, "b.txt", tmp_path / "fg.log", terminal)
        terminal.read(1.5)  # the heartbeat's reconnect too
        assert terminal.out.count(b"password: ") == 1, terminal.out
        assert login_user.password.encode() not in terminal.out
    finally:
        fusermount_unmount(mnt)
        assert terminal.wait() == 0, terminal.out


def test_keyboard_interactive_on_the_terminal_with_a_wrong_first_answer(
        server_for, login_user: LoginUser, tmp_path: Path) -> None:
    server = server_for("keyboard-interactive")
    mnt = tmp_path / "mnt"
    try:
        code, out = mount_on_terminal(mount_args(server, tmp_path),
                                      [(b"Password: ", b"wrong"),
                                       (b"Password: ", login_user.password.encode())])
        assert code == 0, out
        assert out.count(b"Password: ") == 2, out  # the server's prompt, shown as it is
        read_after_reconnect(mnt, server, login_user, "c.txt", tmp_path / "cache" / "mount.log")
    finally:
        stop_detached(mnt)


def test_key_then_password(server_for, login_user: LoginUser, tmp_path: Path) -> None:
    """AuthenticationMethods publickey,password: the key's partial success goes on with
    the password (cachefs refused such servers before)."""
    server = server_for("publickey", "password", methods="publickey,password")
    put(login_user, "a.txt", b"both\n")
    secret = password_file(tmp_path, login_user.password)
    with Mount(server.address(), tmp_path / "mnt", tmp_path / "cache", "--known-hosts",
               str(server.known_hosts), "--identity", str(server.identity), "--password-file",
               str(secret), "-v") as mount:
        assert (mount.mountpoint / "a.txt").read_bytes() == b"both\n"


# -- passphrase-protected keys ------------------------------------------------------------------

def test_locked_key_with_password_file(server_for, login_user: LoginUser, tmp_path: Path) -> None:
    server = server_for("publickey")
    key = locked_key(tmp_path, server, "key-secret")
    put(login_user, "a.txt", b"key\n")
    secret = password_file(tmp_path, "key-secret")
    with Mount(server.address(), tmp_path / "mnt", tmp_path / "cache", "--known-hosts",
               str(server.known_hosts), "-o", f"IdentityFile={key},password_file={secret}",
               "--timeout", "3", "--heartbeat", "1", "--attr-timeout", "0.5", "-v") as mount:
        assert (mount.mountpoint / "a.txt").read_bytes() == b"key\n"
        read_after_reconnect(mount.mountpoint, server, login_user, "b.txt", mount.log_path)


def test_locked_key_without_a_way_to_ask_names_the_key(server_for, login_user: LoginUser,
                                                       tmp_path: Path) -> None:
    server = server_for("publickey")
    key = locked_key(tmp_path, server, "key-secret")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSH_A")}  # no agent either
    result = run_mount(mount_args(server, tmp_path, "--identity", str(key)), env=env)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert str(key) in result.stderr and "protected by a passphrase" in result.stderr, result.stderr
    assert "--password-file" in result.stderr and f"ssh-add {key}" in result.stderr


def test_locked_key_with_askpass_asked_once(server_for, login_user: LoginUser, tmp_path: Path,
                                            monkeypatch) -> None:
    server = server_for("publickey")
    key = locked_key(tmp_path, server, "key-secret")
    calls = tmp_path / "askpass-calls"
    askpass = tmp_path / "askpass"
    askpass.write_text(f"#!/bin/sh\necho \"$1\" >> {calls}\necho key-secret\n")
    os.chmod(askpass, 0o700)
    put(login_user, "a.txt", b"askpass\n")
    mnt = tmp_path / "mnt"
    try:
        env = dict(os.environ, SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force")
        result = run_mount(mount_args(server, tmp_path, "--identity", str(key)), env=env)
        assert result.returncode == 0, result.stderr
        assert calls.read_text() == f"Enter passphrase for key '{key}': \n"
        assert (mnt / "a.txt").read_bytes() == b"askpass\n"
        read_after_reconnect(mnt, server, login_user, "b.txt", tmp_path / "cache" / "mount.log")
        assert calls.read_text().count("\n") == 1, "askpass was run again"
    finally:
        stop_detached(mnt)


def test_locked_key_passphrase_typed_on_the_terminal(server_for, login_user: LoginUser,
                                                     tmp_path: Path) -> None:
    server = server_for("publickey")
    key = locked_key(tmp_path, server, "key-secret")
    put(login_user, "a.txt", b"tty key\n")
    mnt = tmp_path / "mnt"
    try:
        code, out = mount_on_terminal(mount_args(server, tmp_path, "--identity", str(key)),
                                      [(b"Enter passphrase for key", b"key-secret")])
        assert code == 0, out
        assert out.count(b"Enter passphrase") == 1 and b"key-secret" not in out, out
        assert (mnt / "a.txt").read_bytes() == b"tty key\n"
        read_after_reconnect(mnt, server, login_user, "b.txt", tmp_path / "cache" / "mount.log")
    finally:
        stop_detached(mnt)


# -- sshfs's -o names ---------------------------------------------------------------------------

def _dash_o(*options: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_mount_arguments(parser)
    args = parser.parse_args(["host:/x", "/mnt", *[a for o in options for a in ("-o", o)]])
    cli.apply_dash_o(args, parser)
    return args


def test_sshfs_option_names() -> None:
    args = _dash_o("IdentityFile=/k,Port=2222,reconnect,ServerAliveInterval=15,ServerAliveCountMax=3",
                   "StrictHostKeyChecking=accept-new,UserKnownHostsFile=/kh,allow_other")
    assert (args.identity, args.port, args.heartbeat) == (Path("/k"), 2222, 15.0)
    assert args.accept_new_host_key is True and args.known_hosts == Path("/kh")
    assert args.fuse_options == ["allow_other"]
    assert _dash_o("StrictHostKeyChecking=yes").accept_new_host_key is False
    assert _dash_o("password_stdin").password_stdin is True


@pytest.mark.parametrize("option, words", [
    ("StrictHostKeyChecking=no", "cachefs always checks host keys"),
    ("StrictHostKeyChecking=off", "--accept-new-host-key"),
    ("ssh_command=ssh -v", "runs no ssh program"),
    ("sftp_server=/usr/lib/sftp-server", "sftp subsystem"),
    ("Port=http", "-o Port=http"),
])
def test_sshfs_options_cachefs_does_otherwise_are_refused(option: str, words: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        _dash_o(option)
    assert exit_.value.code == 2
    assert words in capsys.readouterr().err


def test_password_stdin(server_for, login_user: LoginUser, tmp_path: Path) -> None:
    """sshfs's -o password_stdin: the password is the first line of standard input."""
    server = server_for("password")
    put(login_user, "a.txt", b"stdin\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        result = subprocess.run([sys.executable, str(MOUNT_SCRIPT), *mount_args(server, tmp_path),
                                 "-o", "password_stdin"], cwd=REPO, input=login_user.password + "\n",
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert (mnt / "a.txt").read_bytes() == b"stdin\n"
    finally:
        stop_detached(mnt)


# -- where to ask (OpenSSH's rules; this suite runs without a terminal) --------------------------

@pytest.mark.parametrize("env, uses", [
    ({"SSH_ASKPASS": "/bin/ask"}, None),  # no display, no terminal: nothing to ask with
    ({"SSH_ASKPASS": "/bin/ask", "DISPLAY": ":0"}, "/bin/ask"),
    ({"SSH_ASKPASS": "/bin/ask", "WAYLAND_DISPLAY": "w"}, "/bin/ask"),
    ({"SSH_ASKPASS": "/bin/ask", "SSH_ASKPASS_REQUIRE": "force"}, "/bin/ask"),
    ({"SSH_ASKPASS": "/bin/ask", "SSH_ASKPASS_REQUIRE": "prefer", "DISPLAY": ":0"}, "/bin/ask"),
    ({"SSH_ASKPASS": "/bin/ask", "SSH_ASKPASS_REQUIRE": "never", "DISPLAY": ":0"}, None),
    ({"SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}, None),  # no program named
])
def test_askpass_rules(env: dict[str, str], uses: str | None, monkeypatch) -> None:
    from cachefs.remote.ssh_secrets import Secrets, _Asker

    for name in ("SSH_ASKPASS", "SSH_ASKPASS_REQUIRE", "DISPLAY", "WAYLAND_DISPLAY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    asker = _Asker.find()
    assert (asker.askpass if asker is not None else None) == uses
    secrets = Secrets()
    with secrets.asking() as can_ask:
        assert can_ask is (uses is not None)
    assert not secrets.can_ask, "asking outlived its block"
    assert "key" not in repr(Secrets("pw-text")) and "pw-text" not in repr(Secrets("pw-text"))


def test_secrets_go_to_a_fresh_transfer_process_without_key_objects(tmp_path: Path) -> None:
    """A transfer process started afresh (spawned after a broken pool) gets the secrets
    through its pipe: the passphrase that worked, not the unlocked key object."""
    import pickle

    from cachefs.remote.ssh_secrets import Secrets

    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "pp", "-f", str(key)], check=True,
                   timeout=30, stdin=subprocess.DEVNULL)
    secrets = Secrets("wrong")
    assert secrets.unlocked_key(key) is None  # a wrong one given, and no way to ask
    secrets = Secrets("pp")
    first = secrets.unlocked_key(key)
    assert first is not None and secrets.unlocked_key(key) is first  # kept unlocked
    copy = pickle.loads(pickle.dumps(secrets))
    assert copy._keys == {} and copy.unlocked_key(key) == first
