"""Drop-in replacement for CoSiR's ``TrainableEmbeddingManager``, built on :class:`EmbeddingStore`.

Upstream kept one ``torch.save`` file per chunk (2025-09 .. 2026-04-06) or an ``np.memmap``
(2026-04-07 on) and rewrote files on every sync or update. This class accepts the
constructor calls of every upstream version (``manager_args``), provides their methods and
attributes (``attributes``) and maps them onto one store:

* the manager's chunk ``c`` is the store's chunk ``c`` (``chunk_size`` -> ``chunk_rows``), so a
  chunk-by-chunk loop is one vectorized get/put of contiguous rows;
* a "sync" is one store commit: every change since the last one, in one synced LMDB transaction;
* ``storage_mode="memory"`` (``mode="ram"``) keeps the rows in one ``nn.Parameter`` on
  ``device`` (``manager.embeddings``), persisted through the store; ``"disk"`` (``"mmap"``)
  keeps only what the L1/L2 caches hold.

The store lives in ``embeddings_dir/embeddings.lmdb`` (or in ``embeddings_dir`` itself when
that directory already is a store); upstream files found there are imported once and left
as they are. The initialisations (``cosir_init``), templates and phase-1 loads
(``templates``) and the figures (``reports``) live in their own modules.
"""

from __future__ import annotations

import logging
import tempfile
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import InvalidInputError, UnknownChunkError
from ...format.init import INIT_KINDS
from ...inputs import IdsLike, ValuesLike, as_ids, as_positive_int
from ...store import EmbeddingStore
from ..files import export_cosir
from ..init import cosir_init
from . import manager_args, sharing
from .attributes import UpstreamAttributes
from .backing import ManagedTable, UnknownSampleError, close_unreachable
from .reports import cache_performance, disk_usage
from .statistics import embedding_statistics
from .table_dir import check_new_table_strategy, copy_committed_store, existing_table, store_path_in
from .templates import check_template_config, load_rows, store_template, template_dir, write_memmap_dir

log = logging.getLogger(__name__)

SAVE_FORMATS = ("lmdb", "cosir", "memmap")

__all__ = ["TrainableEmbeddingManager", "UnknownSampleError", "UnknownChunkError"]


