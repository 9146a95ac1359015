"""A real Samba Active Directory domain controller on 127.0.0.1 for tests: a throw-away
domain (realm ``AD.CACHEFS.TEST``, NetBIOS domain ``CACHEFSAD``) whose KDC issues tickets
with a PAC, as every AD's does, one user with a password, and a share on the DC itself.

Owns: the domain provisioned into ``workdir/dc`` (``samba-tool domain provision
--targetdir``: its sam.ldb, secrets, idmap, ``smb.conf`` and every state, lock, cache, pid,
socket and log folder, all inside it), the ``krb5.conf`` a client of the test reads
(``KRB5_CONFIG``), the password file, the credential caches ``kinit`` fills, the share
folder, and the one ``samba`` process it starts with the smbd and winbindd that process
forks.
Must not touch: the system's Samba (``/etc/samba``, ``/var/lib/samba``, ``/run/samba``)
and Kerberos (``/etc/krb5.conf``), the system's users, the user's own credential cache,
or any process it did not start. Processes are stopped by their PID only.

Debian's AD DC is built with Samba's own Heimdal KDC (the ``samba`` process serves it; the
MIT ``krb5kdc`` of devtools.kdc plays no part); clients here use MIT's libraries
(``kinit``, python-gssapi), as on most Linux desktops. Provisioning takes about 4 s of
CPU, so a test module shares one DC.

Only what a file server login needs runs (``server services = s3fs, kdc, winbindd``: no
LDAP, DNS, NetBIOS, RPC endpoint mapper or replication), and on free high ports of
127.0.0.1 only (``smb ports``, ``krb5 port``, ``kpasswd port``): parallel runs never meet
on 88, 389 or 445.

smbd on a DC maps each user's SIDs (from the ticket's PAC, or from NTLM) to Unix ids by
asking winbindd, through winbindd's socket in the compiled-in ``/run/samba/winbindd``:
Samba's ``winbindd socket directory`` moves where winbindd listens, not where its clients
look. Its clients look elsewhere only where Samba's own test suite runs them: under
cwrap's nss_wrapper (``LD_PRELOAD``), with ``SELFTEST_WINBINDD_SOCKET_DIR``. So the DC
runs under nss_wrapper, given the system's own passwd and group files, and its winbindd
socket stays in ``workdir``; without it every session setup ends in
NT_STATUS_INTERNAL_ERROR.

The share is served as the domain user (no ``force user``): files written through it
belong to the uid winbindd gave that user (3000000 and up), the share folder is made
writable by all, and the folders above it must let others through (not pytest's
``tmp_path``, which only root may enter); a test writes a file the user is to change with
mode 0666.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import socket
import subprocess
import time
from pathlib import Path

from devtools.devserver import ServerProcess, _free_port, log_tail, write_private
from devtools.kdc import RealmClient, _find

REALM = "AD.CACHEFS.TEST"
DNS_DOMAIN = REALM.lower()
DOMAIN = "CACHEFSAD"  # the NetBIOS domain (DOMAIN\\user)
NETBIOS_NAME = "DC"
SHARE_NAME = "cachefs"
#: the name clients give the server: an alias of the DC (``cifs/localhost``, added to the
#: DC's machine account as an administrator adds one for a DNS alias: ``setspn -S``)
SERVICE_HOST = "localhost"
START_TIMEOUT = 30.0
SETUP_DIR = "/usr/share/samba/setup"  # provisioning's schema and templates


def _nss_wrapper() -> str:
    for candidate in sorted(glob.glob("/usr/lib/*/libnss_wrapper.so")) + ["/usr/lib/libnss_wrapper.so"]:
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError("libnss_wrapper.so not found (Debian package libnss-wrapper)")


class AdDc(ServerProcess, RealmClient):
    """A throw-away Samba AD DC for the realm ``REALM``: its KDC on
    ``127.0.0.1:kdc_port``, its file server on ``127.0.0.1:port`` sharing ``share`` as
    ``\\\\localhost\\cachefs``, one domain user ``user`` with ``password`` (also in
    ``password_file``). ``env`` is what a Kerberos client of the test needs in its
    environment (``KRB5_CONFIG``)."""

    name = "samba (AD DC)"
    start_timeout = START_TIMEOUT

    def __init__(self, workdir: Path, share: Path | None = None, user: str = "alice",
                 password: str | None = None) -> None:
        self.workdir = Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.share = Path(share).absolute() if share is not None else self.workdir / "share"
        self.share.mkdir(parents=True, exist_ok=True)
        os.chmod(self.share, 0o777)  # (the domain user's uid is winbindd's: see above)
        self.host = "127.0.0.1"
        self.port = _free_port()
        self.kdc_port = _free_port()
        self.kpasswd_port = _free_port()
        self.realm = REALM
        self.domain = DOMAIN
        self.user = user
        # (AD's default policy: 7 characters at least, of three kinds)
        self.password = password or "Pw-" + secrets.token_urlsafe(12)
        self.password_file = self.workdir / "password"
        self.target = self.workdir / "dc"
        self.config = self.target / "etc" / "smb.conf"
        self.krb5_config = self.workdir / "krb5.conf"
        self.log_file = self.target / "log" / "samba.log"
        self._samba = _find("samba", "samba")
        self._samba_tool = _find("samba-tool", "samba-common-bin")
        _find("winbindd", "winbind, which samba-ad-dc brings")
        self._client_tools()
        self._nss_wrapper = _nss_wrapper()
        if not os.path.isdir(SETUP_DIR):
            raise FileNotFoundError(f"{SETUP_DIR} not found (Debian package samba-ad-provision)")
        write_private(self.password_file, self.password + "\n")
        self._write_krb5_config(self.kdc_port, [f".{DNS_DOMAIN}", SERVICE_HOST], self.kpasswd_port)
        started = time.monotonic()
        self._provision()
        #: seconds the provisioning took (the domain, the user, the alias's SPN)
        self.provision_seconds = time.monotonic() - started

    # -- setup ----------------------------------------------------------------------
    def _provision(self) -> None:
        # (an empty configuration to start from: else provisioning copies the system
        # smb.conf's globals into the domain's)
        empty = self.workdir / "provision.conf"
        empty.write_text("")
        self._run([self._samba_tool, "domain", "provision", "-s", str(empty),
                   f"--targetdir={self.target}", f"--realm={self.realm}", f"--domain={self.domain}",
                   f"--host-name={NETBIOS_NAME.lower()}", "--server-role=dc", "--dns-backend=NONE",
                   f"--host-ip={self.host}", f"--adminpass=Adm-{secrets.token_urlsafe(12)}"])
        self._write_config()
        self.add_user(self.user, self.password)
        self._tool("spn", "add", f"cifs/{SERVICE_HOST}", f"{NETBIOS_NAME}$")

    def _write_config(self) -> None:
        """The provisioned smb.conf rewritten: the same domain, only the services a file
        server login needs, on this DC's ports, every folder inside ``target``."""
        folders = {}
        for name in ("lock", "pid", "ncalrpc", "winbindd", "ntp_signd", "log"):
            folders[name] = self.target / name
            folders[name].mkdir(exist_ok=True)
        lines = [
            "[global]",
            f"netbios name = {NETBIOS_NAME}",
            f"realm = {self.realm}",
            f"workgroup = {self.domain}",
            "server role = active directory domain controller",
            "server services = s3fs, kdc, winbindd",
            f"interfaces = {self.host}",
            "bind interfaces only = yes",
            "disable netbios = yes",
            f"smb ports = {self.port}",
            f"krb5 port = {self.kdc_port}",
            f"kpasswd port = {self.kpasswd_port}",
            f"private dir = {self.target / 'private'}",
            f"state directory = {self.target / 'state'}",
            f"cache directory = {self.target / 'cache'}",
            f"binddns dir = {self.target / 'bind-dns'}",
            f"lock directory = {folders['lock']}",
            f"pid directory = {folders['pid']}",
            f"ncalrpc dir = {folders['ncalrpc']}",
            f"winbindd socket directory = {folders['winbindd']}",
            f"ntp signd socket directory = {folders['ntp_signd']}",
            f"log file = {self.log_file}",
            "max log size = 0",
            # (the KDC's tickets issued, and each login's authentication and authorization:
            # which user, which way)
            "log level = 1 auth_audit:5 kerberos:3",
            "load printers = no",
            "printing = bsd",
            "printcap name = /dev/null",
            "disable spoolss = yes",
            "",
            f"[{SHARE_NAME}]",
            f"path = {self.share}",
            "read only = no",
            "",
        ]
        self.config.write_text("\n".join(lines))

    def _environment(self) -> dict[str, str]:
        """The DC's: nss_wrapper (see the module's docstring) and the client krb5.conf, not
        the system's."""
        return dict(os.environ, LD_PRELOAD=self._nss_wrapper, NSS_WRAPPER_PASSWD="/etc/passwd",
                    NSS_WRAPPER_GROUP="/etc/group",
                    SELFTEST_WINBINDD_SOCKET_DIR=str(self.target / "winbindd"),
                    KRB5_CONFIG=str(self.krb5_config))

    def _run(self, command: list[str]) -> str:
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=120,
                                env=dict(os.environ, KRB5_CONFIG=str(self.krb5_config)))
        if result.returncode != 0:
            text = (result.stderr or result.stdout).decode(errors="replace").strip()
            raise RuntimeError(f"{' '.join(os.path.basename(part) for part in command[:3])} failed: {text[-2000:]}")
        return result.stdout.decode(errors="replace")

    def _tool(self, *args: str) -> str:
        """samba-tool on the domain's database directly (the DC need not run)."""
        return self._run([self._samba_tool, *args, "-s", str(self.config),
                          "-H", f"tdb://{self.target / 'private' / 'sam.ldb'}"])

    # -- users and tickets --------------------------------------------------------------
    def add_user(self, name: str, password: str) -> str:
        """Another domain user; returns its principal."""
        self._tool("user", "create", name, password)
        return f"{name}@{self.realm}"

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    # -- life cycle (``ServerProcess``) ---------------------------------------------
    def _launch(self) -> "subprocess.Popen[bytes]":
        with open(self.target / "log" / "samba.out", "ab") as log_handle:
            # (-M single: the KDC in the one samba process, not in a pool of forks; a
            # session of its own, as smbd's parent signals its whole process group)
            return subprocess.Popen([self._samba, "--foreground", "--no-process-group", "-M", "single",
                                     "-s", str(self.config)],
                                    stdin=subprocess.DEVNULL, stdout=log_handle, stderr=log_handle,
                                    env=self._environment(), start_new_session=True)

    def start(self) -> None:
        """Started when the file server, the KDC and winbindd all answer (the file server
        listens before winbindd, which each session setup asks, is there)."""
        if self.running:
            return
        started = time.monotonic()
        super().start()
        process = self._process
        assert process is not None
        pipe = str(self.target / "winbindd" / "pipe")
        while True:
            try:
                with socket.create_connection((self.host, self.kdc_port), timeout=0.5):
                    pass
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(0.5)
                    sock.connect(pipe)
                return
            except OSError:
                if process.poll() is not None or time.monotonic() - started > self.start_timeout:
                    self.stop()
                    raise RuntimeError(f"{self.name}: the KDC ({self.kdc_port}) or winbindd ({pipe}) did not "
                                       f"answer within {self.start_timeout:.0f} s: {self._log_tail()}") from None
                time.sleep(0.05)

    def _log_tail(self) -> str:
        return log_tail(self.target / "log", ("samba.out", "samba.log"))

    # -- helpers for tests ----------------------------------------------------------
    def address(self, user: str | None = None, path: str = "") -> str:
        """``smb://USER@localhost:PORT/cachefs[/path]`` (``user``: as written in the
        address, e.g. ``CACHEFSAD%5Calice``; default the domain user)."""
        tail = "/" + path.strip("/") if path.strip("/") else ""
        return f"smb://{user or self.user}@{SERVICE_HOST}:{self.port}/{SHARE_NAME}{tail}"

    def mount_args(self) -> list[str]:
        """The cachefs options a password login needs."""
        return ["--password-file", str(self.password_file)]

    def service_tickets(self, log: str) -> list[str]:
        """The KDC's lines in ``log`` (a slice of ``log_text()``) for each service ticket it
        issued for the share's server, ``cifs/localhost``."""
        return [line for line in log.splitlines()
                if re.search(rf"TGS-REQ SUCCESS .* cifs/{SERVICE_HOST}@{self.realm} ", line)]

    def logins(self, log: str, how: str) -> list[str]:
        """The file server's lines in ``log`` for each login of the domain user that
        succeeded ``how``: "krb5" (an authorization from a ticket's PAC) or "NTLMSSP"."""
        user = re.escape(f"[{self.domain}]\\[{self.user}]")
        if how == "krb5":
            pattern = rf"Successful AuthZ: \[SMB2,krb5\] user {user} "
        else:
            pattern = rf"Auth: \[SMB2,{how}\] .* status \[NT_STATUS_OK\] .* became {user} "
        return [line for line in log.splitlines() if re.search(pattern, line)]
