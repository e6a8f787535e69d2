"""A table as a directory of .npy files that plain numpy loads.

``ids.npy`` (int64, (rows,)) and ``embeddings.npy`` ((rows, dim), store dtype) are all a
numpy user needs. Auxiliary columns go to ``column-<i>.npy`` and ``table.json`` records
the chunking, the column names and the metadata (exactly, as base64 msgpack), so a
restore from the directory gives back the same store. A directory with only the two
plain files restores too (defaults for the rest).

Files are written and read through numpy's own .npy header functions, with the data
streamed chunk by chunk (no memory map, no whole array in memory).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil

import msgpack
import numpy as np
import xxhash

from ..errors import EmbeddingStoreError, NpyInputError
from ..fsutil import fsync_dir, remove_stale_temps, sibling_temp
from ..inputs import as_dtype
from .layout import ID_DTYPE, ColumnSpec, TableLayout, choose_chunk_rows
from .records import MAIN

IDS_FILE, EMBEDDINGS_FILE, TABLE_FILE = "ids.npy", "embeddings.npy", "table.json"
NPY_FORMAT = "lmdb_embeddings-npy"
NPY_FORMAT_VERSION = 1


def column_file(index: int) -> str:
    return EMBEDDINGS_FILE if index == 0 else f"column-{index}.npy"


class NpyStreamWriter:
    """Writes one .npy file: numpy's header, then rows appended in order."""

    def __init__(self, path: str, dtype: np.dtype, shape: tuple):
        self.path, self.dtype, self.shape = path, np.dtype(dtype), shape
        self._f = open(path, "wb")  # noqa: SIM115 - closed by finish()/close()
        self.hash = xxhash.xxh3_64()
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        head = io.BytesIO()
        np.lib.format.write_array_header_1_0(head, header)
        self._write(head.getvalue())
        self._rows = 0

    def _write(self, data) -> None:
        self._f.write(data)
        self.hash.update(data)

    def write(self, rows: np.ndarray) -> None:
        self._write(memoryview(np.ascontiguousarray(rows, self.dtype)).cast("B"))
        self._rows += len(rows)

    def finish(self) -> None:
        if self._rows != self.shape[0]:
            raise EmbeddingStoreError(f"{self.path}: {self._rows} rows written, {self.shape[0]} expected")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def close(self) -> None:
        self._f.close()


