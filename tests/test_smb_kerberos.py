"""SMB logins with Kerberos: a real MIT KDC (devtools.kdc) and Samba's smbd taking its
tickets (devtools.smbserver with ``kdc``), a ticket got with the real ``kinit``, mounts
through ``mount.py``. No mocks.

A user with a ticket mounts without any password; one whose ticket the server cannot use
logs in with the password; one with neither gets one clear line. The server knows the user
by a password the Kerberos tests never give (a login that works without it was Kerberos).
"""

from __future__ import annotations

import getpass
import json
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cachefs.remote.smb import KDC_UNREACHABLE, KERBEROS_WAIT
from devtools.kdc import Kdc
from devtools.smbserver import SmbServer
from tests.fixtures.mount import Mount, MountError, status
from tests.test_writes import control, go_offline, sync_until_done, wait_for

pytest.importorskip("gssapi", reason="python-gssapi is not installed (the test extra brings it)")
pytest.importorskip("krb5", reason="pykrb5 is not installed (the test extra brings it)")


@dataclass
class Realm:
    kdc: Kdc
    user: str
    password: str
    cache: Path

    def env(self) -> dict[str, str]:
        """What a mount of the test needs: the realm's krb5.conf and the user's cache (no
        password in the environment, whatever the one running the tests has)."""
        return {**self.kdc.env, "KRB5CCNAME": f"FILE:{self.cache}", "CACHEFS_PASSWORD": ""}

    def kinit(self, lifetime: str | None = None) -> None:
        self.kdc.kinit(f"{self.user}@{self.kdc.realm}", self.password, self.cache, lifetime)

    def service_tickets(self) -> int:
        """How many tickets the KDC issued for the share's service."""
        return self.kdc.log_file.read_text(errors="replace").count("for cifs/localhost@")


@pytest.fixture
def realm(tmp_path: Path) -> Iterator[Realm]:
    kdc = Kdc(tmp_path / "kdc")
    kdc.start()
    try:
        user = getpass.getuser()  # (the server's user: see SmbServer)
        password = secrets.token_urlsafe(12)
        kdc.add_user(user, password)
        yield Realm(kdc, user, password, tmp_path / "krb5cc")
    finally:
        kdc.stop()


@pytest.fixture
def kerberos_smbd(tmp_path: Path, share: Path, realm: Realm) -> Iterator[SmbServer]:
    server = SmbServer(tmp_path / "smbd", share=share, kdc=realm.kdc)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_ticket_mounts_without_a_password_and_works_offline(kerberos_smbd: SmbServer, realm: Realm,
                                                            share: Path, tmp_path: Path) -> None:
    (share / "doc.txt").write_bytes(b"from the server\n")
    realm.kinit()
    mnt = tmp_path / "mnt"
    with Mount(kerberos_smbd.address(host="localhost"), mnt, tmp_path / "cache", env=realm.env()) as mount:
        assert (mnt / "doc.txt").read_bytes() == b"from the server\n"
        assert realm.service_tickets() >= 1
        (mnt / "new.txt").write_bytes(b"written on the mount\n")
        sync_until_done(mnt)
        assert (share / "new.txt").read_bytes() == b"written on the mount\n"

        kerberos_smbd.stop()
        go_offline(mnt)
        assert (mnt / "doc.txt").read_bytes() == b"from the server\n"
        (mnt / "offline.txt").write_bytes(b"written offline\n")
        (share / "doc.txt").write_bytes(b"changed on the server\n")
        kerberos_smbd.start()
        control(mnt, "online")
        sync_until_done(mnt)
        assert (share / "offline.txt").read_bytes() == b"written offline\n"
        wait_for(lambda: (mnt / "doc.txt").read_bytes() == b"changed on the server\n", 10,
                 "the server's change seen after reconnecting")
        assert "password" not in mount.log_text().lower()


def test_without_a_ticket_the_password_logs_in(kerberos_smbd: SmbServer, realm: Realm, share: Path,
                                               tmp_path: Path) -> None:
    (share / "doc.txt").write_bytes(b"x")
    mnt = tmp_path / "mnt"
    with Mount(kerberos_smbd.address(host="localhost"), mnt, tmp_path / "cache", *kerberos_smbd.mount_args(),
               env=realm.env()):
        assert (mnt / "doc.txt").read_bytes() == b"x"
    assert realm.service_tickets() == 0


