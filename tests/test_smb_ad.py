"""SMB logins against a real Active Directory domain controller: Samba's AD DC on loopback
(devtools.addc), its own KDC issuing tickets with a PAC for a service of the DC's machine
account, a ticket got with the real ``kinit``, mounts through ``mount.py``. No mocks.

tests/test_smb_kerberos.py covers what cachefs does with a ticket and without one (offline,
expiry, a KDC that does not answer) against an MIT KDC and a standalone smbd; here, that the
same logins work where they are used: a domain whose tickets carry a PAC (a standalone
smbd refuses those), a service principal that belongs to the DC's machine account (an alias
of it, ``cifs/localhost``), users written as Windows users write them. The DC's log says
which login each mount made: the KDC's line for the service ticket, the file server's
authorization from the ticket (``[SMB2,krb5]``) or its NTLM authentication.

One DC for the module: provisioning it takes about 4 s.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devtools.addc import AdDc
from tests.fixtures.mount import Mount, MountError
from tests.test_writes import sync_until_done

pytest.importorskip("gssapi", reason="python-gssapi is not installed (the test extra brings it)")
pytest.importorskip("krb5", reason="pykrb5 is not installed (the test extra brings it)")

#: the first uid winbindd gives a domain user on a DC (its idmap's range)
DOMAIN_UIDS = 3_000_000


@pytest.fixture(scope="module")
def dc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdDc]:
    # (the share outside pytest's folders, which only root may enter: the domain user
    # reaches it as itself)
    share = Path(tempfile.mkdtemp(prefix="cachefs-addc-share-"))
    try:
        server = AdDc(tmp_path_factory.mktemp("addc"), share)
        server.start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(share)


@dataclass
class Login:
    """One test's view of the module's DC: its credential cache, and the DC's log from the
    test's start on."""

    dc: AdDc
    cache: Path
    log_start: int

    def env(self) -> dict[str, str]:
        """What a mount needs: the DC's krb5.conf and this test's cache (no password in the
        environment)."""
        return {**self.dc.env, "KRB5CCNAME": f"FILE:{self.cache}", "CACHEFS_PASSWORD": ""}

    def kinit(self) -> None:
        self.dc.kinit(f"{self.dc.user}@{self.dc.realm}", self.dc.password, self.cache)

    def log(self) -> str:
        """The DC's log since the test started."""
        return self.dc.log_text()[self.log_start:]

    def tickets_in_cache(self) -> str:
        result = subprocess.run(["klist", "-c", f"FILE:{self.cache}"], capture_output=True, text=True,
                                timeout=30, env={**os.environ, **self.env()})
        return result.stdout


@pytest.fixture
def login(dc: AdDc, tmp_path: Path) -> Login:
    """The DC running, its share emptied (the module shares both)."""
    dc.start()
    for entry in dc.share.iterdir():
        subprocess.run(["rm", "-rf", "--", str(entry)], check=True, timeout=30)
    return Login(dc, tmp_path / "krb5cc", len(dc.log_text()))


def test_a_ticket_from_the_dc_mounts_without_a_password(dc: AdDc, login: Login, tmp_path: Path) -> None:
    (dc.share / "doc.txt").write_bytes(b"from the server\n")
    login.kinit()
    mnt = tmp_path / "mnt"
    with Mount(dc.address(), mnt, tmp_path / "cache", env=login.env()) as mount:
        assert (mnt / "doc.txt").read_bytes() == b"from the server\n"
        (mnt / "new.txt").write_bytes(b"written on the mount\n")
        sync_until_done(mnt)
        assert (dc.share / "new.txt").read_bytes() == b"written on the mount\n"
        # (the server knew the user only from the ticket's PAC: its SID, mapped to a uid of
        # the domain's by winbindd)
        assert (dc.share / "new.txt").stat().st_uid >= DOMAIN_UIDS
        assert "password" not in mount.log_text().lower()
    log = login.log()
    tickets = dc.service_tickets(log)
    assert tickets, log[-3000:]
    # (Heimdal's KDC logs the PAC's attributes where the ticket-granting ticket carried a
    # PAC, and puts it in the service ticket where they say it was asked for (1) or given
    # unasked (2); a Samba DC takes a ticket without a PAC for no user at all)
    assert all(f"{dc.user}@{dc.realm} cifs/localhost@{dc.realm}" in line
               and re.search(r" pac_attributes=[123] ", line) for line in tickets), tickets
    assert dc.logins(log, "krb5"), log[-3000:]
    assert not dc.logins(log, "NTLMSSP")
    assert f"cifs/localhost@{dc.realm}" in login.tickets_in_cache()


