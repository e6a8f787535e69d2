"""The files of CoSiR's np.memmap manager (2026-04): ``embeddings.npy``, ``sample_ids.npy``, ``metadata.json``.

``embeddings.npy`` holds float32 rows ``[N, D]``, ``sample_ids.npy`` the int64 id of each row
(position-indexed), ``metadata.json`` ``{"total_samples": N, "embedding_dim": D}``. They are
read through ``np.load(mmap_mode="r")`` in row groups and written through
``np.lib.format.open_memmap`` in row groups, so memory never holds the whole table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

import numpy as np

from ..errors import EmbeddingStoreError
from .building import build_store, fsync_file

EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "sample_ids.npy"
METADATA_FILE = "metadata.json"
GROUP_BYTES = 32 << 20  # rows read or written at once


class MemmapFilesError(EmbeddingStoreError, ValueError):
    """``embeddings.npy`` / ``sample_ids.npy`` are missing, unreadable or do not fit together."""


def has_memmap_files(directory) -> bool:
    return os.path.isfile(os.path.join(os.fspath(directory), EMBEDDINGS_FILE))


class MemmapTable:
    """The table in a directory of memmap files, read group by group (``rows``, ``dim``, ``groups()``)."""

    def __init__(self, directory):
        self.directory = os.fspath(directory)
        emb_path = os.path.join(self.directory, EMBEDDINGS_FILE)
        ids_path = os.path.join(self.directory, IDS_FILE)
        if not os.path.isfile(ids_path):
            raise MemmapFilesError(f"{self.directory} holds {EMBEDDINGS_FILE} but no {IDS_FILE}: without it the "
                                   "rows cannot be matched to sample ids")
        self._rows = _load(emb_path)
        self._ids = _load(ids_path)
        if self._rows.ndim != 2 or self._rows.dtype.kind != "f":
            raise MemmapFilesError(f"{emb_path}: expected a 2-D float array, got {self._rows.dtype} of shape "
                                   f"{self._rows.shape}")
        if self._ids.ndim != 1 or self._ids.dtype.kind not in "iu":
            raise MemmapFilesError(f"{ids_path}: expected a 1-D integer array, got {self._ids.dtype} of shape "
                                   f"{self._ids.shape}")
        if len(self._ids) != len(self._rows):
            raise MemmapFilesError(f"{self.directory}: {IDS_FILE} has {len(self._ids)} ids but {EMBEDDINGS_FILE} "
                                   f"{len(self._rows)} rows")
        self.rows, self.dim = self._rows.shape

    def groups(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(ids, rows)`` in file order, each a fresh array of at most ``GROUP_BYTES``."""
        step = max(1, GROUP_BYTES // max(1, self.dim * self._rows.dtype.itemsize))
        for lo in range(0, self.rows, step):
            yield self._ids[lo : lo + step].astype(np.int64), np.array(self._rows[lo : lo + step])


def _load(path: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise MemmapFilesError(f"{path}: cannot be read as a .npy file ({exc})") from None


def write_memmap_files(directory: str, ids: np.ndarray, groups: Iterable[np.ndarray], dim: int) -> None:
    """Write the three files into ``directory``: ``ids`` (row order) and their rows, given group by group."""
    n = len(ids)
    emb_path = os.path.join(directory, EMBEDDINGS_FILE)
    out = np.lib.format.open_memmap(emb_path, mode="w+", dtype=np.float32, shape=(n, dim))
    lo = 0
    for rows in groups:
        out[lo : lo + len(rows)] = rows
        lo += len(rows)
    if lo != n:
        raise MemmapFilesError(f"{emb_path}: {lo} rows were written, expected {n}")
    out.flush()
    del out
    np.save(os.path.join(directory, IDS_FILE), np.asarray(ids, dtype=np.int64))
    with open(os.path.join(directory, METADATA_FILE), "w") as f:
        json.dump({"total_samples": n, "embedding_dim": dim}, f, indent=2)
    for name in (EMBEDDINGS_FILE, IDS_FILE, METADATA_FILE):
        fsync_file(os.path.join(directory, name))


def import_memmap_files(src_dir, dst_path: str, chunk_rows: int) -> dict:
    """A new store at ``dst_path`` holding the rows of ``src_dir``'s memmap files, in file order."""
    table = MemmapTable(src_dir)
    label = os.path.join(os.fspath(src_dir), EMBEDDINGS_FILE)
    groups = ((label, ids, rows) for ids, rows in table.groups())
    return build_store(dst_path, groups, error=MemmapFilesError, chunk_rows=chunk_rows, dtype="float32")
