"""StoreEmbedding keeps nn.Embedding's habits: zero_grad, freezing, dtype, padding_idx, max_norm, copies, checkpoints.

The reference is always torch itself: the same calls on ``nn.Embedding(sparse=True)`` (or on a
dense one where torch has no sparse path) give the numbers ours must give.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from checkout import FIXTURES
from torch import nn

import lmdb_embeddings as le
from lmdb_embeddings.torch import SparseAdam, SparseSGD, StoreEmbedding

N, D = 50, 4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def store(store_path):
    s = le.EmbeddingStore.create(store_path, N, D, chunk_rows=16, seed=3)
    yield s
    s.close()


def _reference(store, **kwargs) -> nn.Embedding:
    ref = nn.Embedding(N, D, sparse=True, **kwargs)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(store.get(np.arange(N))))
    return ref


class _Model(nn.Module):
    def __init__(self, emb: nn.Module):
        super().__init__()
        self.emb, self.head = emb, nn.Linear(D, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


# ------------------------------------------------------------------------------ zero_grad
@pytest.mark.parametrize("clear", [
    lambda model, opt: model.zero_grad(),
    lambda model, opt: model.emb.zero_grad(),
    lambda model, opt: model.zero_grad(set_to_none=False),
    lambda model, opt: torch.optim.SGD(model.parameters(), lr=0.1).zero_grad(),
    lambda model, opt: opt.zero_grad(),
], ids=["model.zero_grad", "emb.zero_grad", "model.zero_grad(set_to_none=False)", "dense optimizer over the model",
        "optimizer.zero_grad"])
def test_zero_grad_anywhere_drops_the_rows_gradients_as_for_nn_embedding(store, clear):
    """The issue's case: backward, zero_grad through the model, backward, step: -1 per row, not -2."""
    ids = torch.tensor([3, 7])
    before = store.get(ids.numpy())
    model = _Model(StoreEmbedding(store))
    opt = SparseSGD(model.emb, lr=1.0)
    ref = _Model(_reference(store))
    ref_opt = torch.optim.SGD(ref.emb.parameters(), lr=1.0)
    for m, o in ((model, opt), (ref, ref_opt)):
        m.emb(ids).sum().backward()
        clear(m, o)
        m.emb(ids).sum().backward()
        o.step()
    assert np.array_equal(store.get(ids.numpy()), before - 1.0)
    assert np.array_equal(store.get(np.arange(N)), ref.emb.weight.detach().numpy())


def test_gradients_received_after_a_zero_grad_still_count(store):
    emb = StoreEmbedding(store)
    opt = SparseSGD(emb, lr=1.0)
    before = store.get([1, 2])
    out = emb(torch.tensor([1, 2]))
    emb.zero_grad()  # between forward and backward: the usual torch loop, the backward still counts
    out.sum().backward()
    emb(torch.tensor([2])).sum().backward()  # a second backward in the same step accumulates
    assert emb.has_gradients
    opt.step()
    assert np.allclose(store.get([1, 2]), before - np.array([[1.0], [2.0]], np.float32), rtol=1e-6, atol=0)


# -------------------------------------------------------------------------------- freezing
@pytest.mark.parametrize("freeze", [lambda m: m.emb.requires_grad_(False), lambda m: m.requires_grad_(False)],
                         ids=["emb", "parent"])
def test_requires_grad_false_freezes_the_rows(store, freeze):
    model = _Model(StoreEmbedding(store))
    opt = SparseAdam(model.emb, lr=0.1)
    before = store.get(np.arange(N))
    freeze(model)
    out = model.emb(torch.tensor([1, 2]))
    assert not out.requires_grad
    model.head.requires_grad_(True)
    model(torch.tensor([1, 2])).sum().backward()  # the head still trains
    opt.step()
    assert np.array_equal(store.get(np.arange(N)), before) and opt.step_count == 0
    model.emb.requires_grad_(True)  # and thawing works
    model.emb(torch.tensor([1])).sum().backward()
    opt.step()
    assert np.flatnonzero((store.get(np.arange(N)) != before).any(axis=1)).tolist() == [1]


