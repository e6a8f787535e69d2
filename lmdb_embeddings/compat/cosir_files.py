"""Import a directory of original CoSiR ``embeddings_chunk_{i}.pt`` files into a store.

The original manager saved chunk ``i`` as ``torch.save({sample_id: 1-D tensor, ...})``.
The import streams the files in chunk order, one file in memory at a time, appending
each file's rows to a store built in a hidden sibling of the destination; only a complete
store is renamed into place, so a bad file (or a crash) never leaves a half store.
Files are read with ``torch.load(weights_only=True)``: plain tensors only, no pickled code.
"""

from __future__ import annotations

import logging
import os
import pickle
import re

import numpy as np
import torch

from ..core.inputs import SUPPORTED_DTYPES, as_positive_int
from ..errors import EmbeddingStoreError, InvalidInputError
from ..ops.progress import bar
from ..processes.staging import StagedStore, check_replace_target
from ..store import EmbeddingStore

log = logging.getLogger(__name__)

CHUNK_GLOB = "embeddings_chunk_*.pt"
_CHUNK_NAME = re.compile(r"^embeddings_chunk_(\d+)\.pt$")
_COMMIT_BYTES = 64 << 20  # rows appended per commit: bounds the write transaction
_IMPORT_CACHE_MB = 32


class CosirImportError(EmbeddingStoreError, ValueError):
    """The original chunk files cannot be imported (the message names the file and the problem)."""


class CosirSourceNotFoundError(EmbeddingStoreError, FileNotFoundError):
    """The directory of original chunk files does not exist."""


def find_chunk_files(src_dir, required: bool = True) -> list[tuple[int, str]]:
    """``(chunk index, path)`` of the original chunk files in ``src_dir``, in chunk order."""
    src_dir = os.fspath(src_dir)
    if not os.path.isdir(src_dir):
        if not required:
            return []
        raise CosirSourceNotFoundError(f"{src_dir} is not a directory of embeddings_chunk_*.pt files")
    found, odd = [], []
    for name in os.listdir(src_dir):
        if not name.startswith("embeddings_chunk_") or not name.endswith(".pt"):
            continue
        match = _CHUNK_NAME.match(name)
        if match is None:
            odd.append(name)
        else:
            found.append((int(match.group(1)), os.path.join(src_dir, name)))
    if odd and required:
        raise CosirImportError(f"{src_dir}: unexpected chunk file name(s) {', '.join(sorted(odd)[:5])}; "
                               "expected embeddings_chunk_<integer>.pt")
    if not found and required:
        raise CosirImportError(f"{src_dir} holds no {CHUNK_GLOB} files (nothing to import)")
    return sorted(found)


def load_chunk_file(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, rows)`` of one original chunk file, in the file's key order."""
    name = os.path.basename(path)
    try:
        with torch.serialization.safe_globals(_numpy_int_globals()):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CosirImportError(
            f"{path}: cannot be read: it is not a torch.save file, or it holds objects other than tensors, "
            "dicts and numbers (files are loaded with weights_only=True, which refuses pickled code)") from None
    except Exception as exc:  # torch raises many types for truncated or foreign files
        detail = str(exc).splitlines()[0][:200] if str(exc) else "no detail"
        raise CosirImportError(f"{path}: cannot be read as a torch.save file, it may be truncated or "
                               f"corrupt ({type(exc).__name__}: {detail})") from None
    if not isinstance(data, dict):
        raise CosirImportError(f"{path}: holds a {type(data).__name__}, expected a dict {{sample_id: 1-D tensor}}")
    if not data:
        return np.empty(0, np.int64), np.empty((0, 0), np.float32)
    keys = list(data)
    if not all(_is_int(k) for k in keys):
        bad = next(k for k in keys if not _is_int(k))
        raise CosirImportError(f"{name}: key {bad!r} is not an integer sample id")
    values = list(data.values())
    if not all(isinstance(v, torch.Tensor) and v.dim() == 1 for v in values):
        raise CosirImportError(f"{name}: every value must be a 1-D tensor (one embedding row)")
    dims = {int(v.shape[0]) for v in values}
    if len(dims) != 1:
        raise CosirImportError(f"{name}: rows of different lengths {sorted(dims)}")
    try:
        ids = np.array(keys, dtype=np.int64)
    except OverflowError:
        raise CosirImportError(f"{name}: sample ids outside the int64 range") from None
    rows = torch.stack([v.detach() for v in values])
    if rows.dtype not in (torch.float16, torch.float32, torch.float64):
        rows = rows.to(torch.float32)
    return ids, rows.numpy()


def _is_int(key) -> bool:
    return isinstance(key, (int, np.integer)) and not isinstance(key, bool)


