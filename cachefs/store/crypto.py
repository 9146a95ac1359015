"""Encryption of the cache at rest (``--encrypt-cache``), and plain content I/O.

Owns: the key (derived with scrypt from a passphrase or a key file, checked against
``CACHE_DIR/crypt.json``), the sealing of index records and names (AES-256-GCM), and the
format of content files: plain, or sealed in blocks.
Must not touch: what the records mean (``store``), the network, FUSE.

Sealed content files hold fixed-size slots, one per 64 KiB block of the file::

    slot i at offset i * (32 + 65536):  length (4) | nonce (12) | GCM tag (16) | ciphertext

A slot whose length is zero (a hole in the sparse file) holds no data and reads as zeros. Every write of a
block re-encrypts it with a fresh random nonce; the block number is the associated data,
so blocks cannot be swapped around unnoticed. Names in the index are sealed too; lookups
by name use a keyed hash of it (HMAC-SHA256), so no name is stored in clear.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

if TYPE_CHECKING:
    from typing_extensions import Buffer

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

BLOCK = 64 << 10
HEAD = 32  # length + nonce + tag
SLOT = HEAD + BLOCK
_LEN = struct.Struct(">I")
_CHECK = b"cachefs key check"
_BLOCK_AAD = struct.Struct(">Q")


class CryptoError(Exception):
    """Wrong key, or a cache that is (or is not) encrypted when the user says otherwise."""


class RecordError(ValueError):
    """An index record that fails its check (a CRC in a plain cache, the AEAD tag in an
    encrypted one): damaged on disk. Never used in a guessed form."""


# -- index records ------------------------------------------------------------------------
_CRC = struct.Struct("<I")
#: the CRC's starting value: an all-zero record (a page zeroed on disk) never checks
_CRC_SEED = zlib.crc32(b"cachefs record")


class PlainCodec:
    """Index records of a plain cache: the record, then a CRC32 of the record's key and
    the record (schema 2). The key is in the check, so a changed bit in a key (a journal
    entry's sequence number, a folder entry's name) fails it as a changed value does."""

    encrypted = False

    def seal(self, data: bytes, key: bytes = b"") -> bytes:
        return data + _CRC.pack(zlib.crc32(data, zlib.crc32(key, _CRC_SEED)))

    def open(self, data: bytes, key: bytes = b"") -> bytes:
        n = len(data) - 4
        body = data[:n]
        if n < 0 or _CRC.unpack_from(data, n)[0] != zlib.crc32(body, zlib.crc32(key, _CRC_SEED)):
            raise RecordError("fails its checksum")
        return body if type(body) is bytes else bytes(body)

    def open_schema1(self, data: bytes) -> bytes:
        """A record as schema 1 wrote it (no check at all), for the upgrade."""
        return bytes(data)

    def name_key(self, name: bytes) -> bytes:
        return name


class SealedCodec(PlainCodec):
    """Index records of an encrypted cache: nonce + AES-GCM of the record, with the
    record's key as associated data (schema 2), so a record moved under another key (a
    changed bit in the key) fails the tag as a changed bit in the record does."""

    encrypted = True

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(hashlib.sha256(b"records" + key).digest())
        self._names = hashlib.sha256(b"names" + key).digest()

    def seal(self, data: bytes, key: bytes = b"") -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, bytes(data), key or None)

    def open(self, data: bytes, key: bytes = b"") -> bytes:
        data = bytes(data)
        if len(data) < 28:  # nonce + tag
            raise RecordError("is cut short")
        try:
            return self._aead.decrypt(data[:12], data[12:], key or None)
        except InvalidTag:
            raise RecordError("does not decrypt (damaged)") from None

    def open_schema1(self, data: bytes) -> bytes:
        return self.open(data)

    def name_key(self, name: bytes) -> bytes:
        return hmac.new(self._names, name, hashlib.sha256).digest()[:20]


# -- content files ----------------------------------------------------------------------------
class PlainContent:
    """Content files holding the bytes as they are (sparse where not fetched)."""

    encrypted = False

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    _buffer = bytearray(0)

    def pread_cached(self, fd: int, size: int, offset: int) -> bytes | memoryview | None:
        """The bytes if the page cache holds them all, else None (without waiting for the
        disk: RWF_NOWAIT), so that only reads that must wait go to a thread.

        The view is into one buffer reused by every call (a fresh buffer costs a page
        fault per 4 KiB): use it before the next call, without yielding to trio between.
        """
        if len(self._buffer) < size:
            self._buffer = bytearray(max(size, 128 * 1024))
        view = memoryview(self._buffer)[:size]
        try:
            done = os.preadv(fd, [view], offset, os.RWF_NOWAIT)
        except OSError:  # EAGAIN; EOPNOTSUPP where there is no RWF_NOWAIT; a real error
            return None  # shows again in the thread's pread
        return view if done == size else None

    def pread_into(self, fd: int, view: memoryview, offset: int) -> int:
        """Blocking: fill ``view`` from ``offset`` (short only at the end of the file)."""
        return _pread_fill(fd, view, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
        return done

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def length(self, fd: int) -> int:
        """How long the content is, as far as the file shows (a hole at the end of a
        sealed file does not show)."""
        return os.fstat(fd).st_size

    def fit(self, fd: int, size: int) -> bool:
        """Cut or grow the content to ``size`` if it is not that long; whether it was not."""
        if os.fstat(fd).st_size == size:
            return False
        self.truncate(fd, size)
        return True

    def reader(self, fd: int, size: int) -> BinaryIO:
        """A readable stream of the first ``size`` bytes (the caller keeps ``fd`` open).
        The file may be longer: a kill -9 between a write's pwrite and the commit of the
        node's new size leaves bytes the index never recorded, and they must not be sent."""
        return _PlainReader(fd, size)  # type: ignore[return-value]


