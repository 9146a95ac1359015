"""The handler API (docs/handlers.md): a third-party handler registered in the
``cachefs.remotes`` entry point group serves its scheme through the same ``mount.py`` users
run, and the capabilities it declares are what the mount answers by (a symlink or hard link
on a remote without them, a name it cannot carry: refused at once, nothing journaled).

The handler here is a real installed distribution as Python finds one (a ``*.dist-info``
folder with ``entry_points.txt`` on ``PYTHONPATH``), a folder-backed remote like the
built-in local one, so the test needs no server.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.fixtures.mount import MOUNT_SCRIPT, REPO, Mount, status

HANDLER = '''
import errno
from cachefs.remote import Capabilities
from cachefs.remote.local import LocalRemote


class FolderRemote(LocalRemote):
    """xdir://host/path: the folder /path here, carrying neither symlinks nor hard links,
    refusing names with a colon (as an SMB server does)."""

    capabilities = Capabilities(symlinks=False, hard_links=False, xattrs=False, owners=False)

    @classmethod
    def from_address(cls, address, options, pacer=None):
        remote = cls(address.path, timeout=options.timeout)
        remote.description = "xdir://" + address.host + address.path
        return remote

    def name_error(self, name):
        return errno.EINVAL if b":" in name else None

    def allow_login_again(self):
        import os
        with open(os.environ["XDIR_TOLD"], "a") as told:
            told.write("allow_login_again" + chr(10))
'''


@pytest.fixture
def plugin(tmp_path: Path) -> dict[str, str]:
    """An installed third-party handler for ``xdir://``; the environment that finds it."""
    site = tmp_path / "site"
    (site / "xdir_handler-1.0.dist-info").mkdir(parents=True)
    (site / "xdir_handler.py").write_text(HANDLER)
    (site / "xdir_handler-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: xdir-handler\nVersion: 1.0\n")
    (site / "xdir_handler-1.0.dist-info" / "entry_points.txt").write_text(
        "[cachefs.remotes]\nxdir = xdir_handler:FolderRemote\n")
    return {"PYTHONPATH": f"{site}{os.pathsep}{REPO}"}


def test_a_scheme_without_a_handler_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    result = subprocess.run([sys.executable, str(MOUNT_SCRIPT), "gopher://h/x", str(tmp_path / "mnt"),
                             "--cache-dir", str(tmp_path / "cache")],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result
    assert result.stderr.strip().splitlines() == [
        "cachefs: bad REMOTE 'gopher://h/x': no handler for gopher:// (known: dav, davs, file, sftp, "
        "smb; a third-party handler registers in the 'cachefs.remotes' entry point group)"], result.stderr
    assert not (tmp_path / "cache").exists()


def test_a_third_party_handler_serves_its_scheme_and_its_capabilities_hold(
        tmp_path: Path, share: Path, plugin: dict[str, str]) -> None:
    (share / "hello.txt").write_bytes(b"from the share\n")
    with Mount(f"xdir://localhost{share}", tmp_path / "mnt", tmp_path / "cache", "--timeout", "2",
               env={**plugin, "XDIR_TOLD": str(tmp_path / "told")}) as mount:
        mnt = mount.mountpoint
        assert (mnt / "hello.txt").read_bytes() == b"from the share\n"
        assert status(mnt)["remote"] == f"xdir://localhost{share}"
        (mnt / "new.txt").write_bytes(b"made here\n")
        for attempt in (lambda: os.symlink("hello.txt", mnt / "link"),
                        lambda: os.link(mnt / "hello.txt", mnt / "hard")):
            with pytest.raises(OSError) as caught:
                attempt()
            assert caught.value.errno == errno.EPERM
        with pytest.raises(OSError) as caught:
            (mnt / "a:b").write_bytes(b"x")
        assert caught.value.errno == errno.EINVAL
        with pytest.raises(OSError) as caught:
            os.rename(mnt / "new.txt", mnt / "new:txt")
        assert caught.value.errno == errno.EINVAL
        (mnt / ".cachefs" / "control").write_text("sync\n")
        assert status(mnt)["pending"] == 0
        # "online" lets a handler try a refused login again
        (mnt / ".cachefs" / "control").write_text("online\n")
        assert (tmp_path / "told").read_text() == "allow_login_again\n"
    assert (share / "new.txt").read_bytes() == b"made here\n"
    assert sorted(os.listdir(share)) == ["hello.txt", "new.txt"]


def test_the_entry_point_group_lists_built_ins_and_third_party_handlers(plugin: dict[str, str]) -> None:
    script = textwrap.dedent("""
        from cachefs.remote import handler_for, handlers
        print(sorted(handlers()))
        print(handler_for("xdir").__name__, handler_for("sftp").__name__, handler_for("file").__name__)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env={**os.environ, **plugin})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["['dav', 'davs', 'file', 'sftp', 'smb', 'xdir']",
                                          "FolderRemote SftpRemote LocalRemote"]


def test_a_handler_that_fails_to_load_is_refused_in_one_line(tmp_path: Path) -> None:
    """A third party's module that raises as it is imported (a syntax error, a missing
    dependency, anything): one line naming the handler and the error, no traceback."""
    site = tmp_path / "site"
    (site / "broken_handler-1.0.dist-info").mkdir(parents=True)
    (site / "broken_handler.py").write_text("raise RuntimeError('needs libfoo')\n")
    (site / "broken_handler-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: broken-handler\nVersion: 1.0\n")
    (site / "broken_handler-1.0.dist-info" / "entry_points.txt").write_text(
        "[cachefs.remotes]\nbroken = broken_handler:Remote\n")
    (tmp_path / "mnt").mkdir()
    result = subprocess.run([sys.executable, str(MOUNT_SCRIPT), "broken://h/x", str(tmp_path / "mnt"),
                             "--cache-dir", str(tmp_path / "cache")],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}"})
    assert result.returncode == 1, result
    assert result.stderr.strip().splitlines() == [
        "cachefs: bad REMOTE 'broken://h/x': the handler of broken:// (broken_handler:Remote) cannot be "
        "loaded: RuntimeError: needs libfoo"], result.stderr


def test_owners_remote_on_a_remote_that_keeps_none_is_refused(tmp_path: Path, share: Path,
                                                             plugin: dict[str, str]) -> None:
    """``--owners remote`` asks for the server's owners: a handler whose capabilities
    keep none (SMB, WebDAV, here xdir) is refused in one line, nothing mounted or made."""
    (tmp_path / "mnt").mkdir()
    result = subprocess.run([sys.executable, str(MOUNT_SCRIPT), f"xdir://localhost{share}", str(tmp_path / "mnt"),
                             "--cache-dir", str(tmp_path / "cache"), "--owners", "remote"],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                            env={**os.environ, **plugin})
    assert result.returncode == 1, result
    assert result.stderr.strip().splitlines() == [
        "cachefs: --owners remote: xdir:// keeps no owners (files there are the login's): use --owners local"]
    assert not (tmp_path / "cache").exists()
