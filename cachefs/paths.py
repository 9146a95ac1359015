"""Share-relative paths: a path is ``bytes`` relative to the share's root (``b""`` is the
root), folders joined with ``/``. Owns nothing; imported by every layer."""

from __future__ import annotations


def join(parent: bytes, name: bytes) -> bytes:
    """Join a share-relative folder path and a name."""
    return name if not parent else parent + b"/" + name