class NpyStreamReader:
    """Reads one .npy file's rows in order, checking the header against the file size."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise NpyInputError(f"{path} is missing")
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close()
        try:
            self._read_header()
        except BaseException:
            self._f.close()
            raise

    def _read_header(self) -> None:
        try:
            version = np.lib.format.read_magic(self._f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(self._f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(self._f)
            else:
                raise ValueError(f"unsupported .npy version {version[0]}.{version[1]}")
        except (ValueError, OSError, SyntaxError, TypeError) as exc:
            raise NpyInputError(f"{self.path} is not a readable .npy file ({exc})") from None
        if fortran and len(shape) > 1:
            raise NpyInputError(f"{self.path} is stored in Fortran order; save it C-ordered (np.ascontiguousarray)")
        if dtype.hasobject or dtype.fields is not None:
            raise NpyInputError(f"{self.path} holds {dtype} values; a plain numeric array is needed")
        self.shape, self.dtype = tuple(shape), dtype
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize if len(shape) > 1 else dtype.itemsize
        self.offset = self._f.tell()
        self.hash = xxhash.xxh3_64(os.pread(self._f.fileno(), self.offset, 0))
        expected = self.offset + (shape[0] if shape else 1) * self.row_bytes
        size = os.fstat(self._f.fileno()).st_size
        if size != expected:
            state = "truncated" if size < expected else "longer than its header says"
            raise NpyInputError(f"{self.path} is {state}: its header describes {expected} bytes "
                                f"({shape} {dtype}), the file holds {size}")

    def read(self, n: int) -> np.ndarray:
        """The next ``n`` rows (a fresh array)."""
        out = np.empty((n, *self.shape[1:]), self.dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8)) if out.size else memoryview(b"")
        got = self._f.readinto(buf) if out.size else 0
        if got != len(buf):
            raise NpyInputError(f"{self.path} is truncated (it shrank while being read)")
        self.hash.update(buf)
        return out

    def close(self) -> None:
        self._f.close()


class NpyTableWriter:
    """Writes a table into directory ``out`` as .npy files + table.json (a table sink).

    Every file is written under a hidden temporary name and renamed into place by
    :meth:`finish`, so an interrupted dump never leaves a mix of old and new files;
    :meth:`close` of an unfinished writer removes what it wrote (and ``out``, if it made it).
    """

    def __init__(self, out: str, layout: TableLayout, source: dict):
        self.out, self.layout, self.source = out, layout, source
        self._created = not os.path.exists(out)
        os.makedirs(out, exist_ok=True)
        self._names = [IDS_FILE] + [column_file(i) for i in range(len(layout.columns))]
        for name in [*self._names, TABLE_FILE]:
            remove_stale_temps(os.path.join(out, name), "dumping")
        self._tmps = {name: sibling_temp(os.path.join(out, name), "dumping") for name in [*self._names, TABLE_FILE]}
        self._writers = [NpyStreamWriter(self._tmps[IDS_FILE], ID_DTYPE, (layout.rows,))]
        self._writers += [NpyStreamWriter(self._tmps[column_file(i)], c.dtype, (layout.rows, c.width))
                          for i, c in enumerate(layout.columns)]
        self._done = False

    def add_ids(self, chunk: int, ids: np.ndarray) -> None:
        self._writers[0].write(ids)

    def add_chunk(self, chunk: int, parts: list[np.ndarray]) -> None:
        for writer, part in zip(self._writers[1:], parts, strict=True):
            writer.write(part)

    def finish(self) -> None:
        for writer in self._writers:
            writer.finish()
        checksums = {name: w.hash.hexdigest() for name, w in zip(self._names, self._writers, strict=True)}
        with open(self._tmps[TABLE_FILE], "w") as f:
            f.write(write_table_json(self.layout, self.source, checksums))
            f.flush()
            os.fsync(f.fileno())
        for name, tmp in self._tmps.items():
            os.replace(tmp, os.path.join(self.out, name))
        fsync_dir(self.out)
        self._done = True

    @property
    def bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.out, name)) for name in self._tmps)

    def close(self) -> None:
        if self._done:
            return
        for writer in self._writers:
            writer.close()
        for tmp in self._tmps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
        if self._created:
            shutil.rmtree(self.out, ignore_errors=True)


def write_table_json(layout: TableLayout, source: dict, checksums: dict[str, str]) -> str:
    """table.json: readable fields, the exact table record, and each file's xxh3-64."""
    table = msgpack.packb(layout.to_record())
    record = {
        "format": NPY_FORMAT, "version": NPY_FORMAT_VERSION, "rows": layout.rows, "dim": layout.dim,
        "dtype": layout.dtype.name, "chunk_rows": layout.chunk_rows,
        "columns": [{"name": c.name, "file": column_file(i), **c.describe()} for i, c in enumerate(layout.columns)],
        "source": source,
        "table_msgpack_b64": base64.b64encode(table).decode(), "table_xxh3_64": xxhash.xxh3_64_hexdigest(table),
        "files_xxh3_64": checksums,
    }
    return json.dumps(record, indent=1, default=str)


def read_layout(directory: str, chunk_rows: int | None) -> tuple[TableLayout, dict[str, str]]:
    """The table layout of an .npy directory (``table.json`` if present, else the two files).

    Returns the layout and the files' expected xxh3-64 (empty without ``table.json``).
    ``chunk_rows`` overrides the chunking (plain directories default to ``choose_chunk_rows``, as ``create``).
    """
    ids = NpyStreamReader(os.path.join(directory, IDS_FILE))
    emb = NpyStreamReader(os.path.join(directory, EMBEDDINGS_FILE))
    ids.close()
    emb.close()
    if len(ids.shape) != 1 or ids.dtype.kind not in "iu":
        raise NpyInputError(f"{ids.path} must hold a 1-D integer array, found {ids.shape} {ids.dtype}")
    if len(emb.shape) != 2 or emb.shape[1] < 1:
        raise NpyInputError(f"{emb.path} must hold a 2-D (rows, dim) array, found shape {emb.shape}")
    if emb.shape[0] != ids.shape[0]:
        raise NpyInputError(f"{directory}: {ids.shape[0]} ids but {emb.shape[0]} embedding rows")
    try:
        dtype = as_dtype(emb.dtype)
    except EmbeddingStoreError as exc:
        raise NpyInputError(f"{emb.path}: {exc}") from None
    table_path = os.path.join(directory, TABLE_FILE)
    checksums = {}
    if os.path.exists(table_path):
        layout, checksums = _layout_from_json(table_path)
        if layout.rows != ids.shape[0] or layout.dim != emb.shape[1] or layout.dtype != dtype:
            raise NpyInputError(f"{table_path} describes {layout.rows} x {layout.dim} {layout.dtype}, but "
                                f"{EMBEDDINGS_FILE} holds {emb.shape} {dtype}")
        if chunk_rows is not None and chunk_rows != layout.chunk_rows:
            layout = TableLayout(chunk_rows, layout.rows, layout.columns, layout.config, layout.attrs,
                                 layout.commit, layout.committed_at)
    else:
        chunk_rows = chunk_rows or choose_chunk_rows(emb.shape[1] * dtype.itemsize)
        layout = TableLayout(chunk_rows, ids.shape[0], (ColumnSpec(MAIN, emb.shape[1], dtype),))
    layout.check(NpyInputError, directory)
    return layout, checksums


