"""What a manager's ``embeddings_dir`` holds, and opening (or creating) its store.

An ``embeddings_dir`` holds our store (``embeddings_dir/embeddings.lmdb``, or the directory
itself is one), or the files of an upstream manager: ``embeddings_chunk_*.pt`` (2025-09 ..
2026-04-06) or ``embeddings.npy`` + ``sample_ids.npy`` (2026-04-07 on). Upstream files are
imported into ``embeddings.lmdb`` beside them the first time (logged once, the files are
left as they are); later managers resume from the store.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np

from ...errors import InvalidInputError, WriterLockedError
from ...format.init import INIT_KINDS
from ...format.memmap_dir import has_memmap_files
from ...format.records import DATA_FILE, is_store
from ...fsutil import fsync_dir, fsync_file
from ...processes import environment
from ...processes.staging import StagedStore
from ...processes.writer_lock import holder_pid
from ...store import EmbeddingStore
from ..files.cosir_chunks import find_chunk_files
from ..files.transfer import import_cosir, import_memmap_files
from ..init.cosir_init import FEATURE_STRATEGIES
from .manager_args import ManagerArgs

log = logging.getLogger(__name__)

STORE_DIRNAME = "embeddings.lmdb"
_MIB = 1 << 20


def store_path_in(directory) -> str:
    """The store of ``directory``: the directory itself if it is one, else ``directory/embeddings.lmdb``."""
    directory = os.fspath(directory)
    return directory if is_store(directory) else os.path.join(directory, STORE_DIRNAME)


def existing_table(directory: Path) -> str | None:
    """``"store"``, ``"chunk files"``, ``"memmap files"`` or None: what ``directory`` already holds."""
    if not directory.is_dir():
        return None
    if is_store(store_path_in(directory)):
        return "store"
    if find_chunk_files(directory, required=False):
        return "chunk files"
    if has_memmap_files(directory):
        return "memmap files"
    return None


def check_new_table_strategy(strategy) -> None:
    """A new table needs an initialiser the store knows (reopening accepts any name, as upstream did)."""
    if strategy in FEATURE_STRATEGIES:
        raise InvalidInputError(f"initialization_strategy={strategy!r} needs features and a model: create the "
                                f"manager with another strategy (e.g. 'zeros'), then call "
                                f"initialize_embeddings_{strategy}(feature_manager, model, device)")
    if strategy not in INIT_KINDS:
        raise InvalidInputError(f"Unknown initialization strategy: {strategy!r}; a new table needs one of "
                                f"{', '.join(INIT_KINDS)} (other names are accepted only when reopening a table)")


def default_chunk_size(rows: int) -> int:
    return max(1, min(1000, rows))


def cache_options(args: ManagerArgs, rows: int, chunk_rows: int, itemsize: int = 4) -> dict:
    """Memory mode: an L1 that holds the whole table; disk mode: the caller's L1/L2 budgets."""
    if args.memory:
        chunk_bytes = chunk_rows * args.embedding_dim * itemsize
        return {"l1_mb": (max(1, math.ceil(rows / chunk_rows)) + 1) * chunk_bytes / _MIB, "l2_mb": 0}
    return {"l1_mb": args.cache_l1_size_mb, "l2_mb": args.cache_l2_size_mb}


def open_table(directory: Path, found: str | None, args: ManagerArgs, seed: int) -> tuple[EmbeddingStore, dict]:
    """The writable store of ``directory`` (imported or created as needed) and its cache options."""
    path = store_path_in(directory)
    if found == "chunk files":
        log.info("importing the original embeddings_chunk_*.pt files of %s into %s (done once; the .pt files are "
                 "left as they are)", directory, path)
        import_cosir(directory, path, chunk_rows=args.chunk_size)
    elif found == "memmap files":
        log.info("importing the memmap files (embeddings.npy, sample_ids.npy) of %s into %s (done once; the files "
                 "are left as they are)", directory, path)
        import_memmap_files(directory, path, args.chunk_size or default_chunk_size(len(args.ids)))
    if found is None:
        chunk = args.chunk_size or default_chunk_size(len(args.ids))
        options = cache_options(args, len(args.ids), chunk)
        store = EmbeddingStore.create(path, args.ids, args.embedding_dim, chunk_rows=chunk, init=args.strategy,
                                      seed=int(seed), **options)
        return store, options
    return _open_existing(path, directory, args)


def _open_existing(path: str, directory: Path, args: ManagerArgs) -> tuple[EmbeddingStore, dict]:
    """Open the store at ``path`` for writing; add the sample IDs it does not hold yet."""
    probe = EmbeddingStore.open(path, readonly=True)
    try:
        dim, rows, chunk_rows, itemsize = probe.dim, len(probe), probe.chunk_rows, probe.dtype.itemsize
        missing = args.ids[~np.isin(args.ids, probe.ids)]
    finally:
        probe.close()
    check_dim(path, dim, args.embedding_dim)
    if args.chunk_size is not None and args.chunk_size != chunk_rows:
        log.info("%s keeps its chunk size %d (chunk_size=%d ignored)", path, chunk_rows, args.chunk_size)
    options = cache_options(args, rows + len(missing), chunk_rows, itemsize)
    try:
        store = EmbeddingStore.open(path, **options)
    except WriterLockedError as exc:
        if exc.holder_pid == os.getpid():  # managers share one store; a plain writable handle does not
            raise WriterLockedError(
                f"{path} is open for writing in this process (pid {exc.holder_pid}) by an EmbeddingStore handle: "
                f"close it before creating a TrainableEmbeddingManager on {directory} (managers on one directory "
                "share their store; a plain writable handle cannot)", holder_pid=exc.holder_pid) from None
        raise
    if len(missing):
        log.info("adding %d sample ids that %s did not hold yet", len(missing), path)
        try:
            store.add(missing)
            store.commit()
        except BaseException:
            store.rollback()
            store.close()
            raise
    extra = len(store) - len(args.ids)
    if extra > 0:
        log.info("%s holds %d sample ids beyond those passed; they are kept and managed too", path, extra)
    return store, options


def check_dim(path: str, dim: int, embedding_dim: int) -> None:
    if dim != embedding_dim:
        raise InvalidInputError(f"the store at {path} holds rows of dim {dim}, not embedding_dim={embedding_dim}; "
                                f"pass embedding_dim={dim} or use another embeddings_dir")


def copy_committed_store(src: str, target: str) -> None:
    """A consistent, compacted copy of the committed state of ``src`` at ``target`` (built beside, swapped in)."""
    if environment.is_open_here(target) or holder_pid(target) is not None:
        raise WriterLockedError(f"{target} is open (pid {holder_pid(target) or os.getpid()}); close the manager or "
                                "store using it before saving there", holder_pid=holder_pid(target) or os.getpid())
    with StagedStore(target, "saving") as stage:
        shared = environment.acquire(src, write=False)
        try:
            shared.copy_compacted(stage.tmp)
        finally:
            environment.release(shared)
        fsync_file(os.path.join(stage.tmp, DATA_FILE))
        fsync_dir(stage.tmp)
        stage.swap_in(replace=True)
