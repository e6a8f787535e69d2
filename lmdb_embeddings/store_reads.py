"""RowReads: the part of an ``EmbeddingStore`` handle that reads rows, each call in ONE read of its session
(a reader: one short read transaction, caught up with the latest commit, so a call never mixes two commits)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .core.table import Column, Table
from .errors import InvalidInputError
from .format.records import MAIN
from .inputs import IdsLike, as_ids
from .optional import import_needing
from .store_base import StoreBase

if TYPE_CHECKING:  # the tensor API's types; torch itself is imported only when get_tensor is called
    import torch


class RowReads(StoreBase):
    """Rows of the main column and of auxiliary ones (a part of ``EmbeddingStore``: store_base.py)."""

    def get(self, ids: IdsLike) -> np.ndarray:
        """Rows of ``ids`` in order, as a fresh ``(len(ids), dim)`` array of the store dtype.

        Duplicates are allowed. A writable handle sees its own uncommitted puts; a
        read-only handle sees the latest commit, and one call never mixes two commits.

        Raises:
            KeyError: some IDs are not in the store (the message names some of them).
        """
        return self._gather(MAIN, ids)

    def get_tensor(self, ids: IdsLike, device: torch.device | str | int | None = None) -> torch.Tensor:
        """Like :meth:`get`, as a ``torch.Tensor`` on ``device`` (CUDA copies go through pinned memory);
        without torch, ``MissingDependencyError`` (an ``ImportError``) says how to install it."""
        return as_tensor(self.get(ids), device)

    def get_column(self, name: str, ids: IdsLike) -> np.ndarray:
        """Rows of an auxiliary column for ``ids`` (same rules as :meth:`get`)."""
        return self._gather(name, ids)

    def get_with_state(self, ids: IdsLike, column: str = MAIN) -> tuple[np.ndarray, dict]:
        """``(rows, {"commit", "rows", "attrs"})``: :meth:`get_column` and the state of the SAME read
        (a reader: the commit that served the rows; the sharded store checks its shards by it)."""
        ids = as_ids(ids)
        with self._mutex:
            session = self._active()

            def read() -> tuple[np.ndarray, dict]:
                table = session.table  # bound inside the read: it follows a store swapped in at the path
                rows = _gather_from(table, column, ids)
                return rows, {"commit": table.commit, "rows": table.rows, "attrs": dict(table.attrs)}

            return session.read(read)

    def prefetch(self, ids: IdsLike) -> None:
        """A hint that the rows of ``ids`` (all columns) will be needed soon: returns at once, changes nothing any
        call returns, ignores IDs not in the store (``core/prefetch.py``). Call it a batch ahead."""
        self._check_open()
        self._prefetcher.hint(as_ids(ids))

    def _gather(self, name: str, ids: IdsLike) -> np.ndarray:
        ids = as_ids(ids)
        with self._mutex:
            session = self._active()
            return session.read(lambda: _gather_from(session.table, name, ids))  # the table as the read finds it


def as_tensor(rows: np.ndarray, device: torch.device | str | int | None = None) -> torch.Tensor:
    """``rows`` as a torch tensor on ``device`` (CUDA copies go through pinned memory, non-blocking)."""
    torch = import_needing("torch", "torch", "get_tensor")  # the only part of the store that needs torch

    tensor = torch.from_numpy(rows)
    if device is None:
        return tensor
    device = torch.device(device)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _gather_from(table: Table, name: str, ids: np.ndarray) -> np.ndarray:
    return column_of(table, name).cache.gather(table.index.slots(ids))


def column_of(table: Table, name: str) -> Column:
    """The table's column ``name``, or a clear error."""
    column = table.columns.get(name)
    if column is None:
        raise InvalidInputError(f"no column {name!r}; declare it with ensure_column first")
    return column
