"""Chunk values: how one chunk of rows is laid out as one LMDB value.

A chunk value is the msgpack array ``[n_rows, version, checksum, payload]`` where
``payload`` is a msgpack *bin* holding the rows' raw little-endian bytes, ``version`` is
the commit number that wrote the chunk (readers use it to revalidate their caches
without decoding), and ``checksum`` is xxh3-64 of the payload seeded with the chunk
index (so a value copied under the wrong key fails too). The payload sits at the end of
the value, so decoding is a header parse plus a zero-copy view; see docs/FORMAT.md.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import msgpack
import numpy as np
import xxhash

from ..errors import CorruptionError
from .records import MAX_COMMIT

_KEY = struct.Struct(">Q")
ID_DTYPE = np.dtype("<i8")
#: The longest header :func:`encode_chunk` writes: fixarray + uint32 rows + uint64 version + uint64 checksum + bin32.
MAX_HEADER_BYTES = 1 + 5 + 9 + 9 + 5
#: Where :class:`ChunkEncoder` keeps a chunk's payload in its buffer: room for the longest header before it,
#: the rows after it as aligned as the buffer's start (malloc's 16 bytes).
PAYLOAD_OFFSET = 32


def chunk_key(index: int) -> bytes:
    """Big-endian fixed-width key, so LMDB's byte order is numeric order."""
    return _KEY.pack(index)


def key_index(key: bytes) -> int:
    return _KEY.unpack(bytes(key))[0]


def checksum(payload, index: int) -> int:
    return xxhash.xxh3_64_intdigest(payload, seed=index)


def _header(payload: memoryview, n_rows: int, index: int, version: int) -> bytes:
    """msgpack ``[n_rows, version, checksum, <bin header>`` for ``payload`` (the bytes that precede it)."""
    size = payload.nbytes
    if size < 0x100:
        bin_header = b"\xc4" + size.to_bytes(1, "big")
    elif size < 0x10000:
        bin_header = b"\xc5" + size.to_bytes(2, "big")
    else:
        bin_header = b"\xc6" + size.to_bytes(4, "big")
    return (b"\x94" + msgpack.packb(int(n_rows)) + msgpack.packb(int(version))
            + msgpack.packb(checksum(payload, index)) + bin_header)


def _payload(rows: np.ndarray) -> memoryview:
    # a flat uint8 view: zero-copy, and unlike memoryview.cast it accepts 0-row chunks
    return memoryview(np.ascontiguousarray(rows).reshape(-1).view(np.uint8))


def encode_chunk(rows: np.ndarray, index: int, version: int) -> bytes:
    """Serialize a 2-D little-endian C-contiguous array as one chunk value.

    Byte-identical to ``msgpack.packb([n_rows, version, checksum, payload])``, but the
    small header is packed apart and joined to the payload in ONE copy (packb copies the
    payload into its growing buffer, then again into the result).
    """
    payload = _payload(rows)
    return b"".join((_header(payload, rows.shape[0], index, version), payload))


class ChunkEncoder:
    """Encodes chunk values into ONE reused buffer: the bytes :func:`encode_chunk` gives, without a fresh
    allocation per chunk (a new 512 KB ``bytes`` costs a page fault per 4 KiB; measured 10x the copy).

    The payload always sits at :data:`PAYLOAD_OFFSET` of the buffer, the header just before it. A caller
    that assembles a chunk's rows anyway can assemble them there (:meth:`staging`): encoding them then
    skips the copy. The returned view is valid until the next :meth:`encode`: hand it to LMDB (which
    copies it) at once.
    """

    def __init__(self) -> None:
        self._buffer = bytearray(0)

    def staging(self, n_rows: int, width: int, dtype: np.dtype) -> np.ndarray:
        """An ``(n_rows, width)`` array at the payload's place: :meth:`encode` of it copies no row (valid until
        the next ``staging`` or ``encode``)."""
        dtype = np.dtype(dtype)
        self._reserve(n_rows * width * dtype.itemsize)
        return np.frombuffer(self._buffer, dtype, n_rows * width, PAYLOAD_OFFSET).reshape(n_rows, width)

    def encode(self, rows: np.ndarray, index: int, version: int) -> memoryview:
        payload = _payload(rows)
        head = _header(payload, rows.shape[0], index, version)
        end = PAYLOAD_OFFSET + payload.nbytes
        if not self._is_staged(rows):
            self._reserve(payload.nbytes)
            memoryview(self._buffer)[PAYLOAD_OFFSET:end] = payload
        view = memoryview(self._buffer)
        start = PAYLOAD_OFFSET - len(head)
        view[start:PAYLOAD_OFFSET] = head
        return view[start:end]

    def _reserve(self, payload_bytes: int) -> None:
        if len(self._buffer) < PAYLOAD_OFFSET + payload_bytes:
            self._buffer = bytearray(PAYLOAD_OFFSET + payload_bytes)

    def _is_staged(self, rows: np.ndarray) -> bool:
        """Whether ``rows`` is a :meth:`staging` array of this buffer (its bytes already at the payload's place)."""
        if not len(self._buffer) or not rows.flags.c_contiguous:
            return False
        place = np.frombuffer(self._buffer, np.uint8, 1, PAYLOAD_OFFSET).__array_interface__["data"][0]
        return rows.__array_interface__["data"][0] == place and PAYLOAD_OFFSET + rows.nbytes <= len(self._buffer)


class ChunkHeader(NamedTuple):
    n_rows: int
    version: int
    checksum: int
    payload_offset: int
    payload_len: int