class SealedContent(PlainContent):
    encrypted = True

    def pread_cached(self, fd: int, size: int, offset: int) -> bytes:
        return self.pread(fd, size, offset)  # decrypted here; blocks alike

    def pread_into(self, fd: int, view: memoryview, offset: int) -> int:
        data = self.pread(fd, len(view), offset)
        view[:len(data)] = data
        return len(data)

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(hashlib.sha256(b"content" + key).digest())

    def _read_block(self, fd: int, index: int) -> bytearray:
        slot = os.pread(fd, SLOT, index * SLOT)
        length = _LEN.unpack_from(slot)[0] if len(slot) >= HEAD else 0
        if length == 0:
            return bytearray()  # a hole: never written
        if length > BLOCK or len(slot) < HEAD + length:
            raise OSError(5, "cache content is damaged (a block is cut short)")
        try:
            return bytearray(self._aead.decrypt(slot[4:16], slot[16:HEAD + length],
                                                _BLOCK_AAD.pack(index)))
        except InvalidTag:
            raise OSError(5, "cache content does not decrypt (corrupted or wrong key)") from None

    def _write_block(self, fd: int, index: int, plain: bytes | bytearray) -> None:
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(nonce, bytes(plain), _BLOCK_AAD.pack(index))
        super().pwrite(fd, _LEN.pack(len(plain)) + nonce + sealed, index * SLOT)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        out = bytearray()
        end = offset + size
        pos = offset
        while pos < end:
            index, within = divmod(pos, BLOCK)
            block = self._read_block(fd, index)
            want = min(BLOCK - within, end - pos)
            piece = block[within:within + want]
            piece += bytes(want - len(piece))  # holes read as zeros; the caller bounds size
            out += piece
            pos += want
        return bytes(out)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        pos = 0
        while pos < len(data):
            index, within = divmod(offset + pos, BLOCK)
            take = min(BLOCK - within, len(data) - pos)
            if within == 0 and take == BLOCK:
                block = bytearray(data[pos:pos + take])
            else:
                block = self._read_block(fd, index)
                if len(block) < within + take:
                    block += bytes(within + take - len(block))
                block[within:within + take] = data[pos:pos + take]
            self._write_block(fd, index, block)
            pos += take
        return len(data)

    def truncate(self, fd: int, size: int) -> None:
        index, within = divmod(size, BLOCK)
        if within:
            block = self._read_block(fd, index)
            if block:
                self._write_block(fd, index, block[:within] + bytes(max(0, within - len(block))))
                os.ftruncate(fd, index * SLOT + HEAD + within)
            else:
                os.ftruncate(fd, index * SLOT)  # the last block is a hole: nothing stored
        else:
            os.ftruncate(fd, index * SLOT)

    def reader(self, fd: int, size: int) -> BinaryIO:
        return cast(BinaryIO, _SealedReader(self, fd, size))  # (a raw binary stream)

    def length(self, fd: int) -> int:
        # The last slot on disk holds the last block: its header tells its plain length.
        end = os.fstat(fd).st_size
        if not end:
            return 0
        index = (end - 1) // SLOT
        head = os.pread(fd, _LEN.size, index * SLOT)
        return index * BLOCK + (_LEN.unpack_from(head)[0] if len(head) == _LEN.size else 0)

    def fit(self, fd: int, size: int) -> bool:
        # The last slot's length on disk is HEAD + its plain length, so the file's length
        # says whether it ends where ``size`` does (the last block written, or a hole).
        index, within = divmod(size, BLOCK)
        if os.fstat(fd).st_size in (index * SLOT, index * SLOT + HEAD + within if within else -1):
            return False
        self.truncate(fd, size)
        return True