def test_a_ticket_the_server_cannot_take_falls_back_to_the_password(realm: Realm, share: Path,
                                                                   tmp_path: Path) -> None:
    """A server outside the realm (no keytab, no principal at the KDC): the ticket gets no
    service ticket, and the password logs in."""
    server = SmbServer(tmp_path / "smbd", share=share)
    server.start()
    try:
        (share / "doc.txt").write_bytes(b"x")
        realm.kinit()
        mnt = tmp_path / "mnt"
        with Mount(server.address(host="localhost"), mnt, tmp_path / "cache", *server.mount_args(),
                   env=realm.env()) as mount:
            assert (mnt / "doc.txt").read_bytes() == b"x"
        assert mount.log_text().count("Kerberos login failed (Server cifs/localhost@CACHEFS.TEST not found in Kerberos database)") == 1
    finally:
        server.stop()


def test_neither_a_ticket_nor_a_password_is_one_clear_error(realm: Realm, share: Path, tmp_path: Path) -> None:
    """With a ticket the server cannot take, the error says why the ticket failed; with
    none, that there is none."""
    server = SmbServer(tmp_path / "smbd", share=share)
    server.start()
    try:
        for ticket, words in [(True, "the Kerberos login failed: Server cifs/localhost@CACHEFS.TEST not found"),
                              (False, "no Kerberos ticket either (kinit)")]:
            if ticket:
                realm.kinit()
            else:
                realm.cache.unlink()
            mount = Mount(server.address(host="localhost"), tmp_path / "mnt", tmp_path / f"cache-{ticket}",
                          env=realm.env())
            with pytest.raises(MountError) as raised:
                mount.start()
            text = str(raised.value)
            assert "no password was given" in text and words in text, text
            assert "Traceback" not in text
    finally:
        server.stop()


def test_a_kdc_that_does_not_answer_costs_one_short_wait(kerberos_smbd: SmbServer, realm: Realm, share: Path,
                                                        tmp_path: Path) -> None:
    """A ticket-granting ticket, then a KDC that takes requests and never answers (a laptop
    away from the office's KDC, at home with the NAS): the mount logs in with its password
    after KERBEROS_WAIT, not after GSSAPI's own retries (27 s, measured); a password login
    without any ticket never asks the KDC."""
    (share / "doc.txt").write_bytes(b"x")
    realm.kinit()
    realm.kdc.stop()
    silent_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent_tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        for sock in (silent_udp, silent_tcp):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((realm.kdc.host, realm.kdc.port))
        silent_tcp.listen(16)
        for ticket in (True, False):
            if not ticket:
                realm.cache.unlink()
            start = time.monotonic()
            with Mount(kerberos_smbd.address(host="localhost"), tmp_path / "mnt", tmp_path / f"cache-{ticket}",
                       *kerberos_smbd.mount_args(), env=realm.env()) as mount:
                took = time.monotonic() - start
                assert (tmp_path / "mnt" / "doc.txt").read_bytes() == b"x"
                if ticket:  # (a reconnect while GSSAPI still waits on the KDC: no new wait,
                    # nothing new said)
                    kerberos_smbd.restart()
                    (share / "new.txt").write_bytes(b"y")
                    again = wait_for(lambda: (tmp_path / "mnt" / "new.txt").exists(), 30, "the reconnected mount")
                    assert again < KERBEROS_WAIT - 1, again
            if ticket:
                assert KERBEROS_WAIT - 0.1 <= took < KERBEROS_WAIT + 4, took
                assert mount.log_text().count("Kerberos login failed") == 1, mount.log_text()
                assert f"Kerberos login failed ({KDC_UNREACHABLE})" in mount.log_text()
            else:
                assert took < 4, took
                assert "Kerberos" not in mount.log_text()
    finally:
        silent_udp.close()
        silent_tcp.close()


def test_an_expired_ticket_says_so(realm: Realm, share: Path, tmp_path: Path, kerberos_smbd: SmbServer) -> None:
    realm.kinit(lifetime="2s")
    time.sleep(3)
    mount = Mount(kerberos_smbd.address(host="localhost"), tmp_path / "mnt", tmp_path / "cache", env=realm.env())
    with pytest.raises(MountError) as raised:
        mount.start()
    text = str(raised.value)
    assert "the Kerberos login failed:" in text and "expired" in text and "Success" not in text, text


