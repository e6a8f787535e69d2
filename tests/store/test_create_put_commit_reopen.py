"""A first end-to-end pass over the core API (the detailed suites live beside it)."""

from __future__ import annotations

import numpy as np

import lmdb_embeddings as le


def test_create_put_commit_reopen(store_path):
    with le.EmbeddingStore.create(store_path, 300, 8, chunk_rows=32) as store:
        store.put([5, 7], np.ones((2, 8), np.float32))
    with le.EmbeddingStore.open(store_path, readonly=True) as store:
        assert np.array_equal(store.get([7, 5]), np.ones((2, 8), np.float32))
        assert len(store) == 300
