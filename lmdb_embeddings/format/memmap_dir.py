"""The files of CoSiR's np.memmap manager (2026-04 on) as a table source and sink.

``embeddings.npy`` holds float32 rows ``[N, D]``, ``sample_ids.npy`` the int64 id of each row
(position-indexed), ``metadata.json`` ``{"total_samples": N, "embedding_dim": D}``. They hold
the main column only, as float32, with no chunking and no metadata: the reader is told the
``chunk_rows`` of the table it makes. Both stream one chunk at a time through the .npy streams
of :mod:`.npy_dir` (the same header functions as ``np.save`` / ``open_memmap``, so the files
are byte for byte what upstream wrote).
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..errors import NpyInputError
from ..inputs import as_ids, as_values, repeated_ids
from .layout import ID_DTYPE, ColumnSpec, TableLayout
from .npy_dir import NpyStreamReader, NpyStreamWriter
from .records import MAIN

EMBEDDINGS_FILE, IDS_FILE, METADATA_FILE = "embeddings.npy", "sample_ids.npy", "metadata.json"
ROW_DTYPE = np.dtype(np.float32)  # what upstream's memmap manager kept


def has_memmap_files(directory) -> bool:
    return os.path.isfile(os.path.join(os.fspath(directory), EMBEDDINGS_FILE))


class MemmapDirReader:
    """The table in a directory of memmap files (a table source), in ``chunk_rows`` row chunks.

    Rows come as float32 (other float files are cast; overflow, NaN and inf are refused);
    the sample ids are read at open (8 bytes per row) and must be unique. :meth:`chunks`
    opens the file on each call, so a reader can be read more than once.
    """

    def __init__(self, directory, chunk_rows: int):
        self.directory = os.fspath(directory)
        self._emb_path = os.path.join(self.directory, EMBEDDINGS_FILE)
        ids_path = os.path.join(self.directory, IDS_FILE)
        if not os.path.isfile(ids_path):
            raise NpyInputError(f"{self.directory} holds {EMBEDDINGS_FILE} but no {IDS_FILE}: without it the rows "
                                "cannot be matched to sample ids")
        emb = _header(self._emb_path)
        if len(emb.shape) != 2 or emb.dtype.kind != "f":
            raise NpyInputError(f"{self._emb_path}: expected a 2-D float array, got {emb.dtype} of shape {emb.shape}")
        self._ids = _read_ids(ids_path)
        if len(self._ids) != emb.shape[0]:
            raise NpyInputError(f"{self.directory}: {IDS_FILE} has {len(self._ids)} ids but {EMBEDDINGS_FILE} "
                                f"{emb.shape[0]} rows")
        self._shape = emb.shape
        self.layout = TableLayout(chunk_rows, emb.shape[0], (ColumnSpec(MAIN, emb.shape[1], ROW_DTYPE),))
        self.layout.check(NpyInputError, self.directory)

    def id_chunks(self):
        for chunk, rows in self.layout.chunk_slices():
            yield chunk, self._ids[rows]

    def chunks(self):
        reader = NpyStreamReader(self._emb_path)
        try:
            if reader.shape != self._shape:
                raise NpyInputError(f"{self._emb_path} changed while it was being read")
            for chunk, rows in self.layout.chunk_slices():
                n = rows.stop - rows.start
                where = f"{self._emb_path} rows {rows.start}..{rows.stop}"
                yield chunk, [as_values(reader.read(n), n, self.layout.dim, ROW_DTYPE, where)]
        finally:
            reader.close()

    def close(self) -> None:
        """Nothing stays open between calls."""

    def __enter__(self) -> MemmapDirReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _header(path: str) -> NpyStreamReader:
    reader = NpyStreamReader(path)  # checks the header against the file size
    reader.close()
    return reader


def _read_ids(path: str) -> np.ndarray:
    reader = NpyStreamReader(path)
    try:
        if len(reader.shape) != 1 or reader.dtype.kind not in "iu":
            raise NpyInputError(f"{path}: expected a 1-D integer array, got {reader.dtype} of shape {reader.shape}")
        ids = as_ids(reader.read(reader.shape[0]), path)
    finally:
        reader.close()
    repeated = repeated_ids(ids)
    if len(repeated):
        raise NpyInputError(f"{path} holds sample id {int(repeated[0])} more than once: sample ids must be unique")
    return ids


class MemmapDirWriter:
    """Writes a table's main column as the memmap files into ``directory`` (a table sink).

    ``directory`` is a staging directory that the caller swaps in whole: ``finish`` syncs
    the files, the caller the directory. Rows are written as float32.
    """

    def __init__(self, directory: str, layout: TableLayout):
        self.directory, self.layout = directory, layout
        self._ids = NpyStreamWriter(os.path.join(directory, IDS_FILE), ID_DTYPE, (layout.rows,))
        try:
            self._rows = NpyStreamWriter(os.path.join(directory, EMBEDDINGS_FILE), ROW_DTYPE, (layout.rows, layout.dim))
        except BaseException:
            self._ids.close()
            raise

    def add_ids(self, chunk: int, ids: np.ndarray) -> None:
        self._ids.write(ids)

    def add_chunk(self, chunk: int, parts: list[np.ndarray]) -> None:
        self._rows.write(parts[0])

    def finish(self) -> None:
        self._rows.finish()
        self._ids.finish()
        with open(os.path.join(self.directory, METADATA_FILE), "w") as f:
            json.dump({"total_samples": self.layout.rows, "embedding_dim": self.layout.dim}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        self._rows.close()
        self._ids.close()


__all__ = ["MemmapDirReader", "MemmapDirWriter", "has_memmap_files", "EMBEDDINGS_FILE", "IDS_FILE",
           "METADATA_FILE"]
