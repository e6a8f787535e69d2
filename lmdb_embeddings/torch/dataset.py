"""EmbeddingDataset: the store's rows as a map-style ``torch.utils.data.Dataset``.

DataLoader workers each get a pickled copy, which holds a read-only handle that reopens
lazily in the worker (fork, spawn or forkserver), so every worker reads the latest commit.
With a batch sampler, DataLoader calls ``__getitems__`` with a whole batch of indices:
that is ONE ``get`` (one read transaction, one fancy index) instead of one per row.
Indexing follows ``TensorDataset``: an int gives one row, a list, array, tensor or slice of
positions gives those rows stacked, negative positions count from the end, and a position
out of range is an ``IndexError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import PositionError, UnknownIdError
from ..inputs import IdsLike, as_ids, to_numpy
from ..store import EmbeddingStore

#: positions in the dataset: an int, a slice, or a sequence / numpy array / tensor of ints (or a bool mask)
Index = int | np.integer | slice | Sequence[int] | np.ndarray | torch.Tensor


class EmbeddingDataset(Dataset[torch.Tensor]):
    """``ds[i]`` is the row of ``ids[i]`` as a ``(dim,)`` tensor (the store's dtype); ``ds[[i, j]]`` is ``(2, dim)``.

    Args:
        store: an open :class:`~lmdb_embeddings.EmbeddingStore` (writer or reader).
        ids: the sample IDs to serve, in order (default: ``store.ids`` at construction).

    Raises:
        KeyError: some of ``ids`` are not in the store (``UnknownIdError``, naming them).

    Example:
        >>> ds = EmbeddingDataset(store)
        >>> loader = DataLoader(ds, batch_size=256, shuffle=True, num_workers=4)
    """

    def __init__(self, store: EmbeddingStore, ids: IdsLike | None = None):
        self.store = store
        if ids is None:
            self.ids = store.ids
        else:
            self.ids = as_ids(ids, "EmbeddingDataset ids").copy()
            known = store.contains(self.ids)
            if not known.all():
                missing = self.ids[~known]
                raise UnknownIdError(
                    f"EmbeddingDataset: {len(missing)} of the ids are not in the store {store.path} "
                    f"(e.g. {missing[:5].tolist()}); pass IDs of the store (store.ids lists them)")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: Index) -> torch.Tensor:
        """The row at position ``index`` (``(dim,)``), or the rows of a list/array/tensor/slice of positions."""
        try:
            selected = self.ids[_positions(index)]
        except IndexError as exc:  # as a tensor says it, as one of ours
            raise PositionError(f"EmbeddingDataset: {exc} (the dataset has {len(self.ids)} rows)") from None
        rows = torch.from_numpy(self.store.get(np.ravel(selected)))
        return rows.reshape(*np.shape(selected), rows.shape[1])

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """The rows of a whole batch of positions from ONE ``get`` (DataLoader collates the list)."""
        rows = self[indices if isinstance(indices, (np.ndarray, torch.Tensor)) else list(indices)]
        return list(rows.reshape(-1, rows.shape[-1]).unbind(0))

    def __repr__(self) -> str:
        return f"EmbeddingDataset({self.store.path!r}, {len(self)} rows)"


def _positions(index: Any) -> Any:
    """``index`` as numpy indexes a 1-D array: numpy's rules are the tensor's for these kinds of index."""
    return to_numpy(index) if isinstance(index, torch.Tensor) else index
