"""Keeping names out of an encrypted cache's log.

Owns: ``Redactor``, the logging filter that the daemon puts on its log handler when the
cache is encrypted and ``--verbose`` was not given (``daemon.setup_logging``). The cache
itself stores no name in clear (see docs/architecture.md, "Encryption at rest"); without
this filter ``CACHE_DIR/mount.log`` would, through the arguments of log calls (a path as
``%r`` of ``b'...'``, the remote's address on INFO lines), exception messages (an
``OSError``'s file name, a ``RemoteError``'s text) and the last line of tracebacks.
Must not touch: the log calls themselves. It works on every record, cachefs's and its
libraries', whatever the call site, so a new log line cannot leak by forgetting it.

What is kept: the message template (a literal in the code), numbers, enums, errno numbers
and names with the standard ``strerror`` text, exception type names, traceback frames
(file, line, function and source line of the code), and a few words that are the code's
own vocabulary (journal operation kinds, conflict kinds, connectivity states, FUSE request
names, strerror texts); a name passed as ``str`` that is exactly one of these words would
show (names mostly travel as ``bytes``, which are always replaced). The remote's address,
the mount point and the cache directory are also taken out of message templates (a
library may format a message before it logs it). Every other string, ``bytes``, path or
object is replaced by ``[TYPE xxxxxx]``: six hex digits of an HMAC under a key drawn at
random for the process, so that the lines of one run that name the same thing can be
matched, while a guess cannot be checked against an old log (the key is never written).
"""

from __future__ import annotations

import enum
import errno
import hashlib
import hmac
import logging
import os
import traceback
from collections.abc import Iterable, Mapping
from typing import Any

def vocabulary() -> frozenset[str]:
    """Strings that are the code's vocabulary, never a name of the user's: journal
    operations, conflict kinds, connectivity states, FUSE requests."""
    from .link.connectivity import State
    from .store.journal import KINDS
    from .sync.naming import CONFLICT_KINDS

    words = set(KINDS) | set(CONFLICT_KINDS) | {state.value for state in State}
    try:
        import pyfuse3

        words |= {name for name in dir(pyfuse3.Operations) if not name.startswith("_")}
    except ImportError:  # pragma: no cover - the daemon always has it
        pass
    words |= {os.strerror(code) for code in errno.errorcode}
    return frozenset(words)


class _Tag(str):
    """A stand-in for a name; ``%r`` shows it as ``%s`` does (no quotes around it)."""

    def __repr__(self) -> str:
        return str(self)


class Redactor(logging.Filter):
    """Rewrites each record so that it names no file, folder or remote (see the module)."""

    def __init__(self, known: Iterable[str] = ()) -> None:
        """``known``: texts to take out wherever they appear, even in a message template
        (libraries, paramiko for one, format their messages before logging them): the
        remote's address, host and share path, the mount point, the cache directory."""
        super().__init__()
        self._key = os.urandom(16)
        self._words = vocabulary()
        self._known = sorted({k for k in known if k and len(k) >= 4}, key=len, reverse=True)

    # -- the filter ----------------------------------------------------------------------
    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str):
            record.msg = self.value(record.msg)
        if isinstance(record.args, Mapping):
            record.args = {k: self.value(v) for k, v in record.args.items()}
        elif record.args:
            record.args = tuple(self.value(arg) for arg in record.args)
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self.traceback(record.exc_info[1])
        elif record.exc_text:
            record.exc_text = self.tag("traceback", record.exc_text)
        if self._known:
            record.msg = self._without_known(record.msg)
            if record.exc_text:
                record.exc_text = self._without_known(record.exc_text)
        return True

    def _without_known(self, text: str) -> str:
        for known in self._known:
            if known in text:
                text = text.replace(known, self.tag("text", known))
        return text

    # -- values --------------------------------------------------------------------------
    def tag(self, kind: str, text: str | bytes) -> str:
        """``[KIND xxxxxx]``: the same text gives the same tag within this process."""
        data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
        return _Tag(f"[{kind} {hmac.new(self._key, data, hashlib.sha256).hexdigest()[:6]}]")

    def value(self, value: Any) -> Any:
        """A log argument as it may be shown: numbers and enums as they are, words of the
        vocabulary as they are, an exception as ``exception``, anything else tagged."""
        if value is None or isinstance(value, (bool, int, float, enum.Enum)):
            return value
        if isinstance(value, str):
            return value if value in self._words else self.tag("text", value)
        if isinstance(value, (bytes, bytearray, memoryview)):
            return self.tag("name", bytes(value))
        if isinstance(value, BaseException):
            return self.exception(value)
        if isinstance(value, os.PathLike):
            return self.tag("path", os.fsencode(value))
        return self.tag(type(value).__name__, repr(value))

    def exception(self, exc: BaseException) -> str:
        """What ``str(exc)`` would say, without names: an ``OSError`` keeps its errno,
        errno name and standard message; any other text is tagged."""
        if isinstance(exc, OSError) and exc.errno is not None:
            out = f"[Errno {exc.errno} {errno.errorcode.get(exc.errno, '?')}]"
            if exc.strerror:
                out += " " + (exc.strerror if exc.strerror == os.strerror(exc.errno)
                              else self.tag("text", exc.strerror))
            for name in (exc.filename, exc.filename2):
                if name is not None:
                    out += ": " + self.value(name)
            return out
        text = str(exc)
        return self.tag("text", text) if text else ""

    def traceback(self, exc: BaseException) -> str:
        """The traceback of ``exc`` and its causes, each exception's message redacted as
        by ``exception``; frames (code locations and source lines) are kept."""
        te = traceback.TracebackException(type(exc), exc, exc.__traceback__)
        if not hasattr(te, "_str"):  # a Python that formats otherwise: type names only
            chain: list[str] = []
            seen: BaseException | None = exc
            while seen is not None and len(chain) < 20:
                chain.append(type(seen).__qualname__)
                seen = seen.__cause__ or seen.__context__
            return "(traceback withheld: the cache is encrypted) " + " <- ".join(chain)
        self._scrub(te, exc, set())
        return "".join(te.format()).rstrip("\n")

    def _scrub(self, te: Any, exc: BaseException | None, seen: set[int]) -> None:
        if te is None or id(te) in seen:
            return
        seen.add(id(te))
        te._str = self.exception(exc) if exc is not None else ""
        if getattr(te, "__notes__", None):
            te.__notes__ = [self.tag("note", str(note)) for note in te.__notes__]
        self._scrub(te.__cause__, exc.__cause__ if exc is not None else None, seen)
        self._scrub(te.__context__, exc.__context__ if exc is not None else None, seen)
        group = getattr(exc, "exceptions", None) or ()
        for sub_te, sub_exc in zip(getattr(te, "exceptions", None) or (), group):
            self._scrub(sub_te, sub_exc, seen)
