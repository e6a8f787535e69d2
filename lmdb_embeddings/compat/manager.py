"""Drop-in replacement for CoSiR's ``TrainableEmbeddingManager``, built on :class:`EmbeddingStore`.

The original kept one ``torch.save`` file per chunk and rewrote (and fsynced) whole files
on every sync. This class keeps the original's constructor keywords, method names,
argument and return types, and maps them onto one store:

* the manager's chunk ``c`` is the store's chunk ``c`` (``chunk_size`` -> ``chunk_rows``),
  rows in the order of the sorted sample IDs, exactly as the original grouped them, so a
  chunk-by-chunk loop is one vectorized get/put of contiguous rows;
* a "sync" is one store commit: every change since the last one, in one synced LMDB transaction;
* ``storage_mode="memory"`` sizes the store's L1 cache to hold the whole table (still
  persisted through the store); ``"disk"`` uses ``cache_l1_size_mb``/``cache_l2_size_mb``.

The store lives in ``embeddings_dir/embeddings.lmdb`` (or in ``embeddings_dir`` itself
when that directory already is a store), so original ``embeddings_chunk_*.pt`` files in
the same directory are left untouched after they were imported.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..core.init import INIT_KINDS
from ..core.inputs import as_ids, as_positive_int, to_numpy
from ..errors import EmbeddingStoreError, InvalidInputError, UnknownIdError, WriterLockedError
from ..format.records import DATA_FILE, is_store
from ..fsutil import dir_size, fsync_dir
from ..processes import environment
from ..processes.staging import StagedStore
from ..processes.writer_lock import holder_pid
from ..store import EmbeddingStore
from .cosir_files import find_chunk_files, import_cosir
from .statistics import embedding_statistics

log = logging.getLogger(__name__)

STORE_DIRNAME = "embeddings.lmdb"
STORAGE_MODES = ("memory", "disk")
_MIB = 1 << 20
_LOAD_GROUP_BYTES = 32 << 20  # rows decoded at once by memory mode's first pass


class UnknownSampleError(UnknownIdError, ValueError):
    """Sample IDs not managed here (a ``KeyError`` like the store's, a ``ValueError`` like the original's)."""


class UnknownChunkError(EmbeddingStoreError, ValueError, FileNotFoundError):
    """A chunk id outside ``0 .. num_chunks - 1`` (the original raised ValueError or FileNotFoundError)."""


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class TrainableEmbeddingManager:
    """Per-sample trainable embeddings with the original manager's interface, stored in LMDB.

    Args (the original's keywords):
        sample_ids: the sample IDs (any order; rows are kept sorted by ID, as the original did).
        embedding_dim: row width.
        device: where returned tensors live (default: ``"cuda"`` if available, else ``"cpu"``).
        initialization_strategy: ``"normal"`` (N(0, 0.01^2)), ``"zeros"``, ``"uniform"``,
            ``"xavier"`` or ``"kaiming"``; the seed is ``seed`` or, if None, ``torch.initial_seed()``
            (so ``torch.manual_seed`` makes the table reproducible, as it did the original's).
        storage_mode: ``"memory"`` keeps every row resident in the cache (and persisted);
            ``"disk"`` keeps only what the L1/L2 caches hold.
        embeddings_dir: directory of the store (None: a new temporary directory). If it holds
            a store, the manager resumes from its last commit; if it holds original
            ``embeddings_chunk_*.pt`` files and no store, they are imported first.
        chunk_size: rows per chunk (default ``min(1000, len(sample_ids))``); ``feature_manager.chunk_size``
            wins when a ``feature_manager`` with that attribute is given. A resumed store keeps its own.
        auto_sync: commit every ``sync_batch_size`` updates (counted since the last commit);
            False: commit only in ``force_sync_all_chunks`` / ``sync_dirty_chunks_to_disk`` /
            ``save_final_embeddings``.
        cache_l1_size_mb / cache_l2_size_mb: the store's L1 (slab) and L2 (victim) budgets, disk mode.
        enable_l3_cache: accepted for compatibility; the OS page cache under LMDB's memory map
            is the third tier, so there is nothing to switch on or off.
        sync_batch_size: updates per automatic commit.
        seed: extension: seed of the initial values (see ``initialization_strategy``).

    Durability differs from the original in one way: an update is durable once it is
    committed (a sync), and a commit is atomic; ``force_sync_all_chunks`` is the epoch-end
    commit. ``close()`` (or leaving a ``with`` block) commits pending updates when
    ``auto_sync`` is on and discards them when it is off. Nothing is printed; messages go
    through ``logging``.
    """

    def __init__(self, sample_ids, embedding_dim, device=None, initialization_strategy="normal",
                 storage_mode="memory", embeddings_dir=None, chunk_size=None, feature_manager=None,
                 auto_sync=True, cache_l1_size_mb=256, cache_l2_size_mb=512, enable_l3_cache=True,
                 sync_batch_size=10, *, seed=None):
        ids = np.sort(as_ids(sample_ids, "sample_ids"))
        if len(ids) > 1 and bool((ids[1:] == ids[:-1]).any()):
            dup = np.unique(ids[1:][ids[1:] == ids[:-1]])[:10]
            raise InvalidInputError(f"sample_ids contain duplicates ({', '.join(map(str, dup.tolist()))}); "
                                    "pass each sample id once")
        self.embedding_dim = as_positive_int(embedding_dim, "embedding_dim")
        if storage_mode not in STORAGE_MODES:
            raise InvalidInputError(f"Unknown storage_mode: {storage_mode!r}; use 'memory' or 'disk'")
        if initialization_strategy == "imgtxt":
            raise InvalidInputError("the 'imgtxt' strategy needs a model and features: create the manager with "
                                    "another strategy, then write the rows with update_embeddings_by_chunk")
        if initialization_strategy not in INIT_KINDS:
            raise InvalidInputError(f"Unknown initialization strategy: {initialization_strategy!r}; use one of "
                                    f"{', '.join(INIT_KINDS)}")
        fm_chunk = getattr(feature_manager, "chunk_size", None) if feature_manager is not None else None
        if fm_chunk is not None:
            chunk_size = fm_chunk
        explicit_chunk = chunk_size is not None
        chunk_size = as_positive_int(chunk_size if explicit_chunk else max(1, min(1000, len(ids))), "chunk_size")
        self.sync_batch_size = as_positive_int(sync_batch_size, "sync_batch_size")
        for name, value in (("cache_l1_size_mb", cache_l1_size_mb), ("cache_l2_size_mb", cache_l2_size_mb)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise InvalidInputError(f"{name} must be a number of MiB >= 0, got {value!r}")
        if seed is None:
            seed = torch.initial_seed() % (1 << 63)

        self.device = device if device is not None else _default_device()
        self._on_cpu = torch.device(self.device).type == "cpu"
        self.storage_mode = storage_mode
        self.auto_sync = bool(auto_sync)
        self.enable_l3_cache = bool(enable_l3_cache)
        self.cache_l1_size_mb, self.cache_l2_size_mb = cache_l1_size_mb, cache_l2_size_mb
        if embeddings_dir is None:
            self.embeddings_dir = Path(tempfile.mkdtemp(prefix="embeddings_"))
        else:
            self.embeddings_dir = Path(embeddings_dir)
            self.embeddings_dir.mkdir(parents=True, exist_ok=True)
        self._store: EmbeddingStore | None = None
        self._closed = False
        self._updates_since_sync = 0
        self._pending_rows = 0
        self._sync_operations = 0
        self._sample_list: list | None = None
        self._served_chunk: tuple[int, list] | None = None

        path = self._store_path(self.embeddings_dir)
        if is_store(path):
            self._store = self._open(path, ids)
            if explicit_chunk and chunk_size != self._store.chunk_rows:
                log.info("%s keeps its chunk size %d (chunk_size=%d ignored)", path, self._store.chunk_rows,
                         chunk_size)
        else:
            if find_chunk_files(self.embeddings_dir, required=False):
                log.info("importing the original embeddings_chunk_*.pt files of %s into %s (done once; "
                         "the .pt files are left as they are)", self.embeddings_dir, path)
                import_cosir(self.embeddings_dir, path, chunk_rows=chunk_size if explicit_chunk else None)
                self._store = self._open(path, ids)
            else:
                self._store = self._create(path, ids, chunk_size, initialization_strategy, seed)
        self.chunk_size = self._store.chunk_rows
        self._ids = self._store.ids
        self._n_chunks = math.ceil(len(self._ids) / self.chunk_size)
        if storage_mode == "memory":
            self._load_all()
        log.info("TrainableEmbeddingManager on %s: %d rows x %d, chunk_size %d, %s mode, auto_sync=%s "
                 "(every %d updates)", self.store_path, len(self._ids), self.embedding_dim, self.chunk_size,
                 storage_mode, self.auto_sync, self.sync_batch_size)

    # ------------------------------------------------------------------ opening
    @staticmethod
    def _store_path(directory: Path) -> str:
        return str(directory) if is_store(str(directory)) else str(directory / STORE_DIRNAME)

    def _cache_options(self, rows: int, chunk_rows: int, itemsize: int = 4) -> dict:
        if self.storage_mode == "memory":
            chunk_bytes = chunk_rows * self.embedding_dim * itemsize
            n_chunks = max(1, math.ceil(rows / chunk_rows))
            return {"l1_mb": (n_chunks + 1) * chunk_bytes / _MIB, "l2_mb": 0}
        return {"l1_mb": self.cache_l1_size_mb, "l2_mb": self.cache_l2_size_mb}

    def _create(self, path: str, ids: np.ndarray, chunk_size: int, strategy: str, seed: int) -> EmbeddingStore:
        return EmbeddingStore.create(path, ids, self.embedding_dim, chunk_rows=chunk_size, init=strategy,
                                     seed=int(seed), **self._cache_options(len(ids), chunk_size))

    def _open(self, path: str, ids: np.ndarray) -> EmbeddingStore:
        """Open the store at ``path`` for writing; add the sample IDs it does not hold yet."""
        probe = EmbeddingStore.open(path, readonly=True)
        try:
            dim, rows, chunk_rows, itemsize = probe.dim, len(probe), probe.chunk_rows, probe.dtype.itemsize
            missing = ids[~np.isin(ids, probe.ids)]
        finally:
            probe.close()
        if dim != self.embedding_dim:
            raise InvalidInputError(f"the store at {path} holds rows of dim {dim}, not embedding_dim="
                                    f"{self.embedding_dim}; pass embedding_dim={dim} or use another embeddings_dir")
        options = self._cache_options(rows + len(missing), chunk_rows, itemsize)
        try:
            store = EmbeddingStore.open(path, **options)
        except WriterLockedError as exc:
            if exc.holder_pid == os.getpid():
                raise WriterLockedError(
                    f"{self.embeddings_dir} is still open in this process (another TrainableEmbeddingManager or "
                    "EmbeddingStore writer): call close() on the first manager (or use it in a `with` block) "
                    "before creating a second one on the same embeddings_dir") from None
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
        extra = len(store) - len(ids)
        if extra > 0:
            log.info("%s holds %d sample ids beyond those passed; they are kept and managed too", path, extra)
        return store

    def _load_all(self) -> None:
        """Memory mode: make every chunk resident now (the L1 budget holds the whole table)."""
        step = self.chunk_size * max(1, _LOAD_GROUP_BYTES // max(1, self.chunk_size * self.embedding_dim * 4))
        for lo in range(0, len(self._ids), step):
            self._store.get(self._ids[lo : lo + step])

    # --------------------------------------------------------------- properties
    @property
    def store(self) -> EmbeddingStore:
        """The underlying :class:`EmbeddingStore` (writable handle)."""
        return self._store

    @property
    def store_path(self) -> str:
        return self._store.path

    @property
    def sample_ids(self) -> list:
        """All managed sample IDs in row order (sorted, for a manager-created store)."""
        if self._sample_list is None:
            self._sample_list = self._ids.tolist()
        return self._sample_list

    @property
    def num_chunks(self) -> int:
        return self._n_chunks

    def __len__(self) -> int:
        return len(self._ids)

    # ------------------------------------------------------------- rows by id
    def get_embeddings(self, sample_ids):
        """Rows of ``sample_ids`` (in order) as a ``(len(sample_ids), embedding_dim)`` tensor on ``device``."""
        try:
            if self._on_cpu:
                return torch.from_numpy(self._store.get(sample_ids))
            return self._store.get_tensor(sample_ids, device=self.device)
        except UnknownIdError as exc:
            raise UnknownSampleError(str(exc)) from None

    def update_embeddings(self, sample_ids, new_embeddings) -> None:
        """Overwrite rows (a repeated ID keeps its last row, as the original's dict did)."""
        self._put(as_ids(sample_ids, "sample_ids"), new_embeddings)

    def _put(self, ids: np.ndarray, values) -> None:
        try:
            try:
                self._store.put(ids, values)
            except InvalidInputError:
                if len(ids) < 2 or len(np.unique(ids)) == len(ids):
                    raise
                ids, values = _last_wins(ids, values)  # repeated ids: retry with the last of each
                self._store.put(ids, values)
        except UnknownIdError as exc:
            raise UnknownSampleError(str(exc)) from None
        self._pending_rows += len(ids)
        self._updates_since_sync += 1
        if self.auto_sync and self._updates_since_sync >= self.sync_batch_size:
            self._commit()

    def get_all_embeddings(self):
        """``(sample_ids, tensor)`` of every row, in row order."""
        return self.sample_ids.copy(), self.get_embeddings(self._ids)

    # ---------------------------------------------------------- rows by chunk
    def _chunk_range(self, chunk_id) -> tuple[int, int]:
        if isinstance(chunk_id, bool) or not isinstance(chunk_id, (int, np.integer)):
            raise InvalidInputError(f"chunk_id must be an int, got {chunk_id!r}")
        if not 0 <= chunk_id < self._n_chunks:
            raise UnknownChunkError(f"No samples found for chunk {chunk_id}: chunks are 0..{self._n_chunks - 1}")
        lo = int(chunk_id) * self.chunk_size
        return lo, min(lo + self.chunk_size, len(self._ids))

    def get_embeddings_by_chunk(self, chunk_id):
        """``(sample_ids, tensor)`` of one chunk: one contiguous run of rows, one vectorized read."""
        lo, hi = self._chunk_range(chunk_id)
        ids = self._ids[lo:hi]
        listed = ids.tolist()
        self._served_chunk = (int(chunk_id), listed.copy())  # lets the matching update skip its id checks
        return listed, self.get_embeddings(ids)

    def update_embeddings_by_chunk(self, chunk_id, sample_ids, new_embeddings) -> None:
        """Write rows of one chunk (all of it, as returned by :meth:`get_embeddings_by_chunk`, or part)."""
        if len(sample_ids) != new_embeddings.shape[0]:
            raise InvalidInputError(
                f"Length mismatch: {len(sample_ids)} sample_ids vs {new_embeddings.shape[0]} embeddings")
        lo, hi = self._chunk_range(chunk_id)
        chunk_ids = self._ids[lo:hi]
        served = self._served_chunk
        if served is not None and served[0] == chunk_id and type(sample_ids) is list and sample_ids == served[1]:
            self._put(chunk_ids, new_embeddings)  # the whole chunk, as served: its rows, in order
            return
        ids = as_ids(sample_ids, "sample_ids")
        if not (len(ids) == len(chunk_ids) and np.array_equal(ids, chunk_ids)):
            outside = ids[~np.isin(ids, chunk_ids)]
            if len(outside):
                shown = ", ".join(map(str, outside[:10].tolist()))
                raise InvalidInputError(f"update_embeddings_by_chunk({chunk_id}): sample ids {shown} are not in "
                                        "that chunk; use update_embeddings for rows of several chunks")
        self._put(ids, new_embeddings)

    # ----------------------------------------------------------------- syncing
    def _commit(self) -> None:
        dirty = self._updates_since_sync > 0
        self._store.commit()
        self._updates_since_sync = 0
        self._pending_rows = 0
        if dirty:
            self._sync_operations += 1

    def sync_dirty_chunks_to_disk(self) -> None:
        """Commit every update so far (one atomic, synced LMDB transaction)."""
        self._commit()

    def force_sync_all_chunks(self) -> None:
        """The epoch-end commit: every update so far becomes durable."""
        if self._updates_since_sync:
            log.debug("committing %d pending updates", self._updates_since_sync)
        self._commit()

    def enable_auto_sync(self, enabled: bool = True) -> None:
        """Switch automatic commits on or off; switching on commits the current state at once."""
        self.auto_sync = bool(enabled)
        log.info("auto-sync %s", "enabled" if enabled else "disabled")
        if enabled:
            self._commit()

    def save_final_embeddings(self, save_dir=None) -> None:
        """Commit; with ``save_dir``, also copy the store there and continue working on the copy."""
        self._commit()
        if save_dir is None or Path(save_dir).resolve() == self.embeddings_dir.resolve():
            log.info("final embeddings committed to %s", self.store_path)
            return
        new_dir = Path(save_dir)
        new_dir.mkdir(parents=True, exist_ok=True)
        target = self._store_path(new_dir)
        if environment.is_open_here(target) or holder_pid(target) is not None:
            raise EmbeddingStoreError(f"{target} is open (pid {holder_pid(target) or os.getpid()}); close the "
                                      "manager or store using it before saving there")
        _copy_committed_store(self.store_path, target)
        self._store.close()
        self.embeddings_dir = new_dir
        self._store = EmbeddingStore.open(target, **self._cache_options(len(self._ids), self.chunk_size))
        if self.storage_mode == "memory":
            self._load_all()
        log.info("final embeddings saved to %s", target)

    # ------------------------------------------------------------------- stats
    def get_cache_performance(self) -> dict:
        """Chunk-cache counters, with the original's keys."""
        s = self._store.stats()
        lookups = s["l1_hits"] + s["l1_misses"]
        l1_used, l2_used, l1_max, l2_max = self._tier_bytes(s)
        return {
            "cache_hit_rate": s["hit_rate"],
            "total_requests": lookups,
            "disk_load_ratio": s["chunks_loaded"] / lookups if lookups else 0.0,
            "sync_operations": self._sync_operations,
            "l1_usage_percent": l1_used / l1_max * 100 if l1_max else 0.0,
            "l2_usage_percent": l2_used / l2_max * 100 if l2_max else 0.0,
        }

    def _tier_bytes(self, s: dict) -> tuple[int, int, int, int]:
        chunk_bytes = self.chunk_size * self.embedding_dim * self._store.dtype.itemsize
        opts = self._cache_options(len(self._ids), self.chunk_size, self._store.dtype.itemsize)
        return (s["l1_chunks"] * chunk_bytes, s["l2_chunks"] * chunk_bytes,
                int(opts["l1_mb"] * _MIB), int(opts["l2_mb"] * _MIB))

    def optimize_cache_settings(self, batch_size: int) -> None:
        """Set ``sync_batch_size`` from the training batch size (the original's rule)."""
        recommended = max(5, min(as_positive_int(batch_size, "batch_size") // 4, 20))
        if recommended != self.sync_batch_size:
            log.info("sync_batch_size %d -> %d", self.sync_batch_size, recommended)
            self.sync_batch_size = recommended

    def get_disk_usage_info(self) -> dict:
        """Disk and cache figures, with the original's keys (chunk sizes are the raw row bytes)."""
        s = self._store.stats()
        itemsize = self._store.dtype.itemsize
        l1_used, l2_used, l1_max, l2_max = self._tier_bytes(s)
        chunk_details = {}
        for c in range(self.num_chunks):
            n = min(self.chunk_size, len(self._ids) - c * self.chunk_size)
            chunk_details[c] = {"file": os.path.basename(self.store_path),
                                "size_mb": n * self.embedding_dim * itemsize / _MIB, "sample_count": n}
        hits, misses = s["l1_hits"] + s["l2_hits"], s["l2_misses"]
        return {
            "embeddings_dir": str(self.embeddings_dir),
            "store_path": self.store_path,
            "total_size_mb": dir_size(self.store_path) / _MIB,
            "num_chunks": self.num_chunks,
            "chunk_details": chunk_details,
            "storage_mode": self.storage_mode,
            "auto_sync": self.auto_sync,
            "sync_batch_size": self.sync_batch_size,
            "cache_info": {
                "l1_items": s["l1_chunks"], "l1_size_mb": l1_used / _MIB, "l1_max_mb": l1_max / _MIB,
                "l2_items": s["l2_chunks"], "l2_size_mb": l2_used / _MIB, "l2_max_mb": l2_max / _MIB,
                "l3_enabled": self.enable_l3_cache,
                # chunks that left L1 = chunks brought in minus chunks still there
                "stats": {"hits": hits, "misses": misses,
                          "evictions": max(0, s["chunks_loaded"] + s["l2_hits"] - s["l1_chunks"])},
                "hit_rate": s["hit_rate"],
            },
            "performance_stats": {"cache_hits": hits, "cache_misses": misses, "disk_loads": s["chunks_loaded"],
                                  "sync_operations": self._sync_operations},
            "dirty_chunks_count": s["dirty_chunks"],
            "pending_updates_count": self._pending_rows,
        }

    def get_embedding_statistics(self) -> dict:
        """Norm and per-dimension statistics of all rows (one streaming pass, bounded memory)."""
        return embedding_statistics(self._store, self._ids)

    # --------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Release the store. Pending updates are committed if ``auto_sync`` is on, else discarded."""
        if self._closed or self._store is None:
            return
        try:
            if self._updates_since_sync:
                if self.auto_sync:
                    self._commit()
                else:
                    log.info("close(): discarding %d uncommitted updates (auto_sync is off; call "
                             "force_sync_all_chunks() to keep them)", self._updates_since_sync)
                    self._store.rollback()
        finally:
            self._store.close()
            self._closed = True

    def __enter__(self) -> TrainableEmbeddingManager:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self._closed and self._store is not None:
            self._store.rollback()
            self._updates_since_sync = 0
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._ids)} x {self.embedding_dim}"
        return f"TrainableEmbeddingManager({str(self.embeddings_dir)!r}, {self.storage_mode}, {state})"


def _last_wins(ids: np.ndarray, values):
    """Drop all but the last occurrence of repeated IDs (vectorized; no-op without repeats)."""
    if len(ids) < 2:
        return ids, values
    uniq, first_in_reversed = np.unique(ids[::-1], return_index=True)
    if len(uniq) == len(ids):
        return ids, values
    keep = np.sort(len(ids) - 1 - first_in_reversed)
    arr = to_numpy(values)
    if len(arr) != len(ids):
        return ids, values  # let put() report the shape error
    return ids[keep], np.asarray(arr)[keep]


def _copy_committed_store(src: str, target: str) -> None:
    """Consistent compacted copy of the committed state of ``src`` at ``target`` (built beside, swapped in)."""
    with StagedStore(target, "saving") as stage:
        shared = environment.acquire(src, write=False)
        try:
            shared.env.copy(stage.tmp, compact=True)
        finally:
            environment.release(shared)
        fd = os.open(os.path.join(stage.tmp, DATA_FILE), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(stage.tmp)
        stage.swap_in(replace=True)
