"""Progress of long work (sync, pin): the counts kept by the mount, and their display by
the ``cachefs`` command, a bar on a terminal and plain lines otherwise.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO


@dataclass
class Progress:
    """Items and bytes of a long piece of work (a sync pass, a pin walk), for status."""

    ops_done: int = 0
    ops_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    started: float | None = None

    def as_dict(self) -> dict[str, int]:
        return {"ops_done": self.ops_done, "ops_total": self.ops_total,
                "bytes_done": self.bytes_done, "bytes_total": self.bytes_total}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_seconds(s: float) -> str:
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class ProgressView:
    """Shows ``{"ops_done", "ops_total", "bytes_done", "bytes_total"}`` updates."""

    def __init__(self, label: str, stream: TextIO | None = None, interval: float = 2.0) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval  # seconds between plain lines
        self.started = time.monotonic()
        self._last_line = 0.0
        self._last_text = ""
        self._drawn = False

    def update(self, progress: dict[str, Any] | None) -> None:
        """Draw ``progress`` as the mount's status file gives it (``Progress.as_dict``)."""
        if not progress:
            return
        done, total = progress.get("ops_done", 0), progress.get("ops_total", 0)
        bdone, btotal = progress.get("bytes_done", 0), progress.get("bytes_total", 0)
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = bdone / elapsed
        if btotal and bdone and rate > 0:
            eta = f"{human_seconds((btotal - bdone) / rate)} left"
        elif total and done:
            eta = f"{human_seconds((total - done) * elapsed / done)} left"
        else:
            eta = "--"
        numbers = (f"{done}/{total} items  {human_bytes(bdone)}/{human_bytes(btotal)}  "
                   f"{human_bytes(rate)}/s  {eta}")
        if self.tty:
            width = shutil.get_terminal_size((80, 20)).columns
            fraction = (bdone / btotal) if btotal else (done / total if total else 0.0)
            bar_width = max(10, width - len(self.label) - len(numbers) - 6)
            filled = int(bar_width * min(1.0, fraction))
            line = f"{self.label} [{'#' * filled}{'.' * (bar_width - filled)}] {numbers}"
            self.stream.write("\r" + line[:width - 1])
            self.stream.flush()
            self._drawn = True
        else:
            now = time.monotonic()
            text = f"{self.label}: {numbers}"
            if text != self._last_text and now - self._last_line >= self.interval:
                print(text, file=self.stream, flush=True)
                self._last_line, self._last_text = now, text

    def finish(self, message: str) -> None:
        if self._drawn:
            self.stream.write("\n")
        print(message, file=self.stream, flush=True)
