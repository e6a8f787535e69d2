"""Whole tables written beside their target and swapped in: a store from row groups, a directory of files.

Both go through :class:`~lmdb_embeddings.processes.staging.StagedStore`: everything is built
in a hidden sibling of the target and renamed into place only once it is complete and
synced, so a bad input or a crash leaves the old target (or nothing), never half of one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable

import numpy as np

from ..core.inputs import SUPPORTED_DTYPES
from ..errors import InvalidInputError, StoreExistsError
from ..fsutil import fsync_dir
from ..ops.progress import bar
from ..processes.staging import StagedStore
from ..store import EmbeddingStore

#: the names a directory of CoSiR files may hold: what export, templates and ``_copy_to`` write
_COSIR_FILE = re.compile(r"^(embeddings_chunk_\d+\.pt|embeddings\.npy|sample_ids\.npy|metadata\.json|"
                         r"template_config\.json)$")


def is_cosir_file(name: str) -> bool:
    return _COSIR_FILE.match(name) is not None


def write_file_dir(target: str, build: Callable[[str], None], purpose: str, *, overwrite: bool = True) -> None:
    """Write a directory of CoSiR files at ``target`` with ``build(tmp)``, then swap it in.

    ``target`` may be missing, empty, or (with ``overwrite``) hold only CoSiR files, which the
    new set replaces as a whole (no stale chunk file survives). Anything else there (a store,
    other files) is never touched: the call refuses before writing anything.
    """
    target = os.path.abspath(os.fspath(target))
    if os.path.exists(target) and not os.path.isdir(target):
        raise StoreExistsError(f"{target} exists and is not a directory")
    present = sorted(os.listdir(target)) if os.path.isdir(target) else []
    others = [name for name in present if not is_cosir_file(name)]
    if others:
        raise StoreExistsError(f"{target} holds {', '.join(others[:5])}, which are not CoSiR embedding files; "
                               "refusing to replace it: choose an empty or new directory")
    if present and not overwrite:
        raise StoreExistsError(f"{target} already holds CoSiR embedding files; pass --force (overwrite=True) "
                               "to replace them")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with StagedStore(target, purpose) as stage:
        build(stage.tmp)
        fsync_dir(stage.tmp)
        stage.swap_in(replace=overwrite, only_stores=False)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_store(dst_path: str, groups: Iterable[tuple[str, np.ndarray, np.ndarray]], *, error: type,
                chunk_rows: int | None, dtype=None, progress: bool = False, total: int | None = None,
                unit: str = "file", cache_mb: float = 32, commit_bytes: int = 64 << 20,
                replace: bool = False) -> dict:
    """A new store at ``dst_path`` from ``(label, ids, rows)`` groups, appended in order.

    ``chunk_rows`` defaults to the rows of the first non-empty group (the original chunk
    size of a directory of chunk files); ``dtype`` to that group's (float32 if unsupported).
    Rows are committed every ``commit_bytes`` so the write transaction stays bounded; memory
    holds one group and the cache. Problems are raised as ``error`` naming the group's label.
    ``replace``: an existing store at ``dst_path`` may be replaced (the caller checked that it
    may); otherwise one that appeared meanwhile is left alone (``StoreExistsError``).
    Returns ``{"rows", "dim", "dtype", "chunk_rows"}``.
    """
    with StagedStore(dst_path, "importing") as stage:
        summary = _append_groups(stage.tmp, groups, error, chunk_rows, dtype, progress, total, unit, cache_mb,
                                 commit_bytes)
        stage.swap_in(replace=replace)
    return summary


def _append_groups(tmp: str, groups, error: type, chunk_rows, dtype, progress, total, unit, cache_mb,
                   commit_bytes) -> dict:
    store = None
    rows_total, dim, since_commit, label = 0, None, 0, ""
    try:
        with bar(total, "import", progress, unit=unit) as pbar:
            for label, ids, rows in groups:
                pbar.update(1)
                if len(ids) == 0:
                    continue
                if dim is None:
                    dim = rows.shape[1]
                    if dtype is None:
                        dtype = rows.dtype.name if rows.dtype.name in SUPPORTED_DTYPES else "float32"
                    store = _start(tmp, label, ids, rows, error, dtype, chunk_rows or len(ids), cache_mb)
                elif rows.shape[1] != dim:
                    raise error(f"{label}: rows of dim {rows.shape[1]}, but earlier rows have dim {dim} "
                                "(mixed dims in one table)")
                else:
                    _append(store, label, ids, rows, error)
                rows_total += len(ids)
                since_commit += rows.nbytes
                if since_commit >= commit_bytes:
                    store.commit()
                    since_commit = 0
        if store is None:
            raise error(f"{label or 'the input'}: holds no rows (nothing to import)")
        summary = {"rows": rows_total, "dim": dim, "dtype": store.dtype.name, "chunk_rows": store.chunk_rows}
        store.close()
        store = None
        return summary
    finally:
        if store is not None:
            store.rollback()
            store.close()


def _start(tmp: str, label: str, ids, rows, error: type, dtype, chunk_rows: int, cache_mb: float) -> EmbeddingStore:
    try:
        return EmbeddingStore.create(tmp, ids, rows.shape[1], dtype=dtype, chunk_rows=chunk_rows, init=rows,
                                     cache_mb=cache_mb)
    except InvalidInputError as exc:
        raise error(f"{label}: {exc}") from None


def _append(store: EmbeddingStore, label: str, ids, rows, error: type) -> None:
    try:
        store.add(ids, rows)
    except InvalidInputError as exc:
        # the error path only: name a sample id that an earlier group holds, if that was the problem
        repeated = next((i for i in ids.tolist() if i in store), None)
        hint = "" if repeated is None else f" (sample id {repeated} is in an earlier file: sample ids must be unique)"
        raise error(f"{label}: {exc}{hint}") from None


__all__ = ["build_store", "write_file_dir", "is_cosir_file", "fsync_file"]
