"""The attributes upstream CoSiR callers read or assign on the manager, beside its methods.

Read: ``sample_ids``, ``id_to_index`` and ``embeddings`` (memory mode), ``chunk_mapping`` and
``id_to_chunk_index`` (plain dicts, pickled by train_cosir.py), ``dirty_chunks``,
``performance_stats``, ``cache``, ``mode``. Assigned: phase 2 assigns the pickled mappings
back. No assignment is silently ignored: an equal value is accepted, a different one (or
any assignment of what cannot change) raises an error saying what to do instead;
``auto_sync`` and ``sync_batch_size`` can be changed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import InvalidInputError, ReadOnlyAttributeError
from ...inputs import is_tensor, to_numpy
from .backing import ManagedTable
from .manager_args import ManagerArgs, check_sync_batch_size
from .reports import CacheView, performance_stats


def _read_only(name: str, get, hint: str, doc: str) -> property:
    """A property that cannot be assigned: assigning raises, saying what to do instead."""

    def refuse(self, value):
        raise ReadOnlyAttributeError(f"TrainableEmbeddingManager.{name} cannot be assigned: {hint}")

    return property(get, refuse, doc=doc)


def _equal_or_refused(name: str, build, hint: str, doc: str) -> property:
    """A derived mapping: reading builds it once (a plain dict/list); assigning an equal value is accepted."""

    def get(self):
        cache = self._derived
        if name not in cache:
            cache[name] = build(self._table)
        return cache[name]

    def assign(self, value):
        if not _same(value, get(self)):
            raise InvalidInputError(f"TrainableEmbeddingManager.{name}: the value assigned differs from this "
                                    f"manager's, which the store's layout fixes; {hint}")

    return property(get, assign, doc=doc)


def _same(value, current) -> bool:
    if isinstance(value, np.ndarray) or is_tensor(value):
        return np.array_equal(to_numpy(value), np.asarray(current))
    return bool(value == current)


def _chunk_mapping(table) -> dict:
    return {k: table.chunk_ids(k).tolist() for k in range(table.n_chunks)}


def _id_to_chunk_index(table) -> dict:
    slots = np.arange(len(table.store_ids))
    return dict(zip(table.store_ids.tolist(), zip((slots // table.chunk_rows).tolist(),
                                                  (slots % table.chunk_rows).tolist(), strict=True), strict=True))


def _id_to_index(table) -> dict:
    return dict(zip(table.view_ids.tolist(), range(len(table.view_ids)), strict=True))


class UpstreamAttributes:
    """Mixed into :class:`~lmdb_embeddings.compat.manager.TrainableEmbeddingManager`.

    It reads these attributes of the manager, and nothing else of it.
    """

    _table: ManagedTable      # the rows (and, through them, the store)
    _args: ManagerArgs        # the constructor's arguments, checked: fixed for the manager's life
    _embeddings_dir: Path     # the store's directory (``save_final_embeddings(dir)`` moves it)
    _derived: dict            # the mappings built on first read, by attribute name

    _REGROUP = ("create the manager with the chunk_size (and sample_ids) the mapping was made with, or export the "
                "table (lmdb-embeddings export-cosir) and import it with another --chunk-rows")

    embedding_dim = _read_only("embedding_dim", lambda self: self._args.embedding_dim,
                               "create a manager with another embedding_dim", "Row width.")
    device = _read_only("device", lambda self: self._args.device, "create a manager with another device",
                        "Where returned tensors live.")
    storage_mode = _read_only("storage_mode", lambda self: self._args.storage_mode,
                              "create a manager with another storage_mode", '"memory" or "disk".')
    enable_l3_cache = _read_only("enable_l3_cache", lambda self: self._args.enable_l3_cache,
                                 "it has no effect (the OS page cache is the third tier)",
                                 "Accepted for compatibility.")
    cache_l1_size_mb = _read_only("cache_l1_size_mb", lambda self: self._args.cache_l1_size_mb,
                                  "create a manager with another budget", "L1 budget, disk mode.")
    cache_l2_size_mb = _read_only("cache_l2_size_mb", lambda self: self._args.cache_l2_size_mb,
                                  "create a manager with another budget", "L2 budget, disk mode.")
    embeddings_dir = _read_only("embeddings_dir", lambda self: self._embeddings_dir,
                                "save_final_embeddings(dir) copies the table there and continues on it",
                                "The directory of the store.")

    chunk_mapping = _equal_or_refused("chunk_mapping", _chunk_mapping, _REGROUP,
                                      "``{chunk id: [sample ids]}`` in row order (a plain dict).")
    id_to_chunk_index = _equal_or_refused("id_to_chunk_index", _id_to_chunk_index, _REGROUP,
                                          "``{sample id: (chunk id, offset)}`` (a plain dict).")
    id_to_index = _equal_or_refused("id_to_index", _id_to_index, "the sample ids are fixed when the manager is created",
                                    "``{sample id: row of sample_ids / embeddings}`` (a plain dict).")
    sample_ids = _equal_or_refused("sample_ids", lambda table: table.view_ids.tolist(),
                                   "create a manager with other sample_ids",
                                   "Every managed sample id, in row order (sorted, or the caller's for "
                                   "mode=/positional-directory calls).")

    @property
    def chunk_size(self) -> int:
        """Rows per chunk (the store's ``chunk_rows``)."""
        return self._table.chunk_rows

    @chunk_size.setter
    def chunk_size(self, value) -> None:
        if value != self._table.chunk_rows:
            raise ReadOnlyAttributeError(f"TrainableEmbeddingManager.chunk_size cannot be changed: {self._REGROUP}")

    mode = _read_only("mode", lambda self: "ram" if self._table.param is not None else "mmap",
                      "create a manager with another mode / storage_mode",
                      '``"ram"`` (memory mode) or ``"mmap"`` (disk mode), the 2026-04 managers\' names.')
    embeddings = _read_only("embeddings", lambda self: self._table.param,
                            "write rows with update_embeddings(ids, rows) or into manager.embeddings.data[...]",
                            "Memory mode: the ``nn.Parameter`` ``(len(sample_ids), dim)`` on ``device`` holding every "
                            "row (the one to hand to an optimizer; row ``id_to_index[s]`` is sample ``s``). Disk mode: "
                            "None.")
    dirty_chunks = _read_only("dirty_chunks", lambda self: set(self._table.dirty),
                              "it follows the updates; sync_dirty_chunks_to_disk() empties it",
                              "Chunk ids changed by updates since the last sync (a copy).")
    performance_stats = _read_only("performance_stats", lambda self: performance_stats(self._table),
                                   "it is computed from the store's counters",
                                   "``cache_hits``, ``cache_misses``, ``disk_loads``, ``sync_operations``.")
    cache = _read_only("cache", lambda self: CacheView(self._table, self._args.enable_l3_cache),
                       "the store's caches are configured when the manager is created",
                       "The 2025-09 ``MultiTierCache`` calls: ``get_cache_info()``, ``adaptive_eviction()``.")
    store = _read_only("store", lambda self: self._table.store, "create a new manager on another embeddings_dir",
                       "The underlying :class:`EmbeddingStore` (writable handle, shared by every manager of this "
                       "process on the same directory: close the managers, not it).")
    store_path = _read_only("store_path", lambda self: self._table.store.path,
                            "create a new manager on another embeddings_dir", "The store's directory.")
    num_chunks = _read_only("num_chunks", lambda self: self._table.n_chunks, "it follows chunk_size",
                            "Number of chunks.")

    @property
    def auto_sync(self) -> bool:
        return self._table.auto_sync

    @auto_sync.setter
    def auto_sync(self, value) -> None:
        self._table.auto_sync = bool(value)

    @property
    def sync_batch_size(self) -> int:
        """Updates per automatic commit (0 commits after every update, as 1 does)."""
        return self._table.sync_batch_size

    @sync_batch_size.setter
    def sync_batch_size(self, value) -> None:
        self._table.sync_batch_size = check_sync_batch_size(value)
