"""Whose files the mount shows: ``--owners local|remote`` and the id maps of
``--uid-map``/``--gid-map`` (sshfs's ``idmap=file`` format).

Owns: ``Owners`` (the mode, the two maps both ways), the parsing of a map file and its
one-line errors, and the caller's groups (``groups_of``). A node's ``uid``/``gid`` always
hold the server's ids; this module turns them into the ids programs here see, and back.
Must not touch: the cache, the remote, FUSE (plain helper, no state beyond the maps).

A map file has one ``localname:remoteid`` a line (``#`` comments and blank lines
allowed), as sshfs's ``uidfile``/``gidfile``: ``localname`` is a user (group) of this
machine, by name or number; ``remoteid`` the server's number for it. Ids the map does
not name are shown as they are; so a map must not leave out a server id that is a local id
it maps (``alice:1000`` with alice local 1001: the server's 1001 would be shown as alice,
and with ``default_permissions`` alice would own its files): such a map is refused at
mount (``MapError`` naming that id, to be mapped too). The ids a map names, local and
server, are then the same set: the map is one-to-one both ways, every id shown as one id.
"""

from __future__ import annotations

import grp
import pwd
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

OWNERS = ("local", "remote")
#: the largest id a map may name: 2**32 - 1 is the "no change" of chown, not an id
MAX_ID = 4294967294


class MapError(ValueError):
    """A map file cannot be used: its message names the file and the line."""


@dataclass(frozen=True)
class Owners:
    """``local``: every file shown as the mounting user's (``uid``, ``gid``), a change of
    owner refused; ``remote``: the server's owners, mapped."""

    mode: str = "local"
    uid: int = 0  # the mounting user (shown for every file in ``local``)
    gid: int = 0
    #: server id -> local id, and back (one-to-one: ``read_map``)
    uids_in: dict[int, int] = field(default_factory=dict)
    uids_out: dict[int, int] = field(default_factory=dict)
    gids_in: dict[int, int] = field(default_factory=dict)
    gids_out: dict[int, int] = field(default_factory=dict)

    @property
    def remote(self) -> bool:
        return self.mode == "remote"

    def local_uid(self, server_uid: int) -> int:
        return self.uids_in.get(server_uid, server_uid)

    def local_gid(self, server_gid: int) -> int:
        return self.gids_in.get(server_gid, server_gid)

    def server_uid(self, local_uid: int) -> int:
        return self.uids_out.get(local_uid, local_uid)

    def server_gid(self, local_gid: int) -> int:
        return self.gids_out.get(local_gid, local_gid)


def make_owners(mode: str, uid: int, gid: int, uid_map: Path | None = None,
                gid_map: Path | None = None) -> Owners:
    """The ``Owners`` of a mount; ``MapError`` for a map file that cannot be used."""
    if mode not in OWNERS:
        raise MapError(f"--owners {mode}: choose local or remote")
    uids_out = read_map(uid_map, _user_id, "user") if uid_map is not None else {}
    gids_out = read_map(gid_map, _group_id, "group") if gid_map is not None else {}
    uids_in = {server: local for local, server in uids_out.items()}
    gids_in = {server: local for local, server in gids_out.items()}
    return Owners(mode, uid, gid, uids_in, uids_out, gids_in, gids_out)


def read_map(path: Path, local_id: Callable[[str], int | None], what: str) -> dict[int, int]:
    """local id -> server id, from a ``localname:remoteid`` file; one-to-one, and closed:
    a local id it maps that is not a server id it maps is refused (that server id, not
    mapped, would be shown as the local one's user)."""
    try:
        text = path.expanduser().read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise MapError(f"{path}: {exc.strerror or exc}") from None
    out: dict[int, int] = {}
    taken: dict[int, int] = {}  # server id -> its line
    lines: dict[int, tuple[int, str]] = {}  # local id -> its line and name
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, colon, remote = line.rpartition(":")
        server = _id(remote)
        if not colon or not name or server is None:
            raise MapError(f"{path} line {number}: expected localname:remoteid, found {line!r}")
        if server > MAX_ID:
            raise MapError(f"{path} line {number}: {remote} is not an id (0 to {MAX_ID})")
        local = local_id(name)
        if local is None:
            raise MapError(f"{path} line {number}: no {what} {name!r} on this machine")
        if local > MAX_ID:
            raise MapError(f"{path} line {number}: {name} is not an id (0 to {MAX_ID})")
        if local in out or server in taken:
            raise MapError(f"{path} line {number}: {name if local in out else remote} is mapped twice")
        out[local], taken[server], lines[local] = server, number, (number, name)
    free = sorted(server for server in taken if server not in out)  # (local ids no server id shows as)
    kind = "uid" if what == "user" else "gid"
    for local in out:
        if local not in taken:
            number, name = lines[local]
            raise MapError(f"{path} line {number}: the server's {kind} {local}, not in the map, would be shown "
                           f"as {name} (local {kind} {local}): map it too (e.g. '{free[0]}:{local}')")
    return out


def _id(text: str) -> int | None:
    """The number ``text`` spells in ASCII digits only (``str.isdigit`` takes "²", which
    ``int`` refuses), else None."""
    return int(text) if text and text.isascii() and text.isdigit() else None


def _user_id(name: str) -> int | None:
    if (number := _id(name)) is not None:
        return number
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def _group_id(name: str) -> int | None:
    if (number := _id(name)) is not None:
        return number
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def groups_of(pid: int, gid: int) -> set[int]:
    """The groups of the process ``pid`` (its ``Groups:`` in /proc, and ``gid``); only
    ``gid`` when they cannot be read (the process ended). Read on a change of owner or an
    ``access`` call only, never on the hot paths."""
    groups = {gid}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
                    break
    except (OSError, ValueError):
        pass
    return groups