def _layout_from_json(path: str) -> tuple[TableLayout, dict[str, str]]:
    try:
        with open(path) as f:
            record = json.load(f)
        if record.get("format") != NPY_FORMAT:
            raise ValueError(f"format is {record.get('format')!r}, not {NPY_FORMAT!r}")
        if int(record.get("version", 0)) > NPY_FORMAT_VERSION:
            raise NpyInputError(f"{path} has version {record['version']}; this tool reads up to "
                                f"{NPY_FORMAT_VERSION}: upgrade lmdb_embeddings")
        packed = base64.b64decode(record["table_msgpack_b64"], validate=True)
        if xxhash.xxh3_64_hexdigest(packed) != record["table_xxh3_64"]:
            raise NpyInputError(f"{path}: table checksum mismatch (the file was changed after the dump)")
        table = msgpack.unpackb(packed)
        checksums = {str(k): str(v) for k, v in dict(record["files_xxh3_64"]).items()}
    except NpyInputError:
        raise
    except Exception as exc:
        raise NpyInputError(f"{path} is damaged ({type(exc).__name__}: {exc})") from None
    return TableLayout.from_record(table, NpyInputError, path), checksums


class NpyTableReader:
    """Streams an .npy directory chunk by chunk, in the shape the store builder wants."""

    def __init__(self, directory: str, layout: TableLayout, checksums: dict[str, str] | None = None):
        self.directory, self.layout, self.checksums = directory, layout, checksums or {}
        self._readers = []
        try:
            self._ids = self._open(IDS_FILE, (layout.rows,))
            for i, column in enumerate(layout.columns):
                reader = self._open(column_file(i), (layout.rows, column.width))
                self._readers.append(reader)
                if reader.dtype.newbyteorder("<") != column.dtype:
                    raise NpyInputError(f"{reader.path} holds {reader.dtype}, column {column.name!r} is {column.dtype}")
        except BaseException:
            self.close()
            raise

    def _open(self, name: str, shape: tuple) -> NpyStreamReader:
        reader = NpyStreamReader(os.path.join(self.directory, name))
        if reader.shape != shape:
            reader.close()
            raise NpyInputError(f"{reader.path} has shape {reader.shape}, expected {shape}")
        return reader

    def id_chunks(self):
        """Yield (chunk, int64 IDs)."""
        for chunk in range(self.layout.n_chunks):
            raw = self._ids.read(self.layout.chunk_len(chunk))
            if raw.dtype.kind == "u" and len(raw) and int(raw.max()) > np.iinfo(np.int64).max:
                raise NpyInputError(f"{self._ids.path} holds ids beyond the int64 range (chunk {chunk})")
            yield chunk, raw.astype(ID_DTYPE, copy=False)

    def chunks(self):
        """Yield (chunk, one array per column in the store's dtypes), all values finite."""
        for chunk in range(self.layout.n_chunks):
            n = self.layout.chunk_len(chunk)
            parts = []
            for column, reader in zip(self.layout.columns, self._readers, strict=True):
                part = reader.read(n)
                if part.dtype != column.dtype:
                    part = part.astype(column.dtype)
                bad = ~np.isfinite(part).all(axis=1)
                if bad.any():
                    row = chunk * self.layout.chunk_rows + int(np.flatnonzero(bad)[0])
                    raise NpyInputError(f"{reader.path}: row {row} holds NaN or inf; a store holds finite values")
                parts.append(part)
            yield chunk, parts
        self._check_checksums()

    def _check_checksums(self) -> None:
        """Files written by ``dump --format npy`` must be byte for byte what was written."""
        for reader in [self._ids, *self._readers]:
            expected = self.checksums.get(os.path.basename(reader.path))
            if expected is not None and reader.hash.hexdigest() != expected:
                raise NpyInputError(f"{reader.path}: checksum mismatch (the file was changed or damaged after the "
                                    "dump; table.json holds the checksum it had)")

    def close(self) -> None:
        for reader in [getattr(self, "_ids", None), *self._readers]:
            if reader is not None:
                reader.close()
