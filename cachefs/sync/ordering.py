"""The order of a replay: which journal entries may run side by side.

Owns: the cut of the journal into batches (``batches``) and the stretch of them a server
hash asked for ahead stays true for (``until_barrier``).
Must not touch: anything with state (pure functions over ``Op`` lists).
Lock/ordering: none (pure); the order it gives is the one rule the replay keeps: an entry
runs after every earlier entry it depends on, and a namespace change alone.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..store.journal import Op

#: operations that change one object (and, for mkdir, add its name to its folder); the
#: others (link, unlink, rmdir, rename, symlink) run alone, between the runs of these
INDEPENDENT = {"create", "store", "setattr", "mkdir", "xattr"}


def batches(ops: list[Op], width: int) -> Iterator[list[Op]]:
    """Journal order, cut into groups that may run concurrently, at most ``width`` each.

    Every namespace change but mkdir runs alone (a barrier). Between two barriers, an
    operation goes one layer after the last one it depends on: the last about the same
    object, the last about its folder (a folder is made before what goes in it, and its
    times are set after, as the journal had them), and, for a folder, the last about
    anything in it. A copied tree thus replays ``width`` files at a time (creates in one
    layer, the ``setattr`` that gave each the original's mode in the next) instead of
    one folder or two entries at a time."""
    run: list[Op] = []
    for op in ops:
        if op.kind in INDEPENDENT:
            run.append(op)
            continue
        yield from _layers(run, width)
        run = []
        yield [op]
    yield from _layers(run, width)


def until_barrier(batches: list[list[Op]], at: int) -> list[list[Op]]:
    """The batches from ``at`` on, up to the next one that changes names (a rename, link,
    unlink, ...): a hash the server gives of a path before such a change may be of
    another file than the one there when the ``store`` entry after it is replayed (a
    rename onto that name in the same pass made a false conflict)."""
    out = [batches[at]]
    for batch in batches[at + 1:]:
        if any(op.kind not in INDEPENDENT for op in batch):
            break
        out.append(batch)
    return out


def _layers(run: list[Op], width: int) -> Iterator[list[Op]]:
    layers: list[list[Op]] = []
    last: dict[int, int] = {}  # object -> layer of the latest operation about it
    inner: dict[int, int] = {}  # folder -> layer of the latest operation on something in it
    for op in run:
        layer = 1 + max(last.get(op.ino, -1), last.get(op.parent, -1), inner.get(op.ino, -1))
        last[op.ino] = layer
        inner[op.parent] = max(inner.get(op.parent, -1), layer)
        if layer == len(layers):
            layers.append([])
        layers[layer].append(op)
    for ops in layers:
        for start in range(0, len(ops), width):
            yield ops[start:start + width]
