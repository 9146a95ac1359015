"""Defaults and value parsers shared by the command line and the parts it configures.

Owns: the default cache size and write-back hold, and the parsing of sizes. Must not
touch: anything heavier than the standard library, so that ``cachefs status`` and the
other commands that only talk to a mount start without loading trio, LMDB or the
cryptography library (``tests/test_cli.py::test_commands_load_only_what_they_need``).
"""

from __future__ import annotations

import re
from fractions import Fraction

DEFAULT_CACHE_SIZE = 10 << 30  # 10 GiB
#: the longest a burst of changes holds write-back back (rclone's --vfs-write-back is 5 s too)
DEFAULT_WRITEBACK_HOLD = 5.0

#: the largest size cachefs handles: a 64-bit signed file size (off_t)
MAX_SIZE = (1 << 63) - 1
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?:(?P<unit>[KMGTP])(?:I?B)?|B)?")


def parse_size(text: str, minimum: int = 1, maximum: int = MAX_SIZE) -> int:
    """'10G', '512M', '1.5GiB', '1000000' -> bytes (K, M, G, T, P are powers of 1024).

    Only a plain decimal number and one unit: no sign, exponent, ``inf``, ``nan``,
    separators or other suffix (``float()`` would take most of those). A fraction of a
    byte is dropped. Raises ``ValueError`` with a message for the user outside
    ``minimum``..``maximum``."""
    match = _SIZE.fullmatch(text.strip().upper())
    if match is None:
        raise ValueError(f"not a size: {text!r} (a number with an optional unit K, M, G, T "
                         f"or P, e.g. 500M, 10G, 1.5GiB)")
    value = int(Fraction(match["number"]) * _UNITS[match["unit"] or ""])
    if value < minimum:
        raise ValueError(f"{text!r} is too small: at least {_shown(minimum)}"
                         + (" (a number without a unit is bytes)" if not match["unit"] and minimum > 1
                            else ""))
    if value > maximum:
        raise ValueError(f"{text!r} is too large: at most {_shown(maximum)}")
    return value


def _shown(size: int) -> str:
    """A bound in the unit it is a whole number of (1048576 -> '1M')."""
    if size == MAX_SIZE:
        return "2^63 - 1 bytes (8 EiB, the largest file size)"
    for unit in "PTGMK":
        if size >= _UNITS[unit] and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return f"{size} bytes" if size != 1 else "1 byte"
