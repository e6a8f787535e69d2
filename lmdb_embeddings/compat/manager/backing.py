"""What a manager holds: its place on the shared store, the row order its caller sees, the memory-mode Parameter.

The store is shared by every manager of this process on the same directory
(:mod:`~lmdb_embeddings.compat.manager.sharing`), which also keeps the counters of what is pending.
A table never refers back to its manager, so the manager's ``weakref.finalize`` can release
it when the manager is garbage-collected or the interpreter exits normally: pending updates
are committed when ``auto_sync`` is on and discarded (logged) when it is off. A crash loses
only what was not committed.

Memory mode (``storage_mode="memory"`` / ``mode="ram"``) keeps the rows in one
``nn.Parameter`` on ``device`` (what upstream callers index and hand to their optimizer);
every update goes to the Parameter and to the store (and into the other managers'
Parameters); writes made straight into the Parameter (``embeddings.data[...] = ...``, an
optimizer step) reach the store at the next full sync (:meth:`ManagedTable.reconcile`).
"""

from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
import torch
from torch import nn

from ...core.ids import IdIndex
from ...errors import ClosedError, InvalidInputError, UnknownIdError, UnknownSampleError
from ...inputs import as_ids, as_values, is_tensor
from ...store import EmbeddingStore
from . import sharing

log = logging.getLogger(__name__)

GROUP_BYTES = 32 << 20  # rows read or compared at once by whole-table passes
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


