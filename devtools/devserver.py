"""A real OpenSSH ``sshd`` on 127.0.0.1 for tests, the demo and benchmarks.

Owns: one private sshd (its config, host key, a user key pair, authorized_keys and a
known_hosts file, all inside ``workdir``) and the child process that runs it.
Must not touch: the system's sshd, ``/etc/ssh``, the user's ``~/.ssh`` or any process it
did not start. Processes are stopped by their PID only.

``stop()`` also ends the per-connection sshd processes the server forked, so that a
stopped server looks to clients like a server that went away (connections are reset),
not like a listener that merely stopped accepting.
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote_from_bytes

log = logging.getLogger(__name__)

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN_CANDIDATES = ("/usr/bin/ssh-keygen", "/bin/ssh-keygen")
SFTP_SERVER_CANDIDATES = (
    "/usr/lib/openssh/sftp-server",
    "/usr/lib/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/libexec/sftp-server",
)
START_TIMEOUT = 10.0


def _find(candidates: tuple[str, ...], what: str) -> str:
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(f"{what} not found (looked in {', '.join(candidates)})")


def log_tail(folder: Path, names: tuple[str, ...], size: int = 1500) -> str:
    """The last ``size`` characters of each of a server's log files in ``folder`` (those
    that exist), for the error of a server that would not start."""
    text = ""
    for name in names:
        try:
            text += (folder / name).read_text(errors="replace")[-size:]
        except OSError:
            pass
    return text.strip() or "(no output)"


def write_private(path: Path, text: str) -> None:
    """``text`` as the whole of ``path``, a file only its owner may read (0600 from its
    creation on): a test server's password file, which cachefs refuses otherwise."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc)."""
    result: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return result
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue  # the process ended meanwhile
        # the command name is in parentheses and may contain spaces: parse after the last ')'
        fields = data[data.rfind(b")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            result.append(int(entry))
    return result


def descendants(pid: int) -> list[int]:
    """PIDs below ``pid``: its children, theirs, and so on."""
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in _children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


class ServerProcess:
    """What the throw-away servers share (``SshServer``, ``smbserver.SmbServer``,
    ``davserver.DavServer``): one server process in the foreground, started and waited for
    until its port accepts (bounded), stopped with every process it forked (its
    per-connection children first, so that clients see their connections cut, as when a
    server goes away), and started again on the same port. A subclass gives ``name``,
    ``host``, ``port`` and ``_launch`` (the process, its output to its log), and may
    override ``_log_tail`` and ``_before_start``/``_after_stop``."""

    name = "server"
    start_timeout = START_TIMEOUT  # seconds until the port accepts
    host: str
    port: int
    _process: "subprocess.Popen[bytes] | None" = None

    def _launch(self) -> "subprocess.Popen[bytes]":
        raise NotImplementedError

    def _log_tail(self) -> str:
        return "(no output)"

    def _before_start(self) -> None:
        """Called before each launch."""

    def _after_stop(self) -> None:
        """Called after each stop."""

    def start(self) -> None:
        if self.running:
            return
        self._before_start()
        self._process = process = self._launch()
        deadline = time.monotonic() + self.start_timeout
        while True:
            if process.poll() is not None:
                self._process = None
                raise RuntimeError(f"{self.name} exited with status {process.returncode}: {self._log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"{self.name} did not accept connections on {self.host}:{self.port} within "
                        f"{self.start_timeout:.0f} s: {self._log_tail()}") from None
                time.sleep(0.02)
        log.debug("%s pid %d listening on %s:%d", self.name, process.pid, self.host, self.port)

    def stop(self) -> None:
        """Stop the server and every process it forked; idempotent."""
        process = self._process
        self._process = None
        if process is not None and process.poll() is None:
            for pid in descendants(process.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._after_stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> "Self":
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None


class SshServer(ServerProcess):
    """A throw-away OpenSSH server sharing ``share`` to the current user over SFTP."""

    def __init__(self, workdir: Path, share: Path | None = None, port: int = 0,
                 force_internal_sftp: bool = False, sftp_start_dir: Path | None = None,
                 user: str | None = None, logins: tuple[str, ...] = ("publickey",),
                 authentication_methods: str | None = None) -> None:
        """``force_internal_sftp``: a server that runs no commands (``ForceCommand
        internal-sftp``, as many SFTP-only hosts are set up): an exec request gets an SFTP
        session instead. ``sftp_start_dir``: the folder an SFTP session starts in (the
        login folder that a relative path such as ``host:projects`` starts from; default:
        the user's home), as ``internal-sftp -d`` sets it. ``user``: who logs in (default:
        the current user). ``logins``: the methods the server accepts, of publickey,
        password (checked against the system's shadow file) and keyboard-interactive
        (through PAM, which the server then uses for passwords too);
        ``authentication_methods``: sshd's AuthenticationMethods (e.g. "publickey,password":
        both in turn)."""
        self.force_internal_sftp = force_internal_sftp
        self.sftp_start_dir = Path(sftp_start_dir).absolute() if sftp_start_dir is not None else None
        self.logins = logins
        self.authentication_methods = authentication_methods
        self.workdir = Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.share = Path(share).absolute() if share is not None else self.workdir / "share"
        self.share.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or _free_port()
        self.user = user or getpass.getuser()
        self.host_key = self.workdir / "ssh_host_ed25519_key"
        self.host_key_pub = self.workdir / "ssh_host_ed25519_key.pub"
        self.identity = self.workdir / "id_ed25519"
        self.authorized_keys = self.workdir / "authorized_keys"
        self.known_hosts = self.workdir / "known_hosts"
        self.config = self.workdir / "sshd_config"
        self.pid_file = self.workdir / "sshd.pid"
        self.log_file = self.workdir / "sshd.log"
        self._keygen = _find(SSH_KEYGEN_CANDIDATES, "ssh-keygen")
        self._sftp_server = _find(SFTP_SERVER_CANDIDATES, "sftp-server")
        self._process: subprocess.Popen[bytes] | None = None

        if not self.host_key.exists():
            self._generate_key(self.host_key, "cachefs-devserver-host")
        if not self.identity.exists():
            self._generate_key(self.identity, "cachefs-devserver-user")
        shutil.copyfile(self.identity.with_suffix(".pub"), self.authorized_keys)
        os.chmod(self.authorized_keys, 0o600)
        self._write_known_hosts()
        self._write_config()

    # -- setup ----------------------------------------------------------------------
    def _generate_key(self, path: Path, comment: str) -> None:
        for stale in (path, path.with_suffix(".pub")):
            stale.unlink(missing_ok=True)
        subprocess.run(
            [self._keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )

    def _write_known_hosts(self) -> None:
        key_type, key_b64 = self.host_key_pub.read_text().split()[:2]
        self.known_hosts.write_text(f"[{self.host}]:{self.port} {key_type} {key_b64}\n")
        os.chmod(self.known_hosts, 0o600)

    def _write_config(self) -> None:
        lines = [
            f"ListenAddress {self.host}",
            f"Port {self.port}",
            f"HostKey {self.host_key}",
            f"PidFile {self.pid_file}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "StrictModes no",
            f"PubkeyAuthentication {'yes' if 'publickey' in self.logins else 'no'}",
            f"PasswordAuthentication {'yes' if 'password' in self.logins else 'no'}",
            f"KbdInteractiveAuthentication {'yes' if 'keyboard-interactive' in self.logins else 'no'}",
            f"UsePAM {'yes' if 'keyboard-interactive' in self.logins else 'no'}",
            "PermitRootLogin prohibit-password",
            "UseDNS no",
            "X11Forwarding no",
            "PrintMotd no",
            "MaxStartups 100",
            "MaxSessions 100",
            # internal-sftp: served inside sshd, without starting the user's login shell
            # (whose start-up files can be slow or hang, and are none of a test's business).
            "Subsystem sftp internal-sftp" + (f" -d {self.sftp_start_dir}" if self.sftp_start_dir else ""),
            # Commands (the callbacks' watcher, server hashes) run without the user's
            # ~/.bashrc, which Debian's bash reads for a command over SSH only while SHLVL
            # is below 2: this machine's start-up files (pyenv's rehash, which waits on a
            # lock file that a session killed mid-way leaves behind) are none of a test's
            # business either.
            "SetEnv SHLVL=5",
            "LogLevel ERROR",
        ]
        if self.force_internal_sftp:
            lines.append("ForceCommand internal-sftp")
        if self.authentication_methods:
            lines.append(f"AuthenticationMethods {self.authentication_methods}")
        self.config.write_text("\n".join(lines) + "\n")
        # OpenSSH >= 9.8 penalises clients that disconnect before authenticating (as the
        # host key tests do); switch that off where the option exists.
        with_penalties = self.config.read_text() + "PerSourcePenalties no\n"
        probe = self.workdir / "sshd_config.probe"
        probe.write_text(with_penalties)
        if self._config_valid(probe):
            self.config.write_text(with_penalties)
        probe.unlink()

    def _config_valid(self, config: Path) -> bool:
        self._ensure_privsep_dir()
        result = subprocess.run(
            [SSHD, "-t", "-f", str(config)], stdin=subprocess.DEVNULL, capture_output=True
        )
        return result.returncode == 0

    @staticmethod
    def _ensure_privsep_dir() -> None:
        if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)

    # -- life cycle (``ServerProcess``) ---------------------------------------------
    name = "sshd"

    def _before_start(self) -> None:
        self._ensure_privsep_dir()

    def _launch(self) -> "subprocess.Popen[bytes]":
        with open(self.log_file, "ab") as log_handle:
            return subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)],
                                    stdin=subprocess.DEVNULL, stdout=log_handle, stderr=log_handle)

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-2000:].strip() or "(no output)"
        except OSError:
            return "(no output)"

    # -- helpers for tests and the demo ---------------------------------------------
    def address(self) -> str:
        path = quote_from_bytes(os.fsencode(self.share), safe="/~!$&'()*+,;=:@-._")
        return f"sftp://{self.user}@{self.host}:{self.port}{path}"

    def regenerate_host_key(self) -> None:
        """A new host key, used from the next start; known_hosts keeps the old one."""
        self._generate_key(self.host_key, "cachefs-devserver-host")
