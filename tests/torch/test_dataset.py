"""EmbeddingDataset: a map-style Dataset over the rows; a batch is ONE get; it pickles into workers."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

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


# ------------------------------------------------------------------ indexing as TensorDataset
INDEXES = {
    "int": 3, "negative int": -1, "numpy int": np.int64(7), "0-d tensor": torch.tensor(5),
    "list": [1, 2, 3], "list with duplicates and negatives": [4, -1, 4], "empty list": [],
    "numpy array": np.array([9, 0, 2]), "tensor": torch.tensor([2, 5]),
    "int32 tensor": torch.tensor([1], dtype=torch.int32),
    "2-d tensor": torch.tensor([[1, 2], [3, 4]]), "slice": slice(1, 4), "open slice": slice(None, None, 7),
    "bool mask": np.arange(40) % 3 == 0, "bool tensor mask": torch.arange(40) % 5 == 0,
}


@pytest.mark.parametrize("index", INDEXES.values(), ids=INDEXES.keys())
def test_indexing_returns_the_rows_tensor_dataset_returns(small_store, index):
    """ds[[1, 2, 3]], ds[array], ds[tensor], ds[1:4] are those rows stacked, as TensorDataset (not ONE row)."""
    ids = small_store.ids[:40][::-1].copy()
    ds = le.EmbeddingDataset(small_store, ids)
    reference = TensorDataset(torch.from_numpy(small_store.get(ids)))
    got, want = ds[index], reference[index][0]
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got, want)


def test_a_batch_sampler_used_as_sampler_yields_whole_batches(small_store):
    """DataLoader(ds, sampler=BatchSampler(...), batch_size=None) hands ds a list per batch: (batch, dim) rows."""
    ds = le.EmbeddingDataset(small_store, small_store.ids[:10])
    loader = DataLoader(ds, sampler=BatchSampler(SequentialSampler(ds), 3, drop_last=False), batch_size=None)
    batches = list(loader)
    assert [tuple(b.shape) for b in batches] == [(3, 16), (3, 16), (3, 16), (1, 16)]
    assert torch.equal(torch.cat(batches), torch.from_numpy(small_store.get(small_store.ids[:10])))


@pytest.mark.parametrize("index", [1000, -1001, [0, 1000], 1.5, torch.tensor([1.0])],
                         ids=["past the end", "before the start", "in a list", "float", "float tensor"])
def test_bad_positions_raise_index_error_as_a_tensor_does(small_store, index):
    ds = le.EmbeddingDataset(small_store)
    with pytest.raises(IndexError) as info:
        ds[index]
    assert isinstance(info.value, le.EmbeddingStoreError)
    with pytest.raises(IndexError):
        TensorDataset(torch.zeros(1000, 2))[index]


def test_unknown_ids_are_refused_at_construction(small_store):
    with pytest.raises(KeyError, match="10000000") as info:
        le.EmbeddingDataset(small_store, [1, 2, 10**7])
    assert isinstance(info.value, le.UnknownIdError)


def test_getitems_of_a_batch_is_one_get_in_any_index_form(small_store):
    ds = le.EmbeddingDataset(small_store)
    ds.store = counting = _CountingStore(small_store)
    rows = ds.__getitems__([5, 1, 5])
    assert counting.gets == [3] and len(rows) == 3 and rows[0].shape == (16,)
    assert torch.equal(torch.stack(rows), torch.from_numpy(small_store.get(small_store.ids[[5, 1, 5]])))
    ds[np.arange(10)]
    assert counting.gets == [3, 10]
