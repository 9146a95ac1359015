"""The encrypted cache's building blocks, in-process: sealed content files against a
plain model, sealed records, and the key check."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachefs.store import crypto
from cachefs.store.index import ROOT_INO, Store, StoreError
from cachefs.cache.listing import apply_listing
from cachefs.remote.base import RemoteStat

KEY = bytes(range(32))

ops = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 300_000), st.binary(min_size=1, max_size=100_000)),
    st.tuples(st.just("truncate"), st.integers(0, 300_000)),
), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_sealed_content_behaves_like_a_plain_file(tmp_path_factory, steps) -> None:
    path = tmp_path_factory.mktemp("sealed") / "f"
    content = crypto.SealedContent(KEY)
    model = bytearray()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for step in steps:
            if step[0] == "write":
                _, off, data = step
                content.pwrite(fd, data, off)
                if len(model) < off:
                    model += bytes(off - len(model))
                model[off:off + len(data)] = data
            else:
                _, size = step
                content.truncate(fd, size)
                model = model[:size] + bytes(max(0, size - len(model)))
            assert content.pread(fd, len(model), 0) == bytes(model)
        start = max(0, len(model) - 500)
        assert content.pread(fd, len(model) - start, start) == bytes(model[start:])
        with content.reader(fd, len(model)) as stream:
            assert stream.read() == bytes(model)
        if model:  # bytes past the size the index recorded are never read (a crash left them)
            with content.reader(fd, len(model) // 2) as stream:
                assert stream.read() == bytes(model[:len(model) // 2])
    finally:
        os.close(fd)


def test_sealed_content_holds_no_plaintext_and_detects_tampering(tmp_path: Path) -> None:
    content = crypto.SealedContent(KEY)
    secret = b"the plans for tomorrow " * 5000
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        content.pwrite(fd, secret, 0)
        raw = (tmp_path / "f").read_bytes()
        assert b"the plans" not in raw
        # flip the bits of one byte of the first block's ciphertext (writing a fixed byte
        # changed nothing when the byte already had that value: 1 run in 256)
        os.pwrite(fd, bytes([raw[100] ^ 0xFF]), 100)
        with pytest.raises(OSError):
            content.pread(fd, 10, 0)
    finally:
        os.close(fd)


def test_key_is_checked_and_the_mode_must_match(tmp_path: Path) -> None:
    cache = tmp_path / "c"
    cache.mkdir(mode=0o700)
    key = crypto.open_key(cache, b"passphrase")
    assert key is not None and len(key) == 32
    assert crypto.open_key(cache, b"passphrase") == key
    with pytest.raises(crypto.CryptoError, match="wrong key"):
        crypto.open_key(cache, b"not it")
    with pytest.raises(crypto.CryptoError, match="is encrypted"):
        crypto.open_key(cache, None)
    plain = tmp_path / "p"
    Store(plain, "file:///x").close()
    with pytest.raises(crypto.CryptoError, match="not encrypted"):
        crypto.open_key(plain, b"passphrase")


def test_sealed_journal_entry_rewritten_stays_sealed(tmp_path: Path) -> None:
    """An entry the sync manager rewrites (``journal.optimise`` folding git's put-in-place
    into one create) is sealed like a new one: it was once written plain, which showed
    the path on disk and made the next start refuse the cache (it could not open it)."""
    from cachefs.store.journal import Op
    cache = tmp_path / "c"
    cache.mkdir(mode=0o700)
    key = crypto.open_key(cache, b"pw")
    store = Store(cache, "sftp://alice@secret-host/plans", key=key)
    seq = store.transact(lambda t: t.append(Op("create", 100, b"tmp_obj_x", parent=ROOT_INO)))
    store.transact(lambda t: t.put_op(seq, Op("create", 100, b"objects/ab/secret-object",
                                                  parent=ROOT_INO)))
    store.close()
    raw = b"".join(p.read_bytes() for p in (cache / "index").iterdir())
    assert b"secret-object" not in raw
    store = Store(cache, "sftp://alice@secret-host/plans", key=key)
    assert [(op.seq, op.path) for op in store.journal_ops()] == [(seq, b"objects/ab/secret-object")]
    store.close()


def test_sealed_store_keeps_names_out_of_the_index(tmp_path: Path) -> None:
    cache = tmp_path / "c"
    cache.mkdir(mode=0o700)
    key = crypto.open_key(cache, b"pw")
    store = Store(cache, "sftp://alice@secret-host/plans", key=key)
    rstat = RemoteStat(mode=0o100644, size=3, mtime_ns=10**9, atime_ns=0)
    apply_listing(store, ROOT_INO, [(b"merger-plans.txt", rstat), (b"caf\xe9", rstat)])
    assert sorted(n.name for n in store.children(ROOT_INO)) == [b"caf\xe9", b"merger-plans.txt"]
    assert store.child(ROOT_INO, b"merger-plans.txt") is not None
    store.close()
    raw = b"".join(p.read_bytes() for p in (cache / "index").iterdir())
    for needle in (b"merger-plans", b"secret-host", b"caf\xe9"):
        assert needle not in raw
    with pytest.raises(StoreError):
        Store(cache, "sftp://alice@secret-host/plans")  # no key
    store = Store(cache, "sftp://alice@secret-host/plans", key=key)
    assert store.child(ROOT_INO, b"caf\xe9") is not None
    store.close()
