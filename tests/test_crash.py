"""Crash safety: a seeded loop of real ``kill -9`` at random moments, one cache carried over.

Each iteration mounts the same cache directory again (the journal of the crashed mount
carries over), applies a random batch of operations (create, write, append, rename, unlink,
mkdir, and a file put in place as git does: a temporary name written, linked to the final
name, unlinked), and kills the mount after a random 0-300 ms: while offline writes are
under way, while a replay runs (``online`` just sent), while a ``pin`` of a folder
fetches, or while write-back runs online. The model only learns an operation once the
call returned; an operation the kill interrupted is "uncertain", and the next mount must
show it either not done or done (for a create, an empty file is also allowed: its data
was never closed; a file put in place may stop at each of its three steps). Every few
iterations, and at the end, ``online`` + ``sync`` must leave the server equal to the
model: nothing lost, nothing applied twice, no temporary files, no conflict copies (only
this client writes).

Damage between runs: after some kills, a *copy* of the cache is damaged (one bit of a
journal entry or a node record flipped in place, the index file emptied, or the index
folder removed), and a mount of the copy must be refused with a message naming the cache
and ``cachefs recover`` (nothing of it reaches the server), and ``cachefs recover`` of the
copy must give back every change not yet on the server: each file of the model whose
content the server does not have is among the files it saves. (Damage to content files
between runs is ``tests/test_damage.py``'s seeded test.)

The seed is printed with any failure; ``CACHEFS_CRASH_SEED=N`` replays one (timing still
varies, so a replay is likely, not certain, to hit the same interleaving).
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from pathlib import Path

import shutil

import lmdb
import pytest

from tests.fixtures.mount import MountError, run_recover, run_with_timeout, status
from tests.test_writes import control, sync_until_done

ITERATIONS = 50
CHECK_EVERY = 15
DIRS = ["d0", "d1"]
TOP_FILES = [f"f{i}" for i in range(4)]
DIR_FILES = [f"g{i}" for i in range(3)]
PIN_FILES = 12
PIN_FILE_SIZE = 256 * 1024
OP_TIMEOUT = 15.0
# the errors a call in flight may meet when its mount is killed under it
KILLED_ERRNOS = {errno.ENOTCONN, errno.ECONNABORTED, errno.EIO, errno.ENODEV}

# The model: path -> bytes for a file, None for a folder.
Model = dict[str, "bytes | None"]


def _pin_content(i: int) -> bytes:
    return (f"pinned file {i}\n".encode() * (PIN_FILE_SIZE // 16 + 1))[:PIN_FILE_SIZE]


def _choose_op(rng: random.Random, model: Model, counter: list[int]) -> tuple:
    """One operation valid for ``model`` (so any failure comes from the kill)."""
    dirs_present = [d for d in DIRS if d in model]
    places = [""] + [d + "/" for d in dirs_present]
    candidates = [p + n for p in places for n in (TOP_FILES if p == "" else DIR_FILES)]
    existing = [p for p in candidates if model.get(p) is not None and p in model]
    free = [p for p in candidates if p not in model]
    counter[0] += 1
    unique = f"<op {counter[0]}>".encode()
    kinds = ["create"] * 3 + ["append", "write", "rename", "unlink"] * (2 if existing else 0)
    kinds += ["place"] * (2 if free else 0)
    if len(dirs_present) < len(DIRS):
        kinds.append("mkdir")
    kind = rng.choice(kinds)
    if kind == "create":
        path = rng.choice(candidates)
        return ("create", path, unique + os.urandom(rng.randint(0, 1500)).hex().encode())
    if kind == "append":
        return ("append", rng.choice(existing), unique + b"+" * rng.randint(0, 300))
    if kind == "write":
        path = rng.choice(existing)
        size = len(model[path] or b"")
        return ("write", path, rng.randint(0, size), unique)
    if kind == "rename":
        src = rng.choice(existing)
        dst = rng.choice([p for p in candidates if p != src])
        return ("rename", src, dst)
    if kind == "unlink":
        return ("unlink", rng.choice(existing))
    if kind == "place":
        # git's way: write a temporary name, link the final name to it, unlink the first
        path = rng.choice(free)
        temp = os.path.join(os.path.dirname(path), f".tmp_obj{counter[0]}")
        return ("place", path, temp, unique + os.urandom(rng.randint(0, 1500)).hex().encode())
    return ("mkdir", rng.choice([d for d in DIRS if d not in model]))


def _apply_model(model: Model, op: tuple) -> None:
    kind, path = op[0], op[1]
    if kind == "create":
        model[path] = op[2]
    elif kind == "append":
        model[path] = (model[path] or b"") + op[2]
    elif kind == "write":
        old = model[path] or b""
        offset, data = op[2], op[3]
        old = old + b"\0" * max(0, offset - len(old))
        model[path] = old[:offset] + data + old[offset + len(data):]
    elif kind == "rename":
        model[op[2]] = model.pop(path)
    elif kind == "unlink":
        del model[path]
    elif kind == "mkdir":
        model[path] = None
    elif kind == "place":
        model[path] = op[3]


def _affected(op: tuple) -> list[str]:
    return [op[1], op[2]] if op[0] in ("rename", "place") else [op[1]]


def _apply_mount(root_fd: int, op: tuple) -> None:
    """Run ``op`` relative to an open descriptor of the mount root: after the kill a late
    call meets the dead mount (ENOTCONN), never the empty folder under it."""
    kind, path = op[0], op[1]
    if kind in ("create", "append", "write"):
        flags = {"create": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                 "append": os.O_WRONLY | os.O_APPEND,
                 "write": os.O_WRONLY}[kind]
        fd = os.open(path, flags, 0o644, dir_fd=root_fd)
        try:
            if kind == "write":
                os.pwrite(fd, op[3], op[2])
            else:
                os.write(fd, op[2])
        finally:
            os.close(fd)
    elif kind == "rename":
        os.rename(path, op[2], src_dir_fd=root_fd, dst_dir_fd=root_fd)
    elif kind == "unlink":
        os.unlink(path, dir_fd=root_fd)
    elif kind == "mkdir":
        os.mkdir(path, 0o755, dir_fd=root_fd)
    elif kind == "place":
        temp = op[2]
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444, dir_fd=root_fd)
        try:
            os.write(fd, op[3])
        finally:
            os.close(fd)
        os.link(temp, path, src_dir_fd=root_fd, dst_dir_fd=root_fd)
        os.unlink(temp, dir_fd=root_fd)


def _control_fd(root_fd: int, command: str) -> None:
    fd = os.open(".cachefs/control", os.O_WRONLY, dir_fd=root_fd)
    try:
        os.write(fd, command.encode() + b"\n")
    finally:
        os.close(fd)


def _read_state(mnt: Path, path: str) -> object:
    """What the mount shows at ``path``: bytes, None for a folder, or "absent"."""
    full = mnt / path
    try:
        if full.is_dir():
            return None
        data = run_with_timeout(full.read_bytes, OP_TIMEOUT, f"reading {path}")
        size = full.stat().st_size
    except FileNotFoundError:
        return "absent"
    if len(data) != size:  # (a read that ends early hid a cut content file once)
        return f"stat says {size} bytes, reading gives {len(data)}"
    return data


def _server_tree(share: Path) -> Model:
    tree: Model = {}
    for folder, dirs, files in os.walk(share):
        rel = os.path.relpath(folder, share)
        for d in dirs:
            tree[os.path.normpath(os.path.join(rel, d))] = None
        for f in files:
            tree[os.path.normpath(os.path.join(rel, f))] = (Path(folder) / f).read_bytes()
    return tree


def _describe(tree: Model) -> dict:
    return {k: (None if v is None else (len(v), v[:40])) for k, v in sorted(tree.items())}


class _Worker(threading.Thread):
    """Runs operations on the mount; the model learns each only once it returned."""

    def __init__(self, root_fd: int, ops: list[tuple], model: Model, killing: threading.Event,
                 before: list[str] | None = None) -> None:
        super().__init__(daemon=True, name="crash-worker")
        self.root_fd = root_fd
        self.ops = ops
        self.model = model
        self.killing = killing
        self.before = before or []
        self.uncertain: tuple | None = None
        self.problem: str | None = None
        self.done_ops = 0

    def run(self) -> None:
        for command in self.before:
            try:
                _control_fd(self.root_fd, command)
            except OSError as exc:
                if not self.killing.is_set():
                    self.problem = f"control {command!r} failed before the kill: {exc!r}"
                return
        for op in self.ops:
            try:
                _apply_mount(self.root_fd, op)
            except OSError as exc:
                if self.killing.is_set():
                    self.uncertain = op
                    if exc.errno not in KILLED_ERRNOS:
                        self.problem = f"{op[:3]} failed with {exc!r} during the kill"
                else:
                    self.problem = f"{op[:3]} failed before any kill: {exc!r}"
                return
            _apply_model(self.model, op)
            self.done_ops += 1


def _show(state: dict) -> str:
    """A state for a message: each file's length, its start and its end."""
    def one(v: object) -> object:
        if isinstance(v, bytes) and len(v) > 60:
            return f"{len(v)} bytes {v[:24]!r}...{v[-24:]!r}"
        return v
    return repr({k: one(v) for k, v in state.items()})


