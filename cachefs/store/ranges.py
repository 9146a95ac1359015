"""Byte-range sets: which parts of a file's content are present in the cache.

Pure logic, no I/O. A set is a sorted list of disjoint, non-adjacent half-open
intervals ``[start, end)``.
"""

from __future__ import annotations

import struct

Ranges = list[tuple[int, int]]

_PAIR = struct.Struct("<QQ")


def add(ranges: Ranges, start: int, end: int) -> Ranges:
    """The union of ``ranges`` and ``[start, end)``, merged."""
    if end <= start:
        return ranges
    out: Ranges = []
    placed = False
    for s, e in ranges:
        if e < start:
            out.append((s, e))
        elif end < s:
            if not placed:
                out.append((start, end))
                placed = True
            out.append((s, e))
        else:
            start, end = min(s, start), max(e, end)
    if not placed:
        out.append((start, end))
    return out


def missing(ranges: Ranges, start: int, end: int) -> Ranges:
    """The parts of ``[start, end)`` not covered by ``ranges``."""
    gaps: Ranges = []
    pos = start
    for s, e in ranges:
        if e <= pos:
            continue
        if s >= end:
            break
        if s > pos:
            gaps.append((pos, s))
        pos = max(pos, e)
        if pos >= end:
            break
    if pos < end:
        gaps.append((pos, end))
    return gaps


def covers(ranges: Ranges, start: int, end: int) -> bool:
    return not missing(ranges, start, end)


def total(ranges: Ranges) -> int:
    return sum(e - s for s, e in ranges)


def clip(ranges: Ranges, size: int) -> Ranges:
    """Drop what lies at or past ``size`` (after a truncate)."""
    return [(s, min(e, size)) for s, e in ranges if s < size]


def encode(ranges: Ranges) -> bytes:
    return b"".join(_PAIR.pack(s, e) for s, e in ranges)


def decode(data: bytes) -> Ranges:
    if len(data) % _PAIR.size:
        raise ValueError("corrupt range record")
    return [_PAIR.unpack_from(data, i) for i in range(0, len(data), _PAIR.size)]