_UINT = {0xCC: struct.Struct(">B"), 0xCD: struct.Struct(">H"), 0xCE: struct.Struct(">I"), 0xCF: struct.Struct(">Q")}
_BIN = {0xC4: struct.Struct(">B"), 0xC5: struct.Struct(">H"), 0xC6: struct.Struct(">I")}


def _fast_header(value) -> ChunkHeader | None:
    """The header as :func:`encode_chunk` writes it (unsigned ints), parsed with ``struct``; None if
    it is laid out any other way (the general msgpack parse then decides)."""
    head = bytes(value[:40])
    if not head or head[0] != 0x94:
        return None
    pos, fields = 1, []
    for _ in range(3):
        marker = head[pos] if pos < len(head) else None
        if marker is None:
            return None
        if marker < 0x80:
            fields.append(marker)
            pos += 1
            continue
        fmt = _UINT.get(marker)
        if fmt is None or pos + 1 + fmt.size > len(head):
            return None
        fields.append(fmt.unpack_from(head, pos + 1)[0])
        pos += 1 + fmt.size
    fmt = _BIN.get(head[pos]) if pos < len(head) else None
    if fmt is None or pos + 1 + fmt.size > len(head):
        return None
    length = fmt.unpack_from(head, pos + 1)[0]
    start = pos + 1 + fmt.size
    if start + length != len(value):
        return None
    return ChunkHeader(fields[0], fields[1], fields[2], start, length)


def read_header(value, index: int, where: str = "") -> ChunkHeader:
    """Parse the small header of a chunk value without touching the payload."""
    fast = _fast_header(value)
    if fast is not None:
        if fast.version > MAX_COMMIT:
            raise CorruptionError(f"chunk {index}{where}: malformed value (version {fast.version})")
        return fast
    try:
        unpacker = msgpack.Unpacker()
        unpacker.feed(bytes(value[:40]))
        if unpacker.read_array_header() != 4:
            raise ValueError("not a 4-element array")
        n_rows, version, crc = unpacker.unpack(), unpacker.unpack(), unpacker.unpack()
        if not all(isinstance(x, int) for x in (n_rows, version, crc)):
            raise ValueError("header fields are not integers")
        if not 0 <= version <= MAX_COMMIT or n_rows < 0:
            raise ValueError(f"version {version}, {n_rows} rows")
        offset = unpacker.tell()
        marker = value[offset]
        width = {0xC4: 1, 0xC5: 2, 0xC6: 4}.get(marker)
        if width is None:
            raise ValueError("payload is not a msgpack bin")
        length = int.from_bytes(bytes(value[offset + 1 : offset + 1 + width]), "big")
        start = offset + 1 + width
        if start + length != len(value):
            raise ValueError(f"payload length {length} does not match value size {len(value)}")
    except (ValueError, IndexError, msgpack.OutOfData, msgpack.FormatError, msgpack.StackError) as exc:
        raise CorruptionError(f"chunk {index}{where}: malformed value ({exc})") from None
    return ChunkHeader(n_rows, version, crc, start, length)


def checked_payload(value, index: int, row_bytes: int, where: str = "", trusted_version: int | None = None):
    """(header, payload view) of a chunk value whose payload length and checksum are right.

    ``trusted_version``: the version of this chunk whose checksum the caller already verified in a
    committed snapshot; a value carrying it is not hashed again (a version is written once).
    """
    header = read_header(value, index, where)
    if header.n_rows * row_bytes != header.payload_len:
        raise CorruptionError(
            f"chunk {index}{where}: {header.payload_len} payload bytes for {header.n_rows} rows "
            f"of {row_bytes} bytes"
        )
    payload = memoryview(value)[header.payload_offset :]
    if header.version != trusted_version and checksum(payload, index) != header.checksum:
        raise CorruptionError(f"chunk {index}{where}: checksum mismatch (stored data is corrupt)")
    return header, payload


def decode_chunk(value, index: int, width: int, dtype: np.dtype, where: str = "", trusted_version: int | None = None):
    """Check a chunk value and return (header, read-only row view into ``value``).

    The view borrows ``value``'s memory: copy it before the LMDB transaction ends.
    """
    header, payload = checked_payload(value, index, width * dtype.itemsize, where, trusted_version)
    rows = np.frombuffer(payload, dtype=dtype).reshape(header.n_rows, width)
    return header, rows


def read_chunk(txn, db, index: int, width: int, dtype: np.dtype, where: str = "", trusted_version: int | None = None):
    """The checked ``(header, row view)`` of chunk ``index`` in ``db`` as of ``txn``, or None if never written.

    The one reader of chunk values: the store's caches, the snapshot and ``verify`` all
    come through here. The view borrows LMDB's memory: copy it before ``txn`` ends.
    """
    value = txn.get(chunk_key(index), db=db) if db is not None else None
    if value is None:
        return None
    return decode_chunk(value, index, width, dtype, where, trusted_version)


def read_id_chunk(txn, ids_db, index: int, n_rows: int, path: str) -> np.ndarray:
    """The ``n_rows`` sample IDs of chunk ``index`` (a view into the map, valid while ``txn`` is open)."""
    found = read_chunk(txn, ids_db, index, 1, ID_DTYPE, " (ids)")
    if found is None:
        raise CorruptionError(f"{path}: id chunk {index} is missing")
    rows = found[1]
    if len(rows) != n_rows:
        raise CorruptionError(f"{path}: id chunk {index} holds {len(rows)} ids, expected {n_rows}")
    return rows[:, 0]
