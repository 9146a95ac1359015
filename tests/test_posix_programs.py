"""The programs issue 23 names, on a real mount, each in three phases: ``online``,
``offline`` (``offline`` written to the control file first, then back online and synced)
and ``remount`` (made in one mount, used again in the next mount of the same cache):

- a program that binds a unix socket in the mount (gpg-agent with GNUPGHOME there, and a
  plain socket server a client reaches by path);
- ``mkfifo`` with a reader and a writer;
- ``cp -a`` and ``rsync -aX`` of a tree with user extended attributes, into the mount,
  within it and out of it;
- ``chown`` as root with ``--owners remote``, seen on the mount and on the server.

The server's copy (the sshd fixture's share) is checked where the object belongs there:
FIFOs and sockets never reach it (local-only objects), owners do, and user xattrs stay in
the cache over SFTP (no standard way to carry them).
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from tests.fixtures.mount import status
from tests.test_programs import need, run
from tests.test_special_files import state_of
from tests.test_writes import control, go_offline, sync_until_done

PHASES = ["online", "offline", "remount"]
MOUNT_OPTIONS = ("--owners", "remote", "-o", "allow_other,default_permissions")


class Phases:
    """One scenario's mounts: ``prepare`` runs in the first mount (offline there for the
    ``offline`` phase), ``use`` in the mount the phase ends in; ``settle`` brings the
    server up to date."""

    def __init__(self, phase: str, mount_factory, share: Path) -> None:
        self.phase = phase
        self.factory = mount_factory
        self.share = share
        self.mount = mount_factory(*MOUNT_OPTIONS).start()
        self.mnt: Path = self.mount.mountpoint
        if phase == "offline":
            go_offline(self.mnt)
            assert status(self.mnt)["state"] == "offline"

    def switch(self) -> None:
        """Between making and using: a remount for the ``remount`` phase."""
        if self.phase == "remount":
            sync_until_done(self.mnt)
            self.mount.stop()
            self.mount = self.factory(*MOUNT_OPTIONS).start()
            assert self.mount.mountpoint == self.mnt

    def settle(self) -> None:
        if self.phase == "offline":
            control(self.mnt, "online")
        sync_until_done(self.mnt, 60)
        st = status(self.mnt)
        assert st["pending"] == 0 and st["conflicts"] == 0, st


@pytest.fixture(params=PHASES)
def phases(request, mount_factory, share: Path):
    yield Phases(request.param, mount_factory, share)


# -- unix sockets ----------------------------------------------------------------------------

def test_unix_socket_server_in_the_mount(phases: Phases) -> None:
    path = phases.mnt / "run" / "echo.sock"
    path.parent.mkdir()
    phases.switch()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if path.exists():  # a socket left by the first mount: a server removes it and binds again
        assert stat.S_ISSOCK(path.lstat().st_mode)
        path.unlink()
    server.bind(str(path))
    server.listen(1)
    server.settimeout(10)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(conn.recv(100).upper())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert "echo.sock" in os.listdir(path.parent)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(10)
            client.connect(str(path))
            client.sendall(b"hello")
            assert client.recv(100) == b"HELLO"
    finally:
        thread.join(10)
        server.close()
    assert state_of(path) == "local"  # (cachefs status: no user. attribute reaches a socket)
    phases.settle()
    assert not (phases.share / "run" / "echo.sock").exists()  # never sent to the server
    path.unlink()
    assert os.listdir(path.parent) == []


def test_gpg_agent_with_its_home_in_the_mount(phases: Phases) -> None:
    need("gpg-agent")
    need("gpgconf")
    home = phases.mnt / "gnupg"
    home.mkdir(mode=0o700)
    env = {"GNUPGHOME": str(home)}
    for round_ in (1, 2) if phases.phase == "remount" else (1,):
        if round_ == 2:  # the socket the first agent left is in the cache; a new one binds again
            phases.switch()
        run("gpgconf", "--launch", "gpg-agent", env=env)
        try:
            out = run("gpg-connect-agent", "GETINFO version", "/bye", env=env).stdout
            assert out.startswith("D "), out
            assert stat.S_ISSOCK((home / "S.gpg-agent").lstat().st_mode)
        finally:
            run("gpgconf", "--kill", "gpg-agent", env=env, check=False)
    phases.settle()
    assert (phases.share / "gnupg").is_dir()
    assert not (phases.share / "gnupg" / "S.gpg-agent").exists()


# -- FIFOs -----------------------------------------------------------------------------------

def test_mkfifo_with_a_reader_and_a_writer(phases: Phases) -> None:
    fifo = phases.mnt / "build" / "pipe"
    fifo.parent.mkdir()
    run("mkfifo", "-m", "0640", fifo)
    phases.switch()
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert stat.S_IMODE(fifo.lstat().st_mode) == 0o640
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE)
    try:
        run("sh", "-c", f"printf 'through the pipe\\n' > {fifo}", timeout=20)
        out, _ = reader.communicate(timeout=20)
    finally:
        reader.kill()
    assert out == b"through the pipe\n"
    fifo.rename(fifo.parent / "pipe2")
    phases.settle()
    assert os.listdir(phases.share / "build") == []
    assert stat.S_ISFIFO((fifo.parent / "pipe2").lstat().st_mode)


# -- extended attributes ---------------------------------------------------------------------

def _tree_with_xattrs(root: Path) -> dict[str, dict[str, bytes]]:
    (root / "sub").mkdir(parents=True)
    made: dict[str, dict[str, bytes]] = {}
    for rel, attrs in {"a.txt": {"user.tag": b"red", "user.comment": b"x" * 300},
                       "sub/b.bin": {"user.origin": b"\x00\xffbinary"},
                       "sub": {"user.folder": b"yes"}}.items():
        path = root / rel
        if not path.exists():
            path.write_bytes(rel.encode() * 10)
        for name, value in attrs.items():
            os.setxattr(path, name, value)
        made[rel] = attrs
    return made


def _user_xattrs(path: Path) -> dict[str, bytes]:
    return {name: os.getxattr(path, name) for name in os.listxattr(path) if name.startswith("user.")}


@pytest.mark.parametrize("copier", ["cp", "rsync"])
def test_copies_keep_user_xattrs(phases: Phases, copier: str, tmp_path: Path) -> None:
    need("rsync")
    source = tmp_path / "source"
    made = _tree_with_xattrs(source)

    def copy(src: Path, dst: Path) -> None:
        if copier == "cp":
            run("cp", "-a", f"{src}/.", dst)
        else:
            run("rsync", "-aX", f"{src}/", f"{dst}/")

    inside = phases.mnt / "tree"
    inside.mkdir()
    copy(source, inside)
    phases.switch()
    for rel, attrs in made.items():
        assert _user_xattrs(inside / rel) == attrs, rel
    again = phases.mnt / "tree2"
    again.mkdir()
    copy(inside, again)  # within the mount
    out = tmp_path / "out"
    out.mkdir()
    copy(again, out)  # out of the mount
    for rel, attrs in made.items():
        assert _user_xattrs(again / rel) == attrs, rel
        assert _user_xattrs(out / rel) == attrs, rel
    phases.settle()
    assert (phases.share / "tree2" / "a.txt").read_bytes() == (source / "a.txt").read_bytes()


# -- owners ----------------------------------------------------------------------------------

def test_chown_as_root(phases: Phases) -> None:
    path = phases.mnt / "owned.txt"
    path.write_text("mine\n")
    folder = phases.mnt / "owned-dir"
    folder.mkdir()
    os.chown(path, 1234, 2345)
    run("chown", "-R", "4321:5432", folder)
    phases.switch()
    assert (path.stat().st_uid, path.stat().st_gid) == (1234, 2345)
    assert (folder.stat().st_uid, folder.stat().st_gid) == (4321, 5432)
    phases.settle()
    on_server = phases.share / "owned.txt"
    assert (on_server.stat().st_uid, on_server.stat().st_gid) == (1234, 2345)
    assert ((phases.share / "owned-dir").stat().st_uid, (phases.share / "owned-dir").stat().st_gid) \
        == (4321, 5432)
