"""The native dump file: one self-describing, checksummed file per table, streamed.

Layout (all integers little-endian; docs/FORMAT.md "Dump files" has the long form)::

    preamble   8s magic b"LEMBDUMP" | u32 format version | u32 header length H
    header     H bytes of msgpack (the TableLayout record + where it came from)
               u64 xxh3-64 of preamble + header
    id blocks  for each chunk c: n_c int64 IDs | u64 xxh3-64 of those bytes, seed c
    records    for each chunk c: the n_c rows of every column, column after column
               | u64 xxh3-64 of the record's row bytes, seed c
    trailer    8s b"LEMBEND\\0" | u64 chunks | u64 rows | u64 xxh3-64 of every byte before this field

Every size follows from the header, so the reader knows the exact file size before
reading a row: truncation, trailing garbage and any flipped byte are all detected, and
each error names the part and the byte offset where it is. Memory is one chunk.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import msgpack
import numpy as np
import xxhash

from ..errors import DumpFileError, EmbeddingStoreError
from .layout import ID_DTYPE, TableLayout

MAGIC = b"LEMBDUMP"
TRAILER_MAGIC = b"LEMBEND\0"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<8sII")
_U64 = struct.Struct("<Q")
_TRAILER = struct.Struct("<8sQQQ")
_MAX_HEADER = 64 << 20


class _Offsets:
    """Where each part of a dump file starts, computed from its header alone."""

    def __init__(self, layout: TableLayout, header_len: int):
        self.layout = layout
        self.ids_start = _PREAMBLE.size + header_len + _U64.size
        cr, n = layout.chunk_rows, layout.n_chunks
        full_ids = cr * ID_DTYPE.itemsize + _U64.size
        full_record = cr * layout.row_bytes + _U64.size
        self._full_ids, self._full_record = full_ids, full_record
        self.records_start = self.ids_start + layout.rows * ID_DTYPE.itemsize + n * _U64.size
        self.trailer_start = self.records_start + layout.rows * layout.row_bytes + n * _U64.size
        self.total = self.trailer_start + _TRAILER.size

    def ids_block(self, chunk: int) -> int:
        return self.ids_start + chunk * self._full_ids

    def record(self, chunk: int) -> int:
        return self.records_start + chunk * self._full_record

    def part_at(self, offset: int) -> str:
        """Name the part of the file that contains byte ``offset``."""
        if offset < self.ids_start:
            return "the header"
        if offset < self.records_start:
            return f"id block {(offset - self.ids_start) // self._full_ids}"
        if offset < self.trailer_start:
            return f"chunk {(offset - self.records_start) // self._full_record}"
        return "the trailer"


def _header_bytes(layout: TableLayout, source: dict) -> bytes:
    summary = {"dim": layout.dim, "dtype": layout.dtype.name, "rows": layout.rows, "chunk_rows": layout.chunk_rows,
               "chunks": layout.n_chunks, "ids": {"dtype": ID_DTYPE.str, "layout": "blocks after the header"}}
    return msgpack.packb({**summary, "table": layout.to_record(), "source": source})


class DumpWriter:
    """Writes a dump to an open binary file, chunk by chunk, in order."""

    def __init__(self, fileobj, layout: TableLayout, source: dict):
        self._f, self.layout = fileobj, layout
        self._hash = xxhash.xxh3_64()
        self.bytes_written = 0
        header = _header_bytes(layout, source)
        head = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header)) + header
        self._write(head + _U64.pack(xxhash.xxh3_64_intdigest(head)))
        self._next_ids = self._next_chunk = 0

    def _write(self, data) -> None:
        self._f.write(data)
        self._hash.update(data)
        self.bytes_written += len(data)  # bytes, or a memoryview cast to bytes

    def add_ids(self, chunk: int, ids: np.ndarray) -> None:
        if chunk != self._next_ids or len(ids) != self.layout.chunk_len(chunk):
            raise EmbeddingStoreError(f"dump writer: id block {chunk} out of order or of the wrong length")
        data = memoryview(np.ascontiguousarray(ids, ID_DTYPE)).cast("B")
        self._write(data)
        self._write(_U64.pack(xxhash.xxh3_64_intdigest(data, seed=chunk)))
        self._next_ids += 1

    def add_chunk(self, chunk: int, parts: list[np.ndarray]) -> None:
        """Write chunk ``chunk``: one (n_c, width) array per column, in the layout's column order."""
        n = self.layout.chunk_len(chunk)
        if chunk != self._next_chunk or self._next_ids != self.layout.n_chunks:
            raise EmbeddingStoreError(f"dump writer: chunk {chunk} written out of order")
        digest = xxhash.xxh3_64(seed=chunk)
        for column, part in zip(self.layout.columns, parts, strict=True):
            if part.shape != (n, column.width) or part.dtype != column.dtype:
                raise EmbeddingStoreError(f"dump writer: chunk {chunk} of column {column.name!r} has shape "
                                          f"{part.shape} {part.dtype}, expected ({n}, {column.width}) {column.dtype}")
            data = memoryview(np.ascontiguousarray(part)).cast("B")
            self._write(data)
            digest.update(data)
        self._write(_U64.pack(digest.intdigest()))
        self._next_chunk += 1

    def finish(self) -> None:
        if self._next_chunk != self.layout.n_chunks:
            raise EmbeddingStoreError(f"dump writer: {self._next_chunk} of {self.layout.n_chunks} chunks written")
        head = TRAILER_MAGIC + _U64.pack(self.layout.n_chunks) + _U64.pack(self.layout.rows)
        self._write(head)
        self._f.write(_U64.pack(self._hash.intdigest()))
        self.bytes_written += _U64.size

    def close(self) -> None:
        """Nothing to release: the caller owns the file (and removes an unfinished one)."""