def _settle_uncertain(mnt: Path, model: Model, op: tuple) -> str | None:
    """Accept the mount's state for an interrupted op if it is 'not done' or 'done'."""
    before = dict(model)
    after = dict(model)
    _apply_model(after, op)
    paths = _affected(op)
    seen = {p: _read_state(mnt, p) for p in paths}
    pre = {p: before.get(p, "absent") for p in paths}
    post = {p: after.get(p, "absent") for p in paths}
    allowed = [pre, post]
    if op[0] == "create":
        allowed.append({op[1]: b""})  # created, data never closed
    if op[0] == "place":  # stopped after the temporary file's create, write, or link
        final, temp, data = op[1], op[2], op[3]
        allowed += [{final: "absent", temp: b""}, {final: "absent", temp: data}, {final: data, temp: data}]
    if seen not in allowed:
        return (f"interrupted {op[:2]}: the mount shows {_show(seen)}, "
                f"neither before {_show(pre)} nor after {_show(post)}")
    for p in paths:
        if seen[p] == "absent":
            model.pop(p, None)
        else:
            model[p] = seen[p]  # type: ignore[assignment]
    if op[0] == "place" and seen[op[2]] != "absent":
        # Finish the job as its writer would: a temporary name left linked to the final
        # one is the same file (a later write to either shows in both), which the model,
        # a name -> bytes map, cannot follow.
        run_with_timeout(lambda: os.unlink(mnt / op[2]), OP_TIMEOUT, f"removing {op[2]}")
        model.pop(op[2])
    return None


