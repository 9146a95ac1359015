"""SMB logins with Kerberos: a real MIT KDC (devtools.kdc) and Samba's smbd taking its
tickets (devtools.smbserver with ``kdc``), a ticket got with the real ``kinit``, mounts
through ``mount.py``. No mocks.

A user with a ticket mounts without any password; one whose ticket the server cannot use
logs in with the password; one with neither gets one clear line. The server knows the user
by a password the Kerberos tests never give (a login that works without it was Kerberos).
"""

from __future__ import annotations

import getpass
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.kdc import Kdc
from devtools.smbserver import SmbServer
from tests.fixtures.mount import Mount, MountError
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

    def kinit(self) -> None:
        self.kdc.kinit(f"{self.user}@{self.kdc.realm}", self.password, self.cache)

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
