"""A real MIT Kerberos KDC on 127.0.0.1 for tests: a realm of its own, a user and a
service's keytab.

Owns: one private realm (``CACHEFS.TEST``), its database, stash, ``kdc.conf`` and
``krb5.conf`` (the one a client and a server of the test read, through ``KRB5_CONFIG``),
the keytabs it writes and credential caches it fills, all inside ``workdir``, and the one
``krb5kdc`` process it starts.
Must not touch: the system's Kerberos (``/etc/krb5.conf``, ``/etc/krb5kdc``,
``/var/lib/krb5kdc``), the user's own credential cache, or any process it did not start.

The KDC issues no PAC (``disable_pac``): MIT's KDC adds one to every ticket since 1.20,
and Samba as a standalone server refuses a ticket that has one (it expects a PAC only from
an Active Directory domain controller: NT_STATUS_BAD_TOKEN_TYPE).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

from devtools.devserver import ServerProcess, _free_port, log_tail

REALM = "CACHEFS.TEST"
START_TIMEOUT = 15.0


def _find(program: str, package: str) -> str:
    for folder in ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"):
        candidate = os.path.join(folder, program)
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(program)
    if found:
        return found
    raise FileNotFoundError(f"{program} not found (Debian package {package})")


class RealmClient:
    """The client side of a test realm, shared by ``Kdc`` and ``devtools.addc.AdDc``: the
    ``krb5.conf`` a client of the test reads (``krb5_config``, through ``env``), and
    ``kinit``/``kdestroy`` against it. A subclass sets ``realm``, ``host`` and
    ``krb5_config`` and calls ``_client_tools`` before using them."""

    realm: str
    host: str
    krb5_config: Path

    def _client_tools(self) -> None:
        self._kinit = _find("kinit", "krb5-user")
        self._kdestroy = _find("kdestroy", "krb5-user")

    @property
    def env(self) -> dict[str, str]:
        return {"KRB5_CONFIG": str(self.krb5_config)}

    def _write_krb5_config(self, kdc_port: int, hosts: list[str], kpasswd_port: int | None = None) -> None:
        """The realm's one KDC at ``host:kdc_port`` (and its password service), nothing
        looked up in DNS, and ``hosts`` (a name or ``.domain``) in the realm."""
        self.krb5_config.write_text("\n".join([
            "[libdefaults]",
            f" default_realm = {self.realm}",
            " dns_lookup_kdc = false",
            " dns_lookup_realm = false",
            " rdns = false",
            " dns_canonicalize_hostname = false",
            "[realms]",
            f" {self.realm} = {{",
            f"  kdc = {self.host}:{kdc_port}",
            *([f"  kpasswd_server = {self.host}:{kpasswd_port}"] if kpasswd_port else []),
            " }",
            "[domain_realm]",
            *(f" {host} = {self.realm}" for host in hosts),
            "",
        ]))

    def kinit(self, principal: str, password: str, cache: Path, lifetime: str | None = None) -> str:
        """A ticket-granting ticket for ``principal`` in the credential cache ``cache``
        (``lifetime``: kinit's ``-l``, "5s"); returns the ``KRB5CCNAME`` value naming it."""
        name = f"FILE:{cache}"
        command = [self._kinit, *(["-l", lifetime] if lifetime else []), principal]
        result = subprocess.run(command, input=(password + "\n").encode(), capture_output=True,
                                timeout=30, env=dict(os.environ, **self.env, KRB5CCNAME=name))
        if result.returncode != 0:
            raise RuntimeError(f"kinit {principal} failed: {result.stderr.decode(errors='replace').strip()}")
        return name

    def kdestroy(self, cache: str) -> None:
        subprocess.run([self._kdestroy, "-c", cache], capture_output=True, timeout=30,
                       env=dict(os.environ, **self.env))


class Kdc(ServerProcess, RealmClient):
    """A throw-away KDC for the realm ``REALM`` on ``127.0.0.1:port``. ``env`` is what a
    Kerberos client or server of the test needs in its environment (``KRB5_CONFIG``)."""

    name = "krb5kdc"
    start_timeout = START_TIMEOUT

    def __init__(self, workdir: Path, port: int = 0) -> None:
        self.workdir = Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or _free_port()
        self.realm = REALM
        self.krb5_config = self.workdir / "krb5.conf"
        self.kdc_config = self.workdir / "kdc.conf"
        self.log_file = self.workdir / "kdc.log"
        self._krb5kdc = _find("krb5kdc", "krb5-kdc")
        self._kdb5_util = _find("kdb5_util", "krb5-kdc")
        self._kadmin = _find("kadmin.local", "krb5-admin-server")
        self._client_tools()
        self._write_configs()
        self._run([self._kdb5_util, "create", "-s", "-r", self.realm, "-P", secrets.token_urlsafe(16)])

    def _write_configs(self) -> None:
        self._write_krb5_config(self.port, ["localhost"])
        self.kdc_config.write_text("\n".join([
            "[kdcdefaults]",
            f" kdc_listen = {self.host}:{self.port}",
            f" kdc_tcp_listen = {self.host}:{self.port}",
            "[realms]",
            f" {self.realm} = {{",
            f"  database_name = {self.workdir / 'principal'}",
            f"  key_stash_file = {self.workdir / 'stash'}",
            f"  acl_file = {self.workdir / 'kadm5.acl'}",
            "  disable_pac = true",
            " }",
            "[logging]",
            f" kdc = FILE:{self.log_file}",
            "",
        ]))

    def _run(self, command: list[str], stdin: str = "") -> str:
        env = dict(os.environ, KRB5_CONFIG=str(self.krb5_config), KRB5_KDC_PROFILE=str(self.kdc_config))
        result = subprocess.run(command, input=stdin.encode(), capture_output=True, timeout=30, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"{os.path.basename(command[0])} failed: "
                               f"{(result.stderr or result.stdout).decode(errors='replace').strip()}")
        return result.stdout.decode(errors="replace")

    def _kadmin_query(self, query: str) -> None:
        self._run([self._kadmin, "-r", self.realm, "-q", query])

    # -- principals -------------------------------------------------------------------
    def add_user(self, name: str, password: str) -> str:
        """A user principal ``name@REALM`` with ``password``; returns the principal."""
        self._kadmin_query(f"addprinc -pw {password} {name}")
        return f"{name}@{self.realm}"

    def add_service(self, principal: str, keytab: Path) -> Path:
        """A service principal (``cifs/localhost``) with a random key, written to
        ``keytab``."""
        self._kadmin_query(f"addprinc -randkey {principal}")
        self._kadmin_query(f"ktadd -k {keytab} {principal}")
        return keytab

    # -- life cycle (``ServerProcess``) -------------------------------------------------
    def _launch(self) -> "subprocess.Popen[bytes]":
        env = dict(os.environ, KRB5_CONFIG=str(self.krb5_config), KRB5_KDC_PROFILE=str(self.kdc_config))
        with open(self.workdir / "krb5kdc.out", "ab") as log_handle:
            return subprocess.Popen([self._krb5kdc, "-n", "-P", str(self.workdir / "kdc.pid")],
                                    stdin=subprocess.DEVNULL, stdout=log_handle, stderr=log_handle,
                                    env=env, start_new_session=True)

    def _log_tail(self) -> str:
        return log_tail(self.workdir, ("krb5kdc.out", "kdc.log"))
