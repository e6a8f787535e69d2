"""Whole-table statistics for the manager's ``get_embedding_statistics``: one streaming pass.

Means and variances are merged group by group (Chan et al., the PCA's
:class:`~lmdb_embeddings.compat.init.pca.StreamingMoments`), so they stay exact even when the
spread is tiny next to the mean (e.g. unit-norm rows), and memory stays bounded.
"""

from __future__ import annotations

import numpy as np
import torch

from ...store import EmbeddingStore
from ..init.pca import StreamingMoments
from .backing import GROUP_BYTES


def embedding_statistics(store: EmbeddingStore, ids: np.ndarray) -> dict:
    """The original manager's statistics keys, over the rows of ``ids`` (float64 accumulation)."""
    n, dim = len(ids), store.dim
    dims, norms = StreamingMoments(full=False), StreamingMoments(full=False)
    lo_v = np.full(dim, np.inf)
    hi_v = np.full(dim, -np.inf)
    step = max(1, GROUP_BYTES // (dim * 8))
    for lo in range(0, n, step):
        rows = store.get(ids[lo : lo + step]).astype(np.float64)
        dims.add(rows)
        norms.add(np.sqrt((rows * rows).sum(1, keepdims=True)))
        np.minimum(lo_v, rows.min(0), out=lo_v)
        np.maximum(hi_v, rows.max(0), out=hi_v)

    def cpu(a):
        return torch.from_numpy(np.asarray(a, dtype=store.dtype))

    return {
        "mean_norm": float(_mean(norms, 1)[0]),
        "std_norm": float(_std(norms, 1)[0]),
        "mean_values": cpu(_mean(dims, dim)),
        "std_values": cpu(_std(dims, dim)),
        "min_values": cpu(lo_v),
        "max_values": cpu(hi_v),
        "num_frozen": 0,  # this manager has no frozen rows
        "total_samples": n,
    }


def _mean(moments: StreamingMoments, width: int) -> np.ndarray:
    return moments.mean if moments.n else np.full(width, np.nan)


def _std(moments: StreamingMoments, width: int) -> np.ndarray:
    """Unbiased standard deviation (torch.std's default); NaN for fewer than two rows."""
    return np.sqrt(moments.scatter / (moments.n - 1)) if moments.n > 1 else np.full(width, np.nan)