# ------------------------------------------------------------------------------------ dtype
@pytest.mark.parametrize("convert, dtype", [
    (lambda e: e.half(), torch.float16), (lambda e: e.double(), torch.float64),
    (lambda e: e.to(torch.float64), torch.float64), (lambda e: e.bfloat16(), torch.bfloat16)],
    ids=["half", "double", "to(float64)", "bfloat16"])
def test_rows_are_served_in_the_modules_dtype_and_gradients_come_back(store, convert, dtype):
    emb = convert(StoreEmbedding(store))
    opt = SparseSGD(emb, lr=0.5)
    before = store.get([4, 5])
    out = emb(torch.tensor([4, 5]))
    assert out.dtype == dtype and emb.dtype == dtype
    assert torch.equal(out, torch.from_numpy(before).to(dtype))
    (out * torch.tensor([[1.0], [2.0]], dtype=dtype)).sum().backward()
    opt.step()
    assert store.get([4]).dtype == np.float32
    assert np.allclose(store.get([4, 5]), before - 0.5 * np.array([[1.0], [2.0]], np.float32), rtol=1e-6)
    with torch.no_grad():
        assert emb(torch.tensor([4])).dtype == dtype


@pytest.mark.filterwarnings("ignore:Complex modules:UserWarning")  # torch's own, about .to(complex)
def test_a_dtype_it_cannot_serve_is_refused_at_the_call(store):
    emb = StoreEmbedding(store).to(torch.complex64)
    with pytest.raises(TypeError, match="complex64") as info:
        emb(torch.tensor([1]))
    assert isinstance(info.value, le.EmbeddingStoreError)


# ------------------------------------------------------------------------------ padding_idx
def test_padding_idx_gets_no_gradient_and_matches_nn_embedding(store):
    emb = StoreEmbedding(store, padding_idx=7)
    opt = SparseAdam(emb, lr=0.1)
    ref = _reference(store, padding_idx=7)
    ref_opt = torch.optim.SparseAdam(ref.parameters(), lr=0.1)
    before = store.get([7])
    for batch in ([7, 1, 7, 2], [7], [3, 1]):
        for module, optimizer in ((emb, opt), (ref, ref_opt)):
            optimizer.zero_grad()
            (module(torch.tensor(batch)) ** 2).sum().backward()
            optimizer.step()
    assert np.array_equal(store.get(np.arange(N)), ref.weight.detach().numpy())
    assert np.array_equal(store.get([7]), before)  # never written
    assert not store.get_column(opt.state_columns["exp_avg"], [7]).any()
    assert opt.step_count == ref_opt.state[ref.weight]["step"] == 3  # an all-padding batch is still a step


def test_padding_idx_must_be_an_id_of_the_store(store):
    with pytest.raises(KeyError, match="999"):
        StoreEmbedding(store, padding_idx=999)
    with pytest.raises(TypeError, match="padding_idx"):
        StoreEmbedding(store, padding_idx=1.5)


