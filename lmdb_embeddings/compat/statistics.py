"""Whole-table statistics for the manager's ``get_embedding_statistics``: one streaming pass.

Means and variances are merged group by group (Chan et al.), so they stay exact even when
the spread is tiny next to the mean (e.g. unit-norm rows), and memory stays bounded.
"""

from __future__ import annotations

import numpy as np
import torch

from ..store import EmbeddingStore

GROUP_BYTES = 32 << 20  # rows decoded at once by whole-table passes


def embedding_statistics(store: EmbeddingStore, ids: np.ndarray) -> dict:
    """The original manager's statistics keys, over the rows of ``ids`` (float64 accumulation)."""
    n, dim = len(ids), store.dim
    dims, norms = _Moments(dim), _Moments(1)
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
        "mean_norm": float(norms.mean[0]),
        "std_norm": float(norms.std()[0]),
        "mean_values": cpu(dims.mean),
        "std_values": cpu(dims.std()),
        "min_values": cpu(lo_v),
        "max_values": cpu(hi_v),
        "num_frozen": 0,  # this manager has no frozen rows
        "total_samples": n,
    }


class _Moments:
    """Running count, mean and centered sum of squares per column, merged group by group."""

    def __init__(self, width: int):
        self.n = 0
        self.mean = np.full(width, np.nan)
        self.m2 = np.zeros(width)

    def add(self, rows: np.ndarray) -> None:
        k = len(rows)
        if k == 0:
            return
        mean = rows.mean(0)
        m2 = ((rows - mean) ** 2).sum(0)
        if self.n == 0:
            self.n, self.mean, self.m2 = k, mean, m2
            return
        total = self.n + k
        delta = mean - self.mean
        self.mean = self.mean + delta * (k / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.n * k / total)
        self.n = total

    def std(self) -> np.ndarray:
        """Unbiased standard deviation (torch.std's default); NaN for fewer than two rows."""
        return np.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else np.full(len(self.m2), np.nan)


