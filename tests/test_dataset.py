"""EmbeddingDataset: a map-style Dataset over the rows; a batch is ONE get; it pickles into workers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import lmdb_embeddings as le


class _CountingStore:
    def __init__(self, store):
        self.store, self.gets = store, []

    def get(self, ids):
        self.gets.append(len(np.atleast_1d(ids)))
        return self.store.get(ids)


def test_items_are_the_rows_of_the_ids_in_order(small_store):
    ids = small_store.ids[::-3]
    ds = le.EmbeddingDataset(small_store, ids)
    assert len(ds) == len(ids)
    assert torch.equal(ds[0], torch.from_numpy(small_store.get(ids[:1])[0]))
    assert torch.equal(ds[-1], torch.from_numpy(small_store.get(ids[-1:])[0]))
    assert ds[5].shape == (16,) and ds[5].dtype == torch.float32
    with pytest.raises(IndexError):
        ds[len(ids)]
    assert len(le.EmbeddingDataset(small_store)) == len(small_store)


def test_a_batch_sampler_fetches_a_batch_with_one_get(small_store):
    ds = le.EmbeddingDataset(small_store)
    ds.store = counting = _CountingStore(small_store)
    loader = DataLoader(ds, batch_size=100, shuffle=True, generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert counting.gets == [100] * 10  # one get per batch, none per row
    assert torch.equal(torch.sort(torch.cat(batches), dim=0)[0],
                       torch.sort(torch.from_numpy(small_store.get(small_store.ids)), dim=0)[0])


def test_unknown_ids_raise_key_error_and_bad_ids_are_refused(small_store):
    with pytest.raises(KeyError):
        le.EmbeddingDataset(small_store, [1, 2, 10**9])[2]
    with pytest.raises(ValueError):
        le.EmbeddingDataset(small_store, [[1, 2]])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_workers_read_the_latest_commit(small_store, context):
    ids = small_store.ids
    small_store.put(ids[:100], np.full((100, 16), 3.0, np.float32))
    small_store.commit()
    small_store.put(ids[:100], np.full((100, 16), 9.0, np.float32))  # uncommitted: workers must not see it
    ds = pickle.loads(pickle.dumps(le.EmbeddingDataset(small_store, ids[:200])))
    assert ds.store.readonly
    loader = DataLoader(le.EmbeddingDataset(small_store, ids[:200]), batch_size=50, num_workers=2,
                        multiprocessing_context=context)
    rows = torch.cat(list(loader)).numpy()
    assert np.all(rows[:100] == 3.0)
    assert np.array_equal(rows[100:], small_store.get(ids[100:200]))
