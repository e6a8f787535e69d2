"""TableMetadata: the part of an ``EmbeddingStore`` handle that describes its table (shape, IDs, commit, columns,
attrs). A reader's answers are caught up with the latest commit; a writer's include its uncommitted changes."""

from __future__ import annotations

import numpy as np

from .errors import EmbeddingStoreError
from .format.records import MAIN
from .inputs import IdsLike, as_ids
from .store_base import StoreBase


class TableMetadata(StoreBase):
    """Properties of the table (a part of ``EmbeddingStore``: store_base.py)."""

    @property
    def dim(self) -> int:
        with self._mutex:
            return self._active().table.dim

    @property
    def dtype(self) -> np.dtype:
        with self._mutex:
            return self._active().table.dtype

    @property
    def chunk_rows(self) -> int:
        with self._mutex:
            return self._active().table.chunk_rows

    @property
    def ids(self) -> np.ndarray:
        """The sample IDs in row order (a copy)."""
        with self._mutex:
            return self._caught_up().index.ids_copy()

    def __len__(self) -> int:
        with self._mutex:
            return self._caught_up().rows

    def __contains__(self, sample_id: object) -> bool:
        with self._mutex:
            table = self._caught_up()
            try:
                ids = as_ids(sample_id)
            except EmbeddingStoreError:
                return False
            return len(ids) == 1 and bool(table.index.contains(ids)[0])

    def contains(self, ids: IdsLike) -> np.ndarray:
        """A bool array: which of ``ids`` are in the store (this handle's view, uncommitted adds included)."""
        ids = as_ids(ids)
        with self._mutex:
            return self._caught_up().index.contains(ids)

    @property
    def commit_count(self) -> int:
        """Number of commits the store has received since it was created."""
        with self._mutex:
            return self._caught_up().commit

    @property
    def uuid(self) -> str | None:
        """The table's identity: a new one at each ``create`` and ``restore``, kept by ``compact``
        (None for a store written before the format recorded it)."""
        with self._mutex:
            return self._active().config.get("store_uuid")

    @property
    def columns(self) -> dict:
        """Auxiliary columns: name -> {width, dtype, fill}."""
        with self._mutex:
            return {n: d for n, d in self._caught_up().describe_columns().items() if n != MAIN}

    @property
    def attrs(self) -> dict:
        """Small user metadata (msgpack-able), committed with the rows (e.g. optimizer step)."""
        with self._mutex:
            return dict(self._caught_up().attrs)
