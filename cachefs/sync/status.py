"""What the sync manager shows in status: whether a pass runs, when the last one ended
well, the last error, and what a pass returns.

Owns: ``syncing``, ``last_sync``, ``last_error`` (the running pass's progress is the
replay's), ``PassResult`` and the text of a damage note.
Must not touch: anything else (plain values).
Lock/ordering: written by the pass that holds the pass lock, or by ``run`` between
passes; read by control at any time (single trio thread: never half-written).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PassResult:
    complete: bool
    reason: str | None = None
    damaged: list[str] = field(default_factory=list)  # paths whose content failed its checksum
    #: stopped by a failure (a local error, a damaged journal entry), not by the link, a
    #: file still open for writing or one written while sent (those resume by themselves)
    failed: bool = False


def damage_note(paths: list[str]) -> str:
    shown = ", ".join(repr(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    return (f"damaged in the cache, not uploaded: {shown} (the server keeps its version; "
            "see 'cachefs conflicts')")


@dataclass
class SyncStatus:
    syncing: bool = False
    last_sync: float | None = None
    last_error: str | None = None

    def after_pass(self, result: PassResult, when: float, damaged: list[str], refusals: int) -> None:
        """A pass ended: ``damaged``, the paths whose damage records are kept (they stay in
        status while kept); ``refusals``, the changes the server refused since the last
        request."""
        if not result.complete:
            self.last_error = result.reason
            return
        self.last_sync = when
        self.last_error = damage_note(damaged) if damaged else None
        if refusals:  # (replayed, but the remote refused some changes)
            self.last_error = (f"the remote refused {refusals} change(s), kept "
                               f"here: see 'cachefs conflicts'")
