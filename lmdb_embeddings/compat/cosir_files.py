"""The original CoSiR chunk files (``embeddings_chunk_{i}.pt``): import into a store, export from one.

The original manager saved chunk ``i`` as ``torch.save({sample_id: 1-D tensor, ...})``.
The import streams the files in chunk order, one file in memory at a time, appending
each file's rows to a store built in a hidden sibling of the destination; only a complete
store is renamed into place, so a bad file (or a crash) never leaves a half store.
Files are read with ``torch.load(weights_only=True)``: plain tensors only, no pickled code.
The export writes one file per store chunk the same way, bit-exact on re-import.
"""

from __future__ import annotations

import logging
import os
import pickle
import re

import numpy as np
import torch

from ..core.inputs import as_positive_int
from ..errors import EmbeddingStoreError
from ..format.snapshot import Snapshot
from ..ops.progress import bar
from ..processes.staging import check_replace_target
from .building import build_store, write_file_dir

log = logging.getLogger(__name__)

CHUNK_GLOB = "embeddings_chunk_*.pt"
_CHUNK_NAME = re.compile(r"^embeddings_chunk_(\d+)\.pt$")
_COMMIT_BYTES = 64 << 20  # rows appended per commit: bounds the write transaction
_IMPORT_CACHE_MB = 32


class CosirImportError(EmbeddingStoreError, ValueError):
    """The original chunk files cannot be imported (the message names the file and the problem)."""


class CosirSourceNotFoundError(EmbeddingStoreError, FileNotFoundError):
    """The directory of original chunk files does not exist."""


class CosirExportError(EmbeddingStoreError, ValueError):
    """The chunk files cannot be written where asked (the message says why)."""


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
    groups = ((os.path.basename(path), *load_chunk_file(path)) for _, path in files)
    summary = build_store(dst_path, groups, error=CosirImportError, chunk_rows=chunk_rows, dtype=dtype,
                          progress=progress, total=len(files), cache_mb=_IMPORT_CACHE_MB, commit_bytes=_COMMIT_BYTES,
                          replace=overwrite)
    summary = {"files": len(files), **summary, "path": dst_path}
    log.info("imported %d rows x %d from %d chunk files of %s into %s", summary["rows"], summary["dim"],
             len(files), src_dir, dst_path)
    return summary


# --------------------------------------------------------------------------- export
def chunk_file_content(ids: np.ndarray, rows: np.ndarray) -> dict:
    """What the original manager saved per chunk: ``{int sample id: 1-D tensor}`` in row order.

    The values are rows of one tensor (as the original's were), so ``torch.save`` writes the
    chunk's rows once, as one storage.
    """
    block = torch.from_numpy(np.array(rows, copy=True))
    return dict(zip(ids.tolist(), block.unbind(0), strict=True))


def write_chunk_files(directory: str, groups) -> int:
    """``directory/embeddings_chunk_{k}.pt`` for the k-th ``(ids, rows)`` group, each synced; the file count."""
    count = 0
    for k, (ids, rows) in enumerate(groups):
        path = os.path.join(directory, f"embeddings_chunk_{k}.pt")
        with open(path, "wb") as f:
            torch.save(chunk_file_content(ids, rows), f)
            f.flush()
            os.fsync(f.fileno())
        count += 1
    return count


def export_cosir(store_path, out_dir, *, overwrite: bool = False, progress: bool = False) -> dict:
    """Write the committed rows of the store at ``store_path`` as original ``embeddings_chunk_*.pt`` files.

    File ``k`` holds store chunk ``k`` (``chunk_rows`` rows in row order, ``{int id: 1-D tensor}``
    of the store's dtype), so ``import_cosir(out_dir, ...)`` rebuilds the table bit-exact, with
    the same chunking. Reads one consistent snapshot (safe while a writer trains), one chunk
    at a time; the files are built beside ``out_dir`` and swapped in when complete.
    Auxiliary columns (optimizer state) are not part of the original format and are left out.

    Args:
        overwrite: replace ``out_dir`` if it already holds CoSiR files (never anything else).
    Returns:
        ``{"files", "rows", "dim", "dtype", "chunk_rows", "commit", "path"}``.
    """
    store_path = os.path.abspath(os.fspath(store_path))
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.commonpath([store_path, out_dir]) == store_path:
        raise CosirExportError(f"{out_dir} is inside the store {store_path}; choose a directory outside it")
    with Snapshot(store_path) as snap:
        layout = snap.layout
        main = layout.columns[0]

        def chunks():
            for c in range(layout.n_chunks):
                yield snap.ids_chunk(c).copy(), np.array(snap.column_chunk(c, main))
                snap.release_pages()

        def build(tmp: str) -> None:
            with bar(layout.n_chunks, "export-cosir", progress, unit="file") as pbar:
                write_chunk_files(tmp, _counted(chunks(), pbar))

        write_file_dir(out_dir, build, "exporting", overwrite=overwrite)
    log.info("exported %d rows x %d of %s (commit %d) into %d chunk files in %s", layout.rows, layout.dim,
             store_path, layout.commit, layout.n_chunks, out_dir)
    return {"files": layout.n_chunks, "rows": layout.rows, "dim": layout.dim, "dtype": layout.dtype.name,
            "chunk_rows": layout.chunk_rows, "commit": layout.commit, "path": out_dir}


def _counted(items, pbar):
    for item in items:
        yield item
        pbar.update(1)


__all__ = ["import_cosir", "export_cosir", "find_chunk_files", "load_chunk_file", "write_chunk_files",
           "chunk_file_content", "CosirImportError", "CosirExportError", "CosirSourceNotFoundError"]