def _pread_fill(fd: int, view: memoryview, offset: int) -> int:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if not got:
            break
        done += got
    return done


class _PlainReader(io.RawIOBase):
    def __init__(self, fd: int, size: int) -> None:
        self._fd, self._size, self._pos = fd, size, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Buffer) -> int:
        """Fills ``buffer`` up to the size, short only at the file's end (callers such as
        ``remote_side._content_sha256`` read once, and one preadv stops at 2 GiB)."""
        done = _pread_fill(self._fd, memoryview(buffer)[:max(0, self._size - self._pos)], self._pos)
        self._pos += done
        return done


class _SealedReader(io.RawIOBase):
    def __init__(self, content: SealedContent, fd: int, size: int) -> None:
        self._content, self._fd, self._size, self._pos = content, fd, size, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._size - self._pos
        n = min(n, self._size - self._pos)
        if n <= 0:
            return b""
        data = self._content.pread(self._fd, n, self._pos)
        self._pos += len(data)
        return data

    def readinto(self, buffer: Buffer) -> int:
        view = memoryview(buffer)
        data = self.read(len(view))
        view[:len(data)] = data
        return len(data)


# -- the key ------------------------------------------------------------------------------------
def _derive(secret: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(secret)


def open_key(cache_dir: Path, secret: bytes | None) -> bytes | None:
    """The cache key, created on first use and checked afterwards.

    ``secret`` is the passphrase or key-file content, or None for a plain cache. Raises
    ``CryptoError`` for a wrong secret, or a mismatch between the cache and the request.
    """
    meta = cache_dir / "crypt.json"
    has_index = (cache_dir / "index" / "data.mdb").exists()
    if secret is None:
        if meta.exists():
            raise CryptoError(f"the cache in {cache_dir} is encrypted: mount with --encrypt-cache "
                            "(and --cache-key-file FILE or CACHEFS_CACHE_PASSPHRASE)")
        return None
    if not meta.exists():
        if has_index:
            raise CryptoError(f"the cache in {cache_dir} is not encrypted: use another --cache-dir "
                            "for an encrypted cache")
        salt = os.urandom(16)
        params = {"n": 1 << 15, "r": 8, "p": 1}
        key = _derive(secret, salt, **params)
        check = SealedCodec(key).seal(_CHECK)
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(meta, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "kdf": "scrypt", "salt": salt.hex(), **params,
                       "cipher": "AES-256-GCM", "check": check.hex()}, f)
        return key
    try:
        info = json.loads(meta.read_text())
        key = _derive(secret, bytes.fromhex(info["salt"]), info["n"], info["r"], info["p"])
        if SealedCodec(key).open(bytes.fromhex(info["check"])) != _CHECK:
            raise CryptoError("wrong key")
    except (CryptoError, RecordError):
        raise CryptoError(f"wrong key for the encrypted cache in {cache_dir}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CryptoError(f"{meta} is damaged ({exc}); the cache cannot be opened") from exc
    return key
