"""EmbeddingDataset: the store's rows as a map-style ``torch.utils.data.Dataset``.

DataLoader workers each get a pickled copy, which holds a read-only handle that reopens
lazily in the worker (fork, spawn or forkserver), so every worker reads the latest commit.
With a batch sampler, DataLoader calls ``__getitems__`` with a whole batch of indices:
that is ONE ``get`` (one read transaction, one fancy index) instead of one per row.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..core.inputs import as_ids
from ..store import EmbeddingStore


class EmbeddingDataset(Dataset[torch.Tensor]):
    """``ds[i]`` is the row of ``ids[i]`` as a ``(dim,)`` tensor (the store's dtype).

    Args:
        store: an open :class:`~lmdb_embeddings.EmbeddingStore` (writer or reader).
        ids: the sample IDs to serve, in order (default: ``store.ids`` at construction).

    Example:
        >>> ds = EmbeddingDataset(store)
        >>> loader = DataLoader(ds, batch_size=256, shuffle=True, num_workers=4)
    """

    def __init__(self, store: EmbeddingStore, ids=None):
        self.store = store
        self.ids = store.ids if ids is None else as_ids(ids, "ids").copy()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index) -> torch.Tensor:
        return torch.from_numpy(self.store.get(self.ids[index])[0])

    def __getitems__(self, indices) -> list[torch.Tensor]:
        """The rows of a whole batch of indices from ONE ``get`` (DataLoader collates the list)."""
        rows = torch.from_numpy(self.store.get(self.ids[np.asarray(indices, dtype=np.int64)]))
        return list(rows.unbind(0))

    def __repr__(self) -> str:
        return f"EmbeddingDataset({self.store.path!r}, {len(self)} rows)"