class TrainableEmbeddingManager(UpstreamAttributes):
    """Per-sample trainable embeddings with the upstream managers' interface, stored in LMDB.

    Args (both upstream signatures, see :mod:`~lmdb_embeddings.compat.manager.manager_args`):
        sample_ids: the sample IDs. Rows are kept sorted by ID (chunk-style calls, as the
            chunk-file managers did) or in the caller's order (``mode=`` or a positional
            ``embeddings_dir``, as the memmap manager did).
        embedding_dim: row width.
        device: where returned tensors (and memory mode's Parameter) live; default ``"cuda"``
            if available else ``"cpu"`` (memmap-style calls: ``"cpu"``).
        initialization_strategy: for a new table ``"normal"`` (N(0, 0.01^2)), ``"zeros"``,
            ``"uniform"``, ``"xavier"`` or ``"kaiming"``, from a seeded generator (``seed``, or
            ``torch.initial_seed()``); any name when ``embeddings_dir`` already holds a table
            (eval scripts reopen with ``"random"``). PCA/projection inits: :meth:`initialize`.
        storage_mode / mode: ``"memory"``/``"ram"`` or ``"disk"``/``"mmap"``.
        embeddings_dir: the store's directory (None: a new temporary directory). A store there
            is resumed; upstream ``embeddings_chunk_*.pt`` or ``embeddings.npy`` files are
            imported first.
        chunk_size: rows per chunk (default ``min(1000, len(sample_ids))``);
            ``feature_manager.chunk_size`` wins when given. A resumed store keeps its own.
        auto_sync: commit every ``sync_batch_size`` updates (0 or 1: after every update);
            False: only in ``force_sync_all_chunks`` / ``sync_dirty_chunks_to_disk`` /
            ``save_final_embeddings``.
        cache_l1_size_mb / cache_l2_size_mb: the store's L1 and L2 budgets, disk mode.
        enable_l3_cache: accepted; the OS page cache under LMDB's memory map is the third tier.
        seed: extension: seed of the initial values.

        mode: ``"ram"`` or ``"mmap"``: a memmap-style call (2026-04 on), whose defaults are
            ``initialization_strategy="zeros"``, ``device="cpu"``, ``storage_mode=None``; its
            third positional argument is ``embeddings_dir``.

    Managers of one process on one ``embeddings_dir`` share one writable store
    (:mod:`~lmdb_embeddings.compat.manager.sharing`): each sees the others' rows, uncommitted ones
    included, and a sync through any of them commits everything pending. ``close()`` (or
    leaving a ``with`` block, or the manager being garbage-collected, or the interpreter
    exiting normally) commits pending updates when ``auto_sync`` is on; when it is off they
    are discarded with the last manager on the store. Nothing is printed; messages go
    through ``logging``.
    """

    def __init__(self, sample_ids: IdsLike, embedding_dim: int, *args: Any, **kwargs: Any) -> None:
        a = manager_args.parse(sample_ids, embedding_dim, args, kwargs)
        directory = a.embeddings_dir
        found = existing_table(directory) if directory is not None else None
        if found is None:
            check_new_table_strategy(a.strategy)
        elif a.strategy not in INIT_KINDS:
            log.debug("initialization_strategy=%r is not used: %s already holds a table", a.strategy, directory)
        if directory is None:
            directory = Path(tempfile.mkdtemp(prefix="embeddings_"))
        directory.mkdir(parents=True, exist_ok=True)
        self._seed = a.seed if a.seed is not None else torch.initial_seed() % (1 << 63)

        def build(share) -> ManagedTable:
            view = _caller_view(a.ids, share.store) if a.caller_order else None
            return ManagedTable(share, view, device=a.device, memory=a.memory, auto_sync=a.auto_sync,
                                sync_batch_size=a.sync_batch_size)

        self._table = sharing.open_managed(directory, found, a, self._seed, build)
        store = self._table.store
        self._finalizer = weakref.finalize(self, close_unreachable, self._table)
        self._args = a
        self._embeddings_dir = directory
        self._derived: dict = {}
        self._served_chunk: tuple[int, list] | None = None
        log.info("TrainableEmbeddingManager on %s: %d rows x %d, chunk_size %d, %s mode, %s order, auto_sync=%s "
                 "(every %d updates)", store.path, len(self._table.view_ids), a.embedding_dim, store.chunk_rows,
                 a.storage_mode, "caller's" if a.caller_order else "sorted", a.auto_sync, a.sync_batch_size)

    __init__.__signature__ = manager_args.init_signature()

    def __len__(self) -> int:
        return len(self._table.view_ids)

    # ------------------------------------------------------------- rows by id
    def get_embeddings(self, sample_ids: IdsLike) -> torch.Tensor:
        """Rows of ``sample_ids`` (in order) on ``device``; memory mode: autograd-linked rows of ``embeddings``."""
        return self._table.get(sample_ids)

    def update_embeddings(self, sample_ids: IdsLike, new_embeddings: ValuesLike) -> None:
        """Overwrite rows (any float dtype, any device; a repeated ID keeps its last row)."""
        self._table.put(sample_ids, new_embeddings)

    def get_all_embeddings(self) -> tuple[list, torch.Tensor]:
        """``(sample_ids, rows)`` of every row in row order (``sample_ids``' order), detached, on ``device``."""
        return list(self.sample_ids), self._table.get_all()

    # ---------------------------------------------------------- rows by chunk
    def _chunk_range(self, chunk_id) -> tuple[int, int]:
        if isinstance(chunk_id, bool) or not isinstance(chunk_id, (int, np.integer)):
            raise InvalidInputError(f"chunk_id must be an int, got {chunk_id!r}")
        n_chunks = self._table.n_chunks
        if not 0 <= chunk_id < n_chunks:
            raise UnknownChunkError(f"No samples found for chunk {chunk_id}: chunks are 0..{n_chunks - 1}")
        lo = int(chunk_id) * self._table.chunk_rows
        return lo, min(lo + self._table.chunk_rows, len(self._table.store_ids))

    def get_embeddings_by_chunk(self, chunk_id) -> tuple[list, torch.Tensor]:
        """``(sample_ids, rows)`` of one chunk: one contiguous run of store rows, one vectorized read."""
        lo, hi = self._chunk_range(chunk_id)
        ids = self._table.store_ids[lo:hi]
        listed = ids.tolist()
        self._served_chunk = (int(chunk_id), listed.copy())  # lets the matching update skip its id checks
        return listed, self._table.get(ids)

    def update_embeddings_by_chunk(self, chunk_id, sample_ids, new_embeddings) -> None:
        """Write rows of one chunk (all of it, as returned by :meth:`get_embeddings_by_chunk`, or part)."""
        if len(sample_ids) != len(new_embeddings):
            raise InvalidInputError(
                f"Length mismatch: {len(sample_ids)} sample_ids vs {len(new_embeddings)} embeddings")
        lo, hi = self._chunk_range(chunk_id)
        chunk_ids = self._table.store_ids[lo:hi]
        served = self._served_chunk
        if served is not None and served[0] == chunk_id and type(sample_ids) is list and sample_ids == served[1]:
            self._table.put(chunk_ids, new_embeddings, "update_embeddings_by_chunk")  # the chunk as served
            return
        ids = as_ids(sample_ids, "sample_ids")
        if not (len(ids) == len(chunk_ids) and np.array_equal(ids, chunk_ids)):
            outside = ids[~np.isin(ids, chunk_ids)]
            if len(outside):
                shown = ", ".join(map(str, outside[:10].tolist()))
                raise InvalidInputError(f"update_embeddings_by_chunk({chunk_id}): sample ids {shown} are not in "
                                        "that chunk; use update_embeddings for rows of several chunks")
        self._table.put(ids, new_embeddings, "update_embeddings_by_chunk")

    # ----------------------------------------------------------------- syncing
    def sync_dirty_chunks_to_disk(self) -> None:
        """Commit every update so far (one atomic, synced LMDB transaction)."""
        self._table.commit(full=True)

    def force_sync_all_chunks(self) -> None:
        """The epoch-end commit: every update so far (memory mode: every row of ``embeddings``) becomes durable."""
        self._table.commit(full=True)

    def _save_all_chunks_to_disk(self) -> None:
        """The 2026-04-20 manager's epoch-end save: the same commit as :meth:`force_sync_all_chunks`."""
        self._table.commit(full=True)

    def enable_auto_sync(self, enabled: bool = True) -> None:
        """Switch automatic commits on or off; switching on commits the current state at once."""
        self._table.auto_sync = bool(enabled)
        log.info("auto-sync %s", "enabled" if enabled else "disabled")
        if enabled:
            self._table.commit(full=True)

    def save_final_embeddings(self, save_dir=None, format: str = "lmdb") -> None:  # noqa: A002 - upstream-style keyword
        """Commit; with ``save_dir``, also write the table there.

        ``format="lmdb"`` (default): a compacted copy of the store in ``save_dir`` (``save_dir/
        embeddings.lmdb``), and the manager continues on the copy; ``"cosir"``: the original
        ``embeddings_chunk_*.pt`` files (as ``lmdb-embeddings export-cosir``); ``"memmap"``: the
        2026-04 ``embeddings.npy`` + ``sample_ids.npy`` + ``metadata.json``. With the last two the
        manager keeps working on its own store. Every format reopens with a manager on ``save_dir``
        and loads with :meth:`load_phase_1_template`.
        """
        if format not in SAVE_FORMATS:
            raise InvalidInputError(f"save_final_embeddings: format must be one of {', '.join(SAVE_FORMATS)}, "
                                    f"got {format!r}")
        self._table.commit(full=True)
        if save_dir is None:
            if format != "lmdb":
                raise InvalidInputError(f"save_final_embeddings(format={format!r}) needs a save_dir")
            log.info("final embeddings committed to %s", self.store_path)
            return
        new_dir = Path(save_dir)
        if format == "cosir":
            export_cosir(self.store_path, new_dir, overwrite=True)
        elif format == "memmap":
            write_memmap_dir(self._table, new_dir)
        elif new_dir.resolve() != self._embeddings_dir.resolve():
            new_dir.mkdir(parents=True, exist_ok=True)
            target = store_path_in(new_dir)
            copy_committed_store(self.store_path, target)
            self._table.replace_store(target)
            self._embeddings_dir = new_dir
        log.info("final embeddings saved to %s (%s)", new_dir, format)

    def _copy_to(self, dest_dir) -> None:
        """The 2026-04 manager's save: ``embeddings.npy``, ``sample_ids.npy`` (row order), ``metadata.json``."""
        write_memmap_dir(self._table, dest_dir)

    # ------------------------------------------------------ initialisations
    def initialize(self, strategy, feature_manager=None, model=None, device="cpu", factor=1.0,
                   normalize=False) -> None:
        """Set every row: ``zeros``/``normal``/``uniform``/``xavier``/``kaiming``, or ``imgtxt``/``txt``/``img``
        from the feature manager's features (:mod:`~lmdb_embeddings.compat.init.cosir_init` says which method)."""
        cosir_init.check_strategy(strategy)
        if strategy in INIT_KINDS:
            cosir_init.fill(self._table, strategy, self._seed)
        else:
            cosir_init.from_features(self._table, strategy, feature_manager, model, device, factor, normalize)

    def initialize_embeddings_imgtxt(self, feature_manager, model=None, device="cpu", factor=1,
                                     normalize=False) -> None:
        """Rows from ``img - txt`` features: PCA or the model's label projection (see :meth:`initialize`)."""
        cosir_init.from_features(self._table, "imgtxt", feature_manager, model, device, factor, normalize)

    def initialize_embeddings_txt(self, feature_manager, model=None, device="cpu", factor=1, normalize=False) -> None:
        """Rows from the text features (see :meth:`initialize_embeddings_imgtxt`)."""
        cosir_init.from_features(self._table, "txt", feature_manager, model, device, factor, normalize)

    def initialize_embeddings_img(self, feature_manager, model=None, device="cpu", factor=1, normalize=False) -> None:
        """Rows from the image features (see :meth:`initialize_embeddings_imgtxt`)."""
        cosir_init.from_features(self._table, "img", feature_manager, model, device, factor, normalize)

    # ------------------------------------------------------------ templates
    def store_imgtxt_template(self, strategy: str = "", factor=1.0, normalize: bool = False) -> None:
        """Write the current rows to ``embeddings_dir/../../template_embeddings`` (both upstream layouts)."""
        store_template(self._table, template_dir(self._embeddings_dir), strategy, factor, normalize)

    def load_imgtxt_template(self, strategy: str = "", factor=1.0, normalize: bool = False) -> None:
        """Load the template by sample id; with ``strategy``, a stored config that differs raises
        :class:`~lmdb_embeddings.TemplateIncompatibleError` and changes nothing."""
        directory = template_dir(self._embeddings_dir)
        check_template_config(directory, self._table.dim, strategy, factor, normalize)
        load_rows(self._table, directory, "load_imgtxt_template")

    def load_phase_1_template(self, path) -> None:
        """Load the rows of a phase-1 result (our store, chunk files or memmap files) by sample id."""
        load_rows(self._table, path, "load_phase_1_template")

    # ------------------------------------------------------------------- stats
    def get_cache_performance(self) -> dict:
        """Chunk-cache counters, with the original's keys."""
        return cache_performance(self._table)

    def optimize_cache_settings(self, batch_size: int) -> None:
        """Set ``sync_batch_size`` from the training batch size (the 2025-09 manager's rule)."""
        recommended = max(5, min(as_positive_int(batch_size, "batch_size") // 4, 20))
        if recommended != self.sync_batch_size:
            log.info("sync_batch_size %d -> %d", self.sync_batch_size, recommended)
            self.sync_batch_size = recommended

    def get_disk_usage_info(self) -> dict:
        """Disk and cache figures, with the original's keys (chunk sizes are the raw row bytes)."""
        return disk_usage(self._table, self._embeddings_dir, self._args.storage_mode, self._args.enable_l3_cache)

    def get_embedding_statistics(self) -> dict:
        """Norm and per-dimension statistics of all rows (one streaming pass, bounded memory)."""
        self._table.reconcile()
        return embedding_statistics(self._table.store, self._table.view_ids)

    # --------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Release the store; with ``auto_sync`` on, commit everything pending first.

        With ``auto_sync`` off the updates not synced are discarded when this is the last manager
        on the store, and left to the others otherwise. A close whose commit fails (a full disk)
        raises and changes nothing: the manager stays usable and ``close()`` can be called again.
        """
        self._table.close()
        self._finalizer.detach()

    def __enter__(self) -> TrainableEmbeddingManager:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._table.close(discard=exc_type is not None)  # an exception: nothing is committed
        self._finalizer.detach()

    def __repr__(self) -> str:
        state = "closed" if self._table.closed else f"{len(self)} x {self._args.embedding_dim}"
        return f"TrainableEmbeddingManager({str(self._embeddings_dir)!r}, {self._args.storage_mode}, {state})"


def _caller_view(ids: np.ndarray, store: EmbeddingStore) -> np.ndarray:
    """The caller's ids, then any the store holds beyond them (kept and managed too), in store order."""
    store_ids = store.ids
    extra = store_ids[~np.isin(store_ids, ids)]
    return np.concatenate([ids, extra]) if len(extra) else ids