class DumpReader:
    """Reads and checks a dump file; every problem raises ``DumpFileError`` (one line).

    ``stream``: read from this binary stream instead (standard input: no seeking, no size
    known up front; a truncated stream fails where it ends, extra bytes after the trailer fail
    at the end); ``path`` then only names it in messages.
    """

    def __init__(self, path: str, stream=None):
        self.path = os.fspath(path)
        self._owned = stream is None
        self._f = open(self.path, "rb") if stream is None else stream  # noqa: SIM115 - closed by close()
        try:
            self.size = os.fstat(self._f.fileno()).st_size if stream is None else None
            self._hash = xxhash.xxh3_64()
            self._pos = 0
            self._read_head()
        except BaseException:
            self.close()
            raise

    def _fail(self, message: str):
        raise DumpFileError(f"{self.path}: {message}")

    def _read(self, n: int, what: str) -> bytes:
        data = self._f.read(n)
        if len(data) != n:
            self._fail(f"truncated: {what} at byte {self._pos} needs {n} bytes, the file ends at byte "
                       f"{self._pos + len(data)}")
        self._hash.update(data)
        self._pos += n
        return data

    def _read_into(self, buf: memoryview, what: str) -> None:
        got = self._f.readinto(buf)
        if got != len(buf):
            self._fail(f"truncated: {what} at byte {self._pos} needs {len(buf)} bytes, the file ends at byte "
                       f"{self._pos + (got or 0)}")
        self._hash.update(buf)
        self._pos += len(buf)

    def _read_head(self) -> None:
        if self.size is not None and self.size < _PREAMBLE.size:
            self._fail(f"not an lmdb_embeddings dump: only {self.size} bytes (truncated or empty)")
        preamble = self._read(_PREAMBLE.size, "the preamble")
        magic, version, header_len = _PREAMBLE.unpack(preamble)
        if magic != MAGIC:
            self._fail(f"not an lmdb_embeddings dump (bad magic {magic!r} at byte 0, expected {MAGIC!r})")
        if version > FORMAT_VERSION or version < 1:
            self._fail(f"dump format version {version} is not readable by this tool (it reads versions 1 to "
                       f"{FORMAT_VERSION}): upgrade lmdb_embeddings" if version > FORMAT_VERSION else
                       f"invalid dump format version {version} at byte 8")
        if header_len > _MAX_HEADER or (self.size is not None and _PREAMBLE.size + header_len + _U64.size > self.size):
            self._fail(f"truncated or damaged: the header claims {header_len} bytes but the file holds "
                       f"{self.size} bytes")
        header = self._read(header_len, "the header")
        (stored,) = _U64.unpack(self._read(_U64.size, "the header checksum"))
        if xxhash.xxh3_64_intdigest(preamble + header) != stored:
            self._fail(f"header checksum mismatch (bytes 0 to {_PREAMBLE.size + header_len})")
        try:
            record = msgpack.unpackb(header)
            self.source = dict(record.get("source") or {})
            table = record["table"]
        except Exception as exc:
            self._fail(f"the header is not valid ({type(exc).__name__}: {exc})")
        self.layout = TableLayout.from_record(table, DumpFileError, self.path)
        summary = (record.get("dim"), record.get("dtype"), record.get("rows"), record.get("chunk_rows"))
        if summary != (self.layout.dim, self.layout.dtype.name, self.layout.rows, self.layout.chunk_rows):
            self._fail(f"the header contradicts itself: dim/dtype/rows/chunk_rows {summary} vs its table record")
        self.offsets = _Offsets(self.layout, header_len)
        if self.size is not None and self.size != self.offsets.total:
            if self.size < self.offsets.total:
                self._fail(f"truncated: the header describes {self.offsets.total} bytes but the file ends at "
                           f"byte {self.size}, inside {self.offsets.part_at(self.size)}")
            self._fail(f"{self.size - self.offsets.total} unexpected bytes after the trailer (at byte "
                       f"{self.offsets.total}); the file was appended to or damaged")

    def id_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (chunk, IDs); the array is reused: copy what you keep. Read these first."""
        layout = self.layout
        buf = np.empty(layout.chunk_rows, ID_DTYPE)
        for chunk in range(layout.n_chunks):
            start = self._pos
            ids = buf[: layout.chunk_len(chunk)]
            self._read_into(memoryview(ids).cast("B"), f"id block {chunk}")
            (stored,) = _U64.unpack(self._read(_U64.size, f"the checksum of id block {chunk}"))
            if xxhash.xxh3_64_intdigest(ids, seed=chunk) != stored:
                self._fail(f"id block {chunk} checksum mismatch at byte {start}")
            yield chunk, ids

    def chunks(self) -> Iterator[tuple[int, list[np.ndarray]]]:
        """Yield (chunk, one array per column); arrays are reused: copy what you keep."""
        layout = self.layout
        buf = np.empty(layout.chunk_rows * layout.row_bytes, np.uint8)
        for chunk in range(layout.n_chunks):
            start = self._pos
            n = layout.chunk_len(chunk)
            record = buf[: n * layout.row_bytes]
            self._read_into(memoryview(record), f"chunk {chunk}")
            (stored,) = _U64.unpack(self._read(_U64.size, f"the checksum of chunk {chunk}"))
            if xxhash.xxh3_64_intdigest(record, seed=chunk) != stored:
                self._fail(f"chunk {chunk} checksum mismatch at byte {start}")
            parts, at = [], 0
            for column in layout.columns:
                size = n * column.row_bytes
                parts.append(record[at : at + size].view(column.dtype).reshape(n, column.width))
                at += size
            yield chunk, parts
        self._check_trailer()

    def _check_trailer(self) -> None:
        start = self._pos
        data = self._f.read(_TRAILER.size)
        if len(data) != _TRAILER.size:
            self._fail(f"truncated: the trailer at byte {start} needs {_TRAILER.size} bytes, the file ends at "
                       f"byte {start + len(data)}")
        magic, chunks, rows, stored = _TRAILER.unpack(data)
        self._hash.update(data[: _TRAILER.size - _U64.size])
        if magic != TRAILER_MAGIC:
            self._fail(f"the trailer at byte {start} is damaged (bad magic {magic!r})")
        if (chunks, rows) != (self.layout.n_chunks, self.layout.rows):
            self._fail(f"the trailer at byte {start} counts {chunks} chunks / {rows} rows, the header "
                       f"{self.layout.n_chunks} / {self.layout.rows}")
        if self._hash.intdigest() != stored:
            self._fail(f"whole-file checksum mismatch (trailer at byte {start}): the file is damaged")
        if self.size is None and self._f.read(1):  # a stream: nothing may follow the trailer
            self._fail(f"unexpected bytes after the trailer (at byte {self._pos + _TRAILER.size}); the stream "
                       "holds more than one dump or was damaged")

    def close(self) -> None:
        if self._owned:
            self._f.close()

    def __enter__(self) -> DumpReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