def test_without_a_ticket_the_password_logs_in(dc: AdDc, login: Login, tmp_path: Path) -> None:
    (dc.share / "doc.txt").write_bytes(b"x")
    mnt = tmp_path / "mnt"
    with Mount(dc.address(), mnt, tmp_path / "cache", *dc.mount_args(), env=login.env()):
        assert (mnt / "doc.txt").read_bytes() == b"x"
        (mnt / "new.txt").write_bytes(b"y")
        sync_until_done(mnt)
        assert (dc.share / "new.txt").read_bytes() == b"y"
    log = login.log()
    assert dc.logins(log, "NTLMSSP"), log[-3000:]
    assert not dc.logins(log, "krb5")
    assert not dc.service_tickets(log)


@pytest.mark.parametrize("ticket", [True, False], ids=["ticket", "password"])
def test_the_user_as_windows_writes_it(dc: AdDc, login: Login, tmp_path: Path, ticket: bool) -> None:
    """``CACHEFSAD\\alice`` (the NetBIOS domain, as Windows shows a user),
    ``alice@ad.cachefs.test`` (the user principal name, the domain in small letters) and
    ``Alice`` (AD's names know no case: Windows takes any) are the one domain user, with a
    ticket (for ``alice@AD.CACHEFS.TEST``) and with the password."""
    (dc.share / "doc.txt").write_bytes(b"x")
    if ticket:
        login.kinit()
    for form in (f"{dc.domain}%5C{dc.user}", f"{dc.user}%40{dc.realm.lower()}", dc.user.capitalize()):
        start = len(dc.log_text())
        with Mount(dc.address(user=form), tmp_path / "mnt", tmp_path / f"cache-{form}",
                   *([] if ticket else dc.mount_args()), env=login.env()) as mount:
            assert (tmp_path / "mnt" / "doc.txt").read_bytes() == b"x"
        assert "Kerberos login failed" not in mount.log_text()
        log = dc.log_text()[start:]
        assert dc.logins(log, "krb5" if ticket else "NTLMSSP"), (form, log[-3000:])
        assert not dc.logins(log, "NTLMSSP" if ticket else "krb5"), form


def test_a_ticket_of_another_user_whose_name_folds_alike_is_not_used(dc: AdDc, login: Login,
                                                                      tmp_path: Path) -> None:
    """``straße`` and ``strasse`` are two domain users (the DC makes both: AD's names ignore
    case one letter for one letter, and ß is no ss). A mount whose address names
    ``straße``, with only a ticket of ``strasse`` in the cache, must not log in as
    ``strasse``, and with no password it mounts nothing. (dcf77bf compared names by
    Python's ``casefold``, full case folding: ß -> ss, the Kelvin sign -> k, ſ -> s,
    which made them one.)"""
    for name in ("strasse", "straße"):
        try:
            dc.add_user(name, "Pw-Strasse-1a!")
        except Exception as exc:  # (made by an earlier test of this module's DC)
            if "already exists" not in str(exc):
                raise
    dc.kinit(f"strasse@{dc.realm}", "Pw-Strasse-1a!", login.cache)
    (dc.share / "doc.txt").write_bytes(b"x")
    start = len(dc.log_text())
    with pytest.raises(MountError) as refused:  # (no password for straße: no login at all)
        with Mount(dc.address(user="stra%C3%9Fe"), tmp_path / "mnt", tmp_path / "cache", env=login.env()):
            pass
    assert "Kerberos" in str(refused.value), refused.value
    log = dc.log_text()[start:]
    wrong = re.escape(f"[{dc.domain}]\\[strasse]")
    assert not re.search(rf"Successful AuthZ: \[SMB2,krb5\] user {wrong} ", log), \
        "logged in as strasse (the cache's ticket) although the address names straße"