def _check_server(mnt: Path, share: Path, model: Model, iteration: int) -> list[str]:
    control(mnt, "online")
    sync_until_done(mnt, 45)
    st = status(mnt)
    problems = []
    if st["pending"] != 0 or st["conflicts"] != 0:
        problems.append(f"after sync (iteration {iteration}): {st}")
    got = _server_tree(share)
    leftovers = [k for k in got if ".cachefs-tmp-" in k]
    copies = [k for k in got if "(conflict " in k]
    if leftovers:
        problems.append(f"temporary upload files left on the server: {leftovers}")
    if copies:
        problems.append(f"conflict copies although only this client writes: {copies}")
    if got != model:
        missing = sorted(set(model) - set(got))
        extra = sorted(set(got) - set(model))
        differ = {k: (_describe({k: got[k]})[k], _describe({k: model[k]})[k])
                  for k in sorted(set(got) & set(model)) if got[k] != model[k]}
        problems.append(f"server differs from the model after iteration {iteration}: missing {missing}, "
                        f"extra {extra}, different (server, model) {differ}")
    return problems


DAMAGE_EVERY = 4  # a damaged copy of the cache after every fourth kill (when no op was cut)


def _flip_a_record_bit(index: Path, rng: random.Random) -> str:
    """One bit of one journal entry or node record, changed in place through LMDB (as a
    disk would change it); what was flipped."""
    env = lmdb.open(str(index), max_dbs=12, subdir=True)
    try:
        with env.begin(write=True) as txn:
            choices = []
            for name in (b"journal", b"nodes"):
                db = env.open_db(name, txn=txn)
                choices += [(name, db, bytes(k), bytes(v)) for k, v in txn.cursor(db=db)]
            name, db, key, value = rng.choice(choices)
            bit = rng.randrange(len(value) * 8)
            flipped = bytearray(value)
            flipped[bit // 8] ^= 1 << (bit % 8)
            txn.put(key, bytes(flipped), db=db)
    finally:
        env.close()
    return f"bit {bit} of {name.decode()} record {key.hex()}"


def _damage_a_copy(mount_factory, cache_dir: Path, copy: Path, share: Path, model: Model,
                   rng: random.Random) -> tuple[list[str], int]:
    """Damage a copy of the cache; its mount must be refused, and ``cachefs recover``
    must save every change the server does not have yet. Problems found, and how many
    changes (files whose content the server lacks) were checked."""
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(cache_dir, copy)
    how = rng.choice(["record", "record", "empty index", "no index"])
    if how == "record":
        what = _flip_a_record_bit(copy / "index", rng)
    elif how == "empty index":
        os.truncate(copy / "index" / "data.mdb", 0)
        what = "data.mdb emptied"
    else:
        shutil.rmtree(copy / "index")
        what = "index/ removed"
    problems = []
    server_before = _server_tree(share)
    refused = mount_factory(cache=copy.name, name="mnt-damaged", check_log=False)
    with pytest.raises(MountError):
        refused.start()
    text = refused.log_text()
    if refused.process.returncode in (None, 0) or "Traceback" in text \
            or str(copy) not in text or "cachefs recover" not in text:
        problems.append(f"damaged copy ({what}): not refused clearly (exit "
                        f"{refused.process.returncode}): {text[-1500:]}")
    if _server_tree(share) != server_before:
        problems.append(f"damaged copy ({what}): the server changed")
    out = copy.with_name(copy.name + "-recovered")
    shutil.rmtree(out, ignore_errors=True)
    result = run_recover(str(copy), "--to", str(out))
    if result.returncode != 0 or "Traceback" in result.stderr:
        problems.append(f"recover of the damaged copy ({what}) failed: {result.stdout}{result.stderr}")
        return problems, 0
    saved = {p.read_bytes() for p in out.rglob("*") if p.is_file() and p.parent != out}
    on_server = {v for v in server_before.values() if v is not None}
    changes = [path for path, data in model.items() if data is not None and data not in on_server]
    lost = sorted(path for path in changes if model[path] not in saved)
    if lost:
        problems.append(f"damaged copy ({what}): recover did not save {lost}; it said {result.stdout[-1500:]}")
    return problems, len(changes)


def test_kill9_at_random_moments_loses_nothing(mount_factory, share: Path, tmp_path: Path) -> None:
    seed = int(os.environ.get("CACHEFS_CRASH_SEED", random.randrange(1 << 32)))
    print(f"test_crash seed: {seed} (CACHEFS_CRASH_SEED={seed} to replay)")
    rng = random.Random(seed)
    (share / "pinned").mkdir()
    model: Model = {"pinned": None}
    for i in range(PIN_FILES):
        (share / "pinned" / f"p{i}.bin").write_bytes(_pin_content(i))
        model[f"pinned/p{i}.bin"] = _pin_content(i)
    counter = [0]
    modes_seen: dict[str, int] = {}
    pending_uncertain: tuple | None = None
    iteration = -1
    interrupted = 0
    history: list[str] = []  # what each iteration did, for the failure message
    damaged_copies = changes_recovered = 0
    try:
        for iteration in range(ITERATIONS):
            mount = mount_factory(check_log=False)
            mount.start()  # the cache index of the crashed mount opens cleanly
            mnt = mount.mountpoint
            if pending_uncertain is not None:
                problem = _settle_uncertain(mnt, model, pending_uncertain)
                assert problem is None, problem
                pending_uncertain = None
            if iteration and iteration % CHECK_EVERY == 0:
                problems = _check_server(mnt, share, model, iteration)
                assert not problems, "\n".join(problems)
            mode = rng.choice(["offline", "offline", "replay", "pin", "online"])
            modes_seen[mode] = modes_seen.get(mode, 0) + 1
            # list every folder so that it can be changed offline
            run_with_timeout(lambda: [os.listdir(mnt / d) for d in ["", *DIRS] if d == "" or d in model],
                             OP_TIMEOUT, "listing")
            ops = [_choose_op(rng, model, counter)]
            shadow = dict(model)
            _apply_model(shadow, ops[0])
            for _ in range(rng.randint(2, 12)):
                op = _choose_op(rng, shadow, counter)
                _apply_model(shadow, op)
                ops.append(op)
            before: list[str] = []
            if mode in ("offline", "replay"):
                control(mnt, "offline")
            elif mode == "pin":
                control(mnt, "online")
                if rng.random() < 0.5:
                    control(mnt, "evict pinned")  # so that the pin has something to fetch
                before = ["pin pinned"]
            else:
                control(mnt, "online")
            history.append(f"iteration {iteration} ({mode}): " + "; ".join(
                f"{op[0]} {op[1]}" + (f" -> {op[2]}" if op[0] == "rename" else "")
                + (f" (via {op[2]})" if op[0] == "place" else "") for op in ops))
            root_fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
            killing = threading.Event()
            try:
                if mode == "replay":
                    # all operations complete offline; the kill falls into the replay
                    worker = _Worker(root_fd, ops, model, killing)
                    worker.run()
                    assert worker.problem is None, worker.problem
                    control(mnt, "online")
                    time.sleep(rng.uniform(0, 0.3))
                else:
                    worker = _Worker(root_fd, ops, model, killing, before=before)
                    worker.start()
                    # operations take milliseconds: most kills land in the first few
                    time.sleep(rng.uniform(0, 0.3) * rng.choice([1, 0.05, 0.02]))
                killing.set()
                mount.kill9()
                if worker.ident is not None:  # started as a thread
                    worker.join(OP_TIMEOUT)
                assert not worker.is_alive(), "an operation hung on the killed mount"
                assert worker.problem is None, worker.problem
                pending_uncertain = worker.uncertain
                history.append(f"  killed after {worker.done_ops} ops done; interrupted: {worker.uncertain and worker.uncertain[:2]}"
                               f"; log {mount.log_path}")
                interrupted += worker.uncertain is not None
            finally:
                os.close(root_fd)
            assert "Traceback" not in mount.log_text(), mount.log_text()[-5000:]
            if iteration % DAMAGE_EVERY == DAMAGE_EVERY - 1 and pending_uncertain is None:
                problems, checked = _damage_a_copy(mount_factory, mount.cache_dir, tmp_path / "damaged",
                                                   share, model, rng)
                damaged_copies += 1
                changes_recovered += checked
                assert not problems, "\n".join(problems)
        mount = mount_factory(check_log=False)
        mount.start()
        if pending_uncertain is not None:
            problem = _settle_uncertain(mount.mountpoint, model, pending_uncertain)
            assert problem is None, problem
        problems = _check_server(mount.mountpoint, share, model, ITERATIONS)
        assert not problems, "\n".join(problems)
        mount.stop()
        assert "Traceback" not in mount.log_text(), mount.log_text()[-5000:]
        print(f"modes: {modes_seen}, operations chosen: {counter[0]}, interrupted by the kill: {interrupted}, "
              f"damaged copies refused and recovered: {damaged_copies}, with {changes_recovered} changes")
        assert damaged_copies >= 3 and changes_recovered >= 3, "too few damaged copies: the test proves little"
        assert interrupted >= 2, "too few kills fell on an operation in flight: the test proves little"
    except BaseException as exc:
        raise AssertionError(f"[seed {seed}, iteration {iteration}] {exc}\nlast iterations:\n"
                             + "\n".join(history[-8:])) from exc


def test_setattr_of_mount_root_survives_the_journal(mount_factory, share: Path) -> None:
    """A chmod/utime of the mount root journals an op whose path is empty: it must read
    back (replay, restart) like any other."""
    mount = mount_factory(check_log=False)
    mount.start()
    mnt = mount.mountpoint
    control(mnt, "offline")
    os.chmod(mnt, 0o750)
    write_file_ok = (mnt / "after.txt")
    write_file_ok.write_bytes(b"after the root chmod")
    mount.kill9()
    with mount_factory() as again:
        control(again.mountpoint, "online")
        sync_until_done(again.mountpoint)
        assert status(again.mountpoint)["pending"] == 0
        assert (share / "after.txt").read_bytes() == b"after the root chmod"
        assert oct(os.stat(share).st_mode & 0o777) == oct(0o750)
