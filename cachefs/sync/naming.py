"""Names the replay gives on the server: conflict copies and temporary upload names.

Owns: the form of ``NAME (conflict YYYY-MM-DD HHMMSS HOST-ID).EXT`` and of
``.NAME.cachefs-tmp-SEQ-CLIENT``, cut to fit 255 bytes at a character boundary, and the
kinds a conflict record can have (``CONFLICT_KINDS``; the log filter of an encrypted cache
shows them as they are).
Must not touch: anything with state (pure functions: no store, no remote, no clock).
Lock/ordering: none (pure).
"""

from __future__ import annotations

from datetime import datetime

#: every kind of conflict record (``conflicts.record``)
CONFLICT_KINDS = frozenset({
    "attributes-of-deleted", "changed-both", "created-both", "damaged-local",
    "deleted-local-changed-remote", "deleted-remote-changed-local", "error",
    "folder-not-empty-remote", "folder-recreated", "renamed-missing-remote",
    "renamed-onto-new-remote"})

#: the most names ``NAME (conflict ... CLIENT N).EXT`` tried for one conflict copy
CONFLICT_NAME_TRIES = 100


def client_tag(host: str, cache_id: str) -> str:
    """``HOST-ID``: the short host name and the cache's id (two caches on one host, or two
    hosts of one name, never make the same conflict name), as file-name-safe text."""
    host = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "-" for c in host)[:32]
    return f"{host or 'host'}-{cache_id}"


def conflict_name(name: bytes, when: float, client: str, n: int = 1) -> bytes:
    """``NAME (conflict YYYY-MM-DD HHMMSS CLIENT).EXT`` (the extension kept last); the
    ``n``-th choice, when the earlier ones are taken, ends ``CLIENT N)``. The stem is cut
    so the name fits 255 bytes: between two characters when it is UTF-8 (a name cut
    inside a character could not be typed, nor given to ``resolve``), else anywhere."""
    stamp = datetime.fromtimestamp(when).strftime("%Y-%m-%d %H%M%S")
    tag = f" (conflict {stamp} {client}{f' {n}' if n > 1 else ''})".encode()
    dot = name.rfind(b".")
    stem, ext = (name[:dot], name[dot:]) if dot > 0 else (name, b"")
    if 255 - len(tag) - len(ext) < 1:  # an "extension" too long to keep whole
        stem, ext = name, b""
    return cut(stem, 255 - len(tag) - len(ext)) + tag + ext


def cut(text: bytes, room: int) -> bytes:
    """``text`` in at most ``room`` bytes, never ending inside a UTF-8 character."""
    if len(text) <= room:
        return text
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        return text[:room]  # not UTF-8: bytes are all there is
    while room > 0 and text[room] & 0xC0 == 0x80:  # a continuation byte: inside a character
        room -= 1
    return text[:room]


def temp_name(path: bytes, seq: int, client: str, kind: bytes = b"tmp") -> bytes:
    """An upload's temporary name beside its target, ``.NAME.cachefs-tmp-SEQ-CLIENT``: the
    cache's tag keeps two caches that replay the same file with the same sequence number
    from writing into one temporary file (the two versions mixed, or one rename finding
    the file gone)."""
    return (b"." + cut(path.rsplit(b"/", 1)[-1], 160) + b".cachefs-" + kind + b"-"
            + f"{seq}-{client[-40:]}".encode())
