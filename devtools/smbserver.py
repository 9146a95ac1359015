"""A real Samba ``smbd`` on 127.0.0.1 for tests, the demo and benchmarks.

Owns: one private smbd (its ``smb.conf``, a passdb holding one user and a random
password, its state, lock, cache, pid and private folders, and with a ``kdc`` the keytab
of its service principal, all inside ``workdir``), one
share named ``cachefs`` serving ``share``, and the processes that smbd starts.
Must not touch: the system's Samba (``/etc/samba``, ``/var/lib/samba``, ``/run/samba``),
the system's users or passwords, or any process it did not start. Processes are stopped
by their PID only.

The user is the current one (root where the tests run: Samba lets root log in when the
passdb knows it and ``invalid users`` does not name it, as here); files written through
the server are the user's (``force user``), so a test reads and writes them directly in
``share`` and the other way round. ``stop()`` also ends the per-connection smbd
processes, so that a stopped server looks to clients like a server that went away
(connections reset), not like a listener that merely stopped accepting; ``start()``
again listens on the same port.
"""

from __future__ import annotations

import getpass
import logging
import os
import secrets
import shutil
import subprocess
from pathlib import Path

from devtools.devserver import ServerProcess, _free_port, log_tail, write_private
from devtools.kdc import Kdc

log = logging.getLogger(__name__)

SMBD_CANDIDATES = ("/usr/sbin/smbd", "/usr/local/sbin/smbd")
SMBPASSWD_CANDIDATES = ("/usr/bin/smbpasswd", "/usr/local/bin/smbpasswd")
START_TIMEOUT = 15.0
SHARE_NAME = "cachefs"


def _find(candidates: tuple[str, ...], what: str) -> str:
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(os.path.basename(candidates[0]))
    if found:
        return found
    raise FileNotFoundError(f"{what} not found (Debian package samba; looked in {', '.join(candidates)})")


class SmbServer(ServerProcess):
    """A throw-away Samba server sharing ``share`` as ``\\\\127.0.0.1\\cachefs`` to the
    current user, with a password of its own (``password``, also in ``password_file``)."""

    def __init__(self, workdir: Path, share: Path | None = None, port: int = 0,
                 password: str | None = None, case_sensitive: bool = False, kdc: Kdc | None = None) -> None:
        """``case_sensitive``: Samba's ``case sensitive`` for the share (off by default,
        as on Windows and most Samba servers: names differing in case are one file).
        ``kdc``: Kerberos logins too, with tickets of that realm for the service
        ``cifs/localhost`` (a client names the server ``localhost``): its key in a keytab of
        this server's own (``kerberos method = dedicated keytab``)."""
        self.workdir = Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.share = Path(share).absolute() if share is not None else self.workdir / "share"
        self.share.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or _free_port()
        self.user = getpass.getuser()
        self.password = password or secrets.token_urlsafe(12)
        self.password_file = self.workdir / "password"
        self.config = self.workdir / "smb.conf"
        self.log_file = self.workdir / "smbd.log"
        self.case_sensitive = case_sensitive
        self._smbd = _find(SMBD_CANDIDATES, "smbd")
        self._smbpasswd = _find(SMBPASSWD_CANDIDATES, "smbpasswd")
        self._process: subprocess.Popen[bytes] | None = None
        self.kdc = kdc
        if kdc is not None:
            kdc.add_service("cifs/localhost", self.workdir / "smb.keytab")
        write_private(self.password_file, self.password + "\n")
        self._write_config()
        self._add_user()

    # -- setup ----------------------------------------------------------------------
    def _write_config(self) -> None:
        folders = {}
        for name in ("lock", "state", "cache", "private", "pid", "ncalrpc"):
            folders[name] = self.workdir / name
            folders[name].mkdir(exist_ok=True)
        lines = [
            "[global]",
            "server role = standalone server",
            f"smb ports = {self.port}",
            f"interfaces = {self.host}",
            "bind interfaces only = yes",
            "disable netbios = yes",
            f"lock directory = {folders['lock']}",
            f"state directory = {folders['state']}",
            f"cache directory = {folders['cache']}",
            f"private dir = {folders['private']}",
            f"pid directory = {folders['pid']}",
            f"ncalrpc dir = {folders['ncalrpc']}",
            f"passdb backend = tdbsam:{self.workdir / 'passdb.tdb'}",
            f"log file = {self.log_file}",
            "max log size = 0",
            "log level = 1",
            "load printers = no",
            "printing = bsd",
            "printcap name = /dev/null",
            "disable spoolss = yes",
            "map to guest = never",
            "server min protocol = SMB2_02",
            # (what clients other than cachefs's see of the share does not matter here)
            "unix extensions = no",
            *([] if self.kdc is None else [
                "kerberos method = dedicated keytab",
                f"dedicated keytab file = FILE:{self.workdir / 'smb.keytab'}",
                f"realm = {self.kdc.realm}",
            ]),
            "",
            f"[{SHARE_NAME}]",
            f"path = {self.share}",
            "read only = no",
            "browseable = yes",
            f"valid users = {self.user}",
            f"force user = {self.user}",
            "create mask = 0644",
            "directory mask = 0755",
            f"case sensitive = {'yes' if self.case_sensitive else 'no'}",
        ]
        self.config.write_text("\n".join(lines) + "\n")

    def _add_user(self) -> None:
        """The user into the private passdb (smbpasswd reads the password twice)."""
        result = subprocess.run(
            [self._smbpasswd, "-c", str(self.config), "-a", "-s", self.user],
            input=(self.password + "\n" + self.password + "\n").encode(),
            capture_output=True, timeout=30,
        )
        if result.returncode != 0:
            raise RuntimeError(f"smbpasswd could not add {self.user}: "
                               f"{result.stderr.decode(errors='replace').strip()}")

    # -- life cycle (``ServerProcess``) ---------------------------------------------
    name = "smbd"
    start_timeout = START_TIMEOUT

    def _launch(self) -> "subprocess.Popen[bytes]":
        with open(self.workdir / "smbd.out", "ab") as log_handle:
            # (a session of its own: smbd's parent, told to stop, signals its whole process
            # group, which would otherwise be the caller's)
            return subprocess.Popen([self._smbd, "-F", "--no-process-group", "-s", str(self.config)],
                                    stdin=subprocess.DEVNULL, stdout=log_handle, stderr=log_handle,
                                    env=dict(os.environ, **(self.kdc.env if self.kdc else {})),
                                    start_new_session=True)

    def _log_tail(self) -> str:
        return log_tail(self.workdir, ("smbd.out", "smbd.log"))

    # -- helpers for tests and the demo ---------------------------------------------
    def address(self, path: str = "", host: str | None = None) -> str:
        """``smb://USER@127.0.0.1:PORT/cachefs[/path]`` (``host``: another name of the
        server, ``localhost`` for a Kerberos login)."""
        tail = "/" + path.strip("/") if path.strip("/") else ""
        return f"smb://{self.user}@{host or self.host}:{self.port}/{SHARE_NAME}{tail}"

    def mount_args(self) -> list[str]:
        """The cachefs options a mount of ``address()`` needs."""
        return ["--password-file", str(self.password_file)]