def _numpy_int_globals() -> list:
    """What unpickling numpy integer sample IDs needs (the original kept IDs as given, numpy ones too).

    Only scalar reconstruction from a dtype and raw bytes: no code runs. Files written under
    numpy 1 name the function ``numpy.core.multiarray.scalar``, under numpy 2 ``numpy._core...``.
    """
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    int_dtypes = [type(np.dtype(t)) for t in (np.int8, np.int16, np.int32, np.int64,
                                               np.uint8, np.uint16, np.uint32, np.uint64)]
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
            np.dtype, *int_dtypes]


def import_cosir(src_dir, dst_path, *, progress: bool = False, overwrite: bool = False,
                 chunk_rows: int | None = None, dtype=None) -> dict:
    """Convert a directory of original ``embeddings_chunk_*.pt`` files into a store at ``dst_path``.

    Rows keep the files' order (chunk 0's rows first, each file in its key order), which
    for files written by the original manager is the sorted sample-ID order.

    Args:
        chunk_rows: rows per store chunk (default: the row count of the first file, the
            original's ``chunk_size``, so the manager's chunk ids stay the same).
        dtype: store dtype (default: that of the first file's tensors).
        progress: show a progress bar (tqdm) over the files.
        overwrite: replace an existing store at ``dst_path``.
    Returns:
        ``{"files", "rows", "dim", "dtype", "chunk_rows", "path"}``.
    Raises:
        FileNotFoundError: ``src_dir`` is missing. ValueError (``CosirImportError``): no chunk
        files, a corrupt file, rows of mixed dims, non-unique ids. FileExistsError: a store
        exists at ``dst_path`` and not ``overwrite``.
    """
    files = find_chunk_files(src_dir)
    dst_path = os.path.abspath(os.fspath(dst_path))
    if chunk_rows is not None:
        chunk_rows = as_positive_int(chunk_rows, "chunk_rows")
    check_replace_target(dst_path, overwrite, "pass overwrite=True (CLI: --force)")
    with StagedStore(dst_path, "importing") as stage:
        summary = _import_into(stage.tmp, files, src_dir, dtype, chunk_rows, progress)
        summary["path"] = dst_path
        stage.swap_in(replace=overwrite)
    log.info("imported %d rows x %d from %d chunk files of %s into %s", summary["rows"], summary["dim"],
             len(files), src_dir, dst_path)
    return summary


def _import_into(tmp: str, files: list, src_dir, dtype, chunk_rows: int | None, progress: bool) -> dict:
    """Append every file's rows to a new store in ``tmp``; returns the import summary."""
    store = None
    rows_total, dim, since_commit = 0, None, 0
    try:
        with bar(len(files), "import-cosir", progress, unit="file") as pbar:
            for _, path in files:
                pbar.update(1)
                ids, rows = load_chunk_file(path)
                if len(ids) == 0:
                    continue
                if dim is None:
                    dim = rows.shape[1]
                    dtype = dtype if dtype is not None else (
                        rows.dtype.name if rows.dtype.name in SUPPORTED_DTYPES else "float32")
                    store = _start_store(tmp, path, ids, rows, dtype, chunk_rows or len(ids))
                else:
                    if rows.shape[1] != dim:
                        raise CosirImportError(f"{os.path.basename(path)}: rows of dim {rows.shape[1]}, but "
                                               f"earlier files have dim {dim} (mixed dims in one directory)")
                    _append(store, path, ids, rows)
                rows_total += len(ids)
                since_commit += rows.nbytes
                if since_commit >= _COMMIT_BYTES:
                    store.commit()
                    since_commit = 0
        if store is None:
            raise CosirImportError(f"{src_dir}: the chunk files hold no rows (nothing to import)")
        summary = {"files": len(files), "rows": rows_total, "dim": dim, "dtype": store.dtype.name,
                   "chunk_rows": store.chunk_rows}
        store.close()
        store = None
        return summary
    finally:
        if store is not None:
            store.rollback()
            store.close()


def _start_store(tmp: str, path: str, ids: np.ndarray, rows: np.ndarray, dtype, chunk_rows: int) -> EmbeddingStore:
    try:
        return EmbeddingStore.create(tmp, ids, rows.shape[1], dtype=dtype, chunk_rows=chunk_rows, init=rows,
                                     cache_mb=_IMPORT_CACHE_MB)
    except InvalidInputError as exc:
        raise CosirImportError(f"{os.path.basename(path)}: {exc}") from None


def _append(store: EmbeddingStore, path: str, ids: np.ndarray, rows: np.ndarray) -> None:
    try:
        store.add(ids, rows)
    except InvalidInputError as exc:
        hint = " (sample ids must be unique across all chunk files)" if "already" in str(exc) else ""
        raise CosirImportError(f"{os.path.basename(path)}: {exc}{hint}") from None


__all__ = ["import_cosir", "find_chunk_files", "load_chunk_file", "CosirImportError", "CosirSourceNotFoundError"]