# --------------------------------------------------------------------------------- max_norm
@pytest.mark.parametrize("norm_type", [2.0, 1.0])
def test_max_norm_renormalises_looked_up_rows_in_the_store_as_nn_embedding(store, norm_type):
    store.put([1, 2], np.full((2, D), 3.0, np.float32))  # norm 6 (L2) / 12 (L1): over max_norm
    emb = StoreEmbedding(store, max_norm=1.5, norm_type=norm_type)
    opt = SparseSGD(emb, lr=0.1)
    ref = _reference(store, max_norm=1.5, norm_type=norm_type)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for batch in ([1, 3], [2, 1, 4]):
        outs = []
        for module, optimizer in ((emb, opt), (ref, ref_opt)):
            out = module(torch.tensor(batch))
            outs.append(out.detach().clone())
            out.pow(2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        assert torch.equal(outs[0], outs[1])
    assert np.array_equal(store.get(np.arange(N)), ref.weight.detach().numpy())
    with torch.no_grad():  # renormalises without autograd too, as nn.Embedding does
        emb(torch.tensor([2]))
    assert np.linalg.norm(store.get([2]), ord=norm_type) <= 1.5 + 1e-6


def test_max_norm_needs_a_writable_store_and_valid_numbers(store_path, store):
    with pytest.raises(ValueError, match="max_norm"):
        StoreEmbedding(store, max_norm=-1.0)
    with le.EmbeddingStore.open(store_path, readonly=True) as reader:
        with pytest.raises(PermissionError, match="max_norm"):
            StoreEmbedding(reader, max_norm=1.0)


# ------------------------------------------------------------------- copies and checkpoints
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_model_holding_it_survives_copies_as_a_reference_to_its_store(store, how):
    model = _Model(StoreEmbedding(store, padding_idx=2)).double()
    opt = SparseSGD(model.emb, lr=0.1)
    model(torch.tensor([1, 2])).sum().backward()  # pending gradients are not copied
    if how == "deepcopy":
        copied = copy.deepcopy(model)
    elif how == "pickle":
        copied = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    assert copied.emb.store.readonly and copied.emb.store.path == store.path
    assert copied.emb.padding_idx == 2 and copied.emb.dtype == torch.float64
    ids = torch.tensor([5, 1])
    assert torch.equal(copied(ids), model(ids))
    assert not copied.emb.has_gradients
    opt.step()  # the original still trains
    with pytest.raises(PermissionError, match="read-only"):
        SparseSGD(copied.emb)


def test_state_dict_records_the_table_and_loads_back(store):
    model = _Model(StoreEmbedding(store))
    store.put([1], np.ones((1, D), np.float32))
    store.commit()
    state = model.state_dict()
    assert set(state) == {"emb._extra_state", "head.weight", "head.bias"}
    assert state["emb._extra_state"]["uuid"] == store.uuid and state["emb._extra_state"]["commit"] == 1
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    model.load_state_dict(torch.load(buffer, weights_only=True))  # plain values: weights_only loads them


def test_loading_a_checkpoint_of_another_table_or_an_older_commit_is_said(store, tmp_path):
    model = _Model(StoreEmbedding(store))
    state = model.state_dict()
    with le.EmbeddingStore.create(str(tmp_path / "other"), N, D) as other:
        other_model = _Model(StoreEmbedding(other))
        with pytest.raises(ValueError, match="another table") as info:
            other_model.load_state_dict(state)
        assert isinstance(info.value, le.EmbeddingStoreError)
        with pytest.raises(ValueError, match="another table"):
            other_model.load_state_dict(state, strict=False)
        other_model.load_state_dict({k: v for k, v in state.items() if k != "emb._extra_state"}, strict=False)
    newer = copy.deepcopy(state)
    newer["emb._extra_state"]["commit"] += 3  # a checkpoint taken after commits this store does not have
    with pytest.raises(ValueError, match="older than the checkpoint"):
        model.load_state_dict(newer)
    store.put([1], np.ones((1, D), np.float32))
    store.commit()  # the store moved on since the checkpoint: its rows are newer, said with a warning
    with pytest.warns(UserWarning, match="newer"):
        model.load_state_dict(state)
    with pytest.raises(RuntimeError, match="_extra_state"):
        model.load_state_dict({k: v for k, v in state.items() if k != "emb._extra_state"})  # torch's missing key


def test_a_store_older_than_store_uuid_is_told_apart_by_its_path(tmp_path):
    """tests/data/format_v1 predates the store's uuid: a checkpoint then names the table by its path."""
    paths = [str(tmp_path / name) for name in ("a", "b")]
    for path in paths:
        os.mkdir(path)
        shutil.copy(os.path.join(FIXTURES, "format_v1", "data.mdb"), path)
    with le.EmbeddingStore.open(paths[0]) as a, le.EmbeddingStore.open(paths[1]) as b:
        assert a.uuid is None and b.uuid is None
        state = StoreEmbedding(a).state_dict()
        StoreEmbedding(a).load_state_dict(state)
        with pytest.raises(ValueError, match="another table"):
            StoreEmbedding(b).load_state_dict(state)