def test_the_cache_krb5_conf_names_and_a_domain_user(kerberos_smbd: SmbServer, realm: Realm, share: Path,
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No KRB5CCNAME: the cache krb5.conf's default_ccache_name names (Fedora's KEYRING:,
    KCM:) is used; and an address naming the user as DOMAIN\\user logs in as user, one
    naming user@domain as user@DOMAIN (a realm is written in capitals)."""
    (share / "doc.txt").write_bytes(b"x")
    config = realm.kdc.krb5_config
    config.write_text(config.read_text().replace("[libdefaults]\n",
                                                 f"[libdefaults]\n default_ccache_name = FILE:{realm.cache}\n"))
    realm.kinit()
    monkeypatch.delenv("KRB5CCNAME", raising=False)
    env = {key: value for key, value in realm.env().items() if key != "KRB5CCNAME"}
    for form in (f"CACHEFS%5C{realm.user}", f"{realm.user}%40cachefs.test"):
        address = kerberos_smbd.address(host="localhost").replace(f"smb://{realm.user}@", f"smb://{form}@")
        with Mount(address, tmp_path / "mnt", tmp_path / f"cache-{form}", env=env) as mount:
            assert (tmp_path / "mnt" / "doc.txt").read_bytes() == b"x"
        assert "Kerberos login failed" not in mount.log_text()


def test_a_ticket_that_expires_while_mounted_comes_back_with_kinit_and_online(
        kerberos_smbd: SmbServer, realm: Realm, share: Path, tmp_path: Path) -> None:
    """No password: the server ends the session when the ticket expires, the mount works
    offline and says why, and a new ticket with `online` brings it back, the work done
    meanwhile written to the share."""
    (share / "doc.txt").write_bytes(b"x")
    realm.kinit(lifetime="6s")
    mnt = tmp_path / "mnt"
    with Mount(kerberos_smbd.address(host="localhost"), mnt, tmp_path / "cache", env=realm.env(),
               allowed_errors=["expired"]):
        assert (mnt / "doc.txt").read_bytes() == b"x"
        time.sleep(7)
        (mnt / "later.txt").write_bytes(b"written after the ticket expired\n")
        wait_for(lambda: "expired" in json.dumps(status(mnt)), 20, "the status saying the ticket expired")
        assert not (share / "later.txt").exists()
        realm.kinit()
        control(mnt, "online")
        sync_until_done(mnt)
        assert (share / "later.txt").read_bytes() == b"written after the ticket expired\n"


def test_with_the_server_and_the_kdc_away_a_ticket_mount_starts_offline(kerberos_smbd: SmbServer, realm: Realm,
                                                                      share: Path, tmp_path: Path) -> None:
    """Without a password, as with one: a server that cannot be reached is offline, not a
    refused login, even when the KDC cannot be reached either; both back, it is online."""
    (share / "doc.txt").write_bytes(b"cached\n")
    mnt = tmp_path / "mnt"
    realm.kinit()
    with Mount(kerberos_smbd.address(host="localhost"), mnt, tmp_path / "cache", env=realm.env()):
        assert (mnt / "doc.txt").read_bytes() == b"cached\n"
    realm.kinit()  # (a new cache: no service ticket in it)
    kerberos_smbd.stop()
    realm.kdc.stop()
    with Mount(kerberos_smbd.address(host="localhost"), mnt, tmp_path / "cache", env=realm.env(),
               allowed_errors=["Kerberos", "cannot reach", "unreachable"]):
        assert status(mnt)["state"] == "offline"
        assert (mnt / "doc.txt").read_bytes() == b"cached\n"
        (mnt / "offline.txt").write_bytes(b"written offline\n")
        realm.kdc.start()
        kerberos_smbd.start()
        control(mnt, "online")
        sync_until_done(mnt)
        assert (share / "offline.txt").read_bytes() == b"written offline\n"


def test_a_ticket_whose_user_may_not_use_the_share_falls_back_to_the_password(
        kerberos_smbd: SmbServer, realm: Realm, share: Path, tmp_path: Path) -> None:
    """The cache holds another user's ticket (daemon, a user the share does not allow):
    that login is refused the share, the password of the address's user is used."""
    (share / "doc.txt").write_bytes(b"x")
    realm.kdc.add_user("daemon", realm.password)
    realm.kdc.kinit(f"daemon@{realm.kdc.realm}", realm.password, realm.cache)
    address = kerberos_smbd.address(host="localhost").replace(f"smb://{realm.user}@", "smb://")
    with Mount(address, tmp_path / "mnt", tmp_path / "cache", *kerberos_smbd.mount_args(),
               env=realm.env()) as mount:
        assert (tmp_path / "mnt" / "doc.txt").read_bytes() == b"x"
    assert "Kerberos login failed (daemon@CACHEFS.TEST may not use the share 'cachefs')" in mount.log_text()