class ManagedTable:
    """The rows of one manager: ``view_ids`` is the order the caller sees, ``store_ids`` the store's row order."""

    def __init__(self, share, view_ids: np.ndarray | None, *, device, memory: bool, auto_sync: bool,
                 sync_batch_size: int):
        self.share = share
        store = share.store
        self.chunk_rows, self.dim, self.dtype = store.chunk_rows, store.dim, store.dtype
        self.store_ids = store.ids
        self.store_index = IdIndex(self.store_ids)
        if view_ids is None or np.array_equal(view_ids, self.store_ids):
            self.view_ids, self.view_index = self.store_ids, self.store_index
        else:
            self.view_ids, self.view_index = view_ids, IdIndex(view_ids)
        self.device = torch.device(device)
        self.auto_sync = auto_sync
        self.sync_batch_size = sync_batch_size
        self.updates_since_sync = 0
        self.closed = False
        self._pid = os.getpid()
        self.param = None
        if memory:  # managers with the same rows in the same order on the same device share one Parameter
            self.param = share.matching_param(self.view_ids, self.device)
            if self.param is None:
                self.param = nn.Parameter(self._read_view())

    # ------------------------------------------------------ the shared store
    @property
    def store(self) -> EmbeddingStore:
        return self.share.store

    @property
    def cache_options(self) -> dict:
        return self.share.cache_options

    @property
    def dirty(self) -> set[int]:
        """Store chunks changed (through any manager on the store) since the last commit."""
        return self.share.dirty

    @property
    def pending_rows(self) -> int:
        return self.share.pending_rows

    @property
    def sync_operations(self) -> int:
        return self.share.sync_operations

    # ----------------------------------------------------------------- layout
    @property
    def n_chunks(self) -> int:
        return -(-len(self.store_ids) // self.chunk_rows)

    def chunk_ids(self, chunk: int) -> np.ndarray:
        return self.store_ids[chunk * self.chunk_rows : (chunk + 1) * self.chunk_rows]

    def positions(self, ids) -> np.ndarray:
        """Rows of ``ids`` in the caller's order (``UnknownSampleError`` naming missing ones)."""
        try:
            return self.view_index.slots(as_ids(ids, "sample_ids"))
        except UnknownIdError as exc:
            raise UnknownSampleError(str(exc)) from None

    def groups(self, n: int):
        """``(lo, hi)`` row ranges of at most ``GROUP_BYTES``."""
        step = max(1, GROUP_BYTES // max(1, self.dim * self.dtype.itemsize))
        for lo in range(0, n, step):
            yield lo, min(n, lo + step)

    # ---------------------------------------------------------------- reading
    def get(self, ids) -> torch.Tensor:
        """Rows of ``ids`` on ``device``: autograd-linked rows of the Parameter in memory mode."""
        self._check_open()
        if self.param is not None:
            return self.param[self._index(self.positions(ids))]
        try:
            if self.device.type == "cpu":
                return torch.from_numpy(self.store.get(ids))
            return self.store.get_tensor(ids, device=self.device)
        except UnknownIdError as exc:
            raise UnknownSampleError(str(exc)) from None

    def get_all(self) -> torch.Tensor:
        """Every row in the caller's order, detached, on ``device``."""
        self._check_open()
        if self.param is not None:
            return self.param.detach().clone()
        return self.get(self.view_ids)

    def _index(self, positions: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(positions).to(self.device)

    def _read_view(self) -> torch.Tensor:
        dtype = torch.from_numpy(np.empty(0, self.dtype)).dtype
        data = torch.empty((len(self.view_ids), self.dim), dtype=dtype, device=self.device)
        for lo, hi in self.groups(len(self.view_ids)):
            data[lo:hi] = torch.from_numpy(self.store.get(self.view_ids[lo:hi])).to(self.device)
        return data

    # ---------------------------------------------------------------- writing
    def cast(self, values, n: int, call: str = "update_embeddings") -> np.ndarray:
        """``values`` as checked ``(n, dim)`` rows of the store dtype (bf16 and other torch floats included)."""
        if is_tensor(values):
            values = values.detach()
            if values.is_floating_point() and values.dtype not in _NUMPY_FLOATS:
                values = values.float()
        return as_values(values, n, self.dim, self.dtype, call)

    def put(self, ids, values, call: str = "update_embeddings") -> None:
        """One update: a repeated id keeps its last row; counts towards ``sync_batch_size``."""
        self._check_open()
        ids = as_ids(ids, "sample_ids")
        rows = self.cast(values, len(ids), call)
        try:
            self.write(ids, rows)
        except InvalidInputError:
            if len(ids) < 2 or len(np.unique(ids)) == len(ids):
                raise
            ids, rows = last_wins(ids, rows)  # repeated ids: write the last of each
            self.write(ids, rows)
        self.note_update()

    def write(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Write checked rows (store dtype, unique ids) to the store and to every manager's Parameter."""
        try:
            slots = self.store_index.slots(ids)
        except UnknownIdError as exc:
            raise UnknownSampleError(str(exc)) from None
        self.store.put(ids, rows)
        if self.param is not None:
            positions = slots if self.view_index is self.store_index else self.view_index.slots(ids)
            self.param.data[self._index(positions)] = torch.tensor(rows, device=self.device)
        self.share.wrote(self, ids, rows, slots)

    def mirror(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Rows another manager wrote into the store: into this Parameter too (ids not held here are skipped)."""
        positions, found = self.view_index.find(ids)
        if not found.all():
            positions, rows = positions[found], rows[found]
        if len(positions):
            self.param.data[self._index(positions)] = torch.tensor(rows, device=self.device)

    def note_update(self) -> None:
        self.updates_since_sync += 1
        self.share.updates += 1
        if self.auto_sync and self.updates_since_sync >= max(1, self.sync_batch_size):
            self.commit()

    @contextlib.contextmanager
    def bulk_write(self, what: str):
        """A whole-table write (an initialisation, a template load) that counts as one update.

        If it fails part-way and nothing was pending before, the table is rolled back to the
        last commit, so the failed call changes nothing.
        """
        self._check_open()
        self.reconcile()
        clean = self.share.updates == 0 and not self.share.dirty
        try:
            yield
        except BaseException:
            if clean:
                self.rollback()
            else:
                log.warning("%s failed part-way; the rows it wrote stay uncommitted, with the updates that were "
                            "pending before it", what)
            raise
        self.note_update()

    # ---------------------------------------------------------------- syncing
    def reconcile(self) -> int:
        """Memory mode: write the Parameter's rows that differ (bitwise) from the store's; the row count."""
        if self.param is None:
            return 0
        self._check_open()
        return self.reconcile_rows()

    def reconcile_rows(self) -> int:
        """:meth:`reconcile` without the open check (the finalizer's last commit uses it too)."""
        if self.param is None:
            return 0
        data = self.param.detach()
        if not bool(torch.isfinite(data).all()):
            raise InvalidInputError("manager.embeddings holds NaN or inf values; they cannot be saved (nothing was "
                                    "written)")
        as_bits = np.dtype(f"u{self.dtype.itemsize}")
        written = 0
        for lo, hi in self.groups(len(self.view_ids)):
            ids = self.view_ids[lo:hi]
            current = data[lo:hi].cpu().numpy()
            changed = (current.view(as_bits) != self.store.get(ids).view(as_bits)).any(1)
            if changed.any():
                ids, rows = ids[changed], current[changed]
                self.store.put(ids, rows)
                self.share.wrote(self, ids, rows, self.store_index.slots(ids))
                written += len(ids)
        return written

    def commit(self, full: bool = False) -> None:
        """One store commit of everything pending through every manager on the store (``full``: also what was
        written into their Parameters)."""
        self._check_open()
        self.share.commit(full)

    def rollback(self) -> None:
        """Forget every uncommitted change of every manager on the store (Parameters are reloaded in place)."""
        self.share.rollback()

    def reload(self) -> None:
        """The Parameter, reloaded in place from the store."""
        self.param.data.copy_(self._read_view())

    def own_param(self) -> None:
        """Stop sharing the Parameter: this table gets its own copy."""
        self.param = nn.Parameter(self.param.detach().clone())

    def replace_store(self, target: str) -> None:
        """Continue on the store at ``target``, a copy of the committed table (``save_final_embeddings``)."""
        sharing.move(self, target)

    # -------------------------------------------------------------- lifecycle
    def _check_open(self) -> None:
        if self.closed:
            raise ClosedError("this TrainableEmbeddingManager was closed; create a new one on its embeddings_dir")

    def close(self, discard: bool = False) -> None:
        """Commit pending changes (``auto_sync`` on) or leave them (off; discarded with the last manager on the
        store, or with ``discard``), then release the store. A failed commit raises and changes nothing."""
        if self.closed:
            return
        if self._pid != os.getpid():  # a forked child never touches its parent's store
            self.closed = True
            return
        sharing.release(self, discard)


def close_unreachable(table: ManagedTable) -> None:
    """``weakref.finalize`` callback of a manager that was garbage-collected or alive at interpreter exit."""
    if table.closed or table._pid != os.getpid():
        return
    try:
        sharing.release_unreachable(table)
    except Exception:  # nothing can be raised to anyone from a finalizer: say it
        log.exception("could not release the store %s of a TrainableEmbeddingManager that was not closed",
                      table.store.path)


def last_wins(ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keep only the last occurrence of each repeated id (vectorized)."""
    uniq, first_in_reversed = np.unique(ids[::-1], return_index=True)
    if len(uniq) == len(ids):
        return ids, rows
    keep = np.sort(len(ids) - 1 - first_in_reversed)
    return ids[keep], rows[keep]
