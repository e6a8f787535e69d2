"""Moving tables between stores and directories of upstream files: one path, through ``copy_table``.

Files become a store as a dump is restored: ``copy_table`` from the files' reader into the
store builder in a hidden sibling of the target, verified, swapped in
(:func:`~lmdb_embeddings.ops.backup.build_verified`). A store, or a manager's rows, becomes
a directory of files through :func:`write_file_dir`: ``copy_table`` into the files' writer in
a hidden sibling, swapped in whole. A bad input or a crash leaves the old target, or
nothing, never half of one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable

from ...errors import CosirExportError, EmbeddingStoreError, StorageError, StoreExistsError
from ...format.layout import TableSink, TableSource, copy_table
from ...format.memmap_dir import MemmapDirReader
from ...fsutil import fsync_dir
from ...inputs import as_positive_int
from ...ops.backup import build_verified
from ...processes.snapshot import Snapshot
from ...processes.staging import StagedStore, check_replace_target
from ...progress import bar
from .cosir_chunks import CosirChunkReader, CosirChunkWriter, find_chunk_files

log = logging.getLogger(__name__)

#: the names a directory of CoSiR files may hold: what export, templates and ``_copy_to`` write
_COSIR_FILE = re.compile(r"^(embeddings_chunk_\d+\.pt|embeddings\.npy|sample_ids\.npy|metadata\.json|"
                         r"template_config\.json)$")


# ----------------------------------------------------------------------- into a store
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
        with bar(len(files), "import", progress, unit="file") as pbar, \
                CosirChunkReader(files, spill_dir=stage.tmp, chunk_rows=chunk_rows, dtype=dtype,
                                 on_file=lambda: pbar.update(1)) as source:
            build_verified(source, stage, os.fspath(src_dir))
        stage.swap_in(replace=overwrite)
    layout = source.layout
    log.info("imported %d rows x %d from %d chunk files of %s into %s", layout.rows, layout.dim, len(files), src_dir,
             dst_path)
    return {"files": len(files), "rows": layout.rows, "dim": layout.dim, "dtype": layout.dtype.name,
            "chunk_rows": layout.chunk_rows, "path": dst_path}


def import_memmap_files(src_dir, dst_path: str, chunk_rows: int) -> None:
    """A new store at ``dst_path`` holding the rows of ``src_dir``'s memmap files, in file order."""
    with MemmapDirReader(src_dir, chunk_rows) as source, StagedStore(dst_path, "importing") as stage:
        build_verified(source, stage, os.fspath(src_dir))
        stage.swap_in(replace=False)


# ----------------------------------------------------------------------- into files
class MainColumn:
    """A store snapshot without its auxiliary columns (optimizer state): what upstream files hold."""

    def __init__(self, snap: Snapshot):
        self.snap = snap
        self.layout = dataclasses.replace(snap.layout, columns=snap.layout.columns[:1])

    def id_chunks(self):
        return self.snap.id_chunks()

    def chunks(self):
        return self.snap.chunks(self.layout.columns)


def write_table(source: TableSource, sink: TableSink, on_chunk=None) -> None:
    """``copy_table`` into ``sink``, which is closed whatever happens."""
    try:
        copy_table(source, sink, on_chunk)
    finally:
        sink.close()


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
        source = MainColumn(snap)
        layout = source.layout

        def build(tmp: str) -> None:
            with bar(layout.n_chunks, "export-cosir", progress, unit="file") as pbar:
                write_table(source, CosirChunkWriter(tmp, layout), lambda rows: pbar.update(1))

        write_file_dir(out_dir, build, "exporting", overwrite=overwrite)
    log.info("exported %d rows x %d of %s (commit %d) into %d chunk files in %s", layout.rows, layout.dim,
             store_path, layout.commit, layout.n_chunks, out_dir)
    return {"files": layout.n_chunks, "rows": layout.rows, "dim": layout.dim, "dtype": layout.dtype.name,
            "chunk_rows": layout.chunk_rows, "commit": layout.commit, "path": out_dir}


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
        try:
            build(stage.tmp)
            fsync_dir(stage.tmp)
        except OSError as exc:  # a full disk, an I/O error: nothing was swapped in
            if isinstance(exc, EmbeddingStoreError):
                raise
            raise StorageError(f"writing the files of {target} failed ({exc.strerror or exc}); it was left as it "
                               "was") from None
        stage.swap_in(replace=overwrite, only_stores=False)


__all__ = ["import_cosir", "export_cosir", "import_memmap_files", "write_file_dir", "write_table", "is_cosir_file",
           "MainColumn", "CosirExportError"]
