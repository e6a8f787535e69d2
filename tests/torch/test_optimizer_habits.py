"""Store optimizers keep torch.optim's habits or refuse clearly: param groups, one per embedding, state_dict, clip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lmdb_embeddings as le
from lmdb_embeddings.torch import SparseAdagrad, SparseAdam, SparseAdamW, SparseSGD, StoreEmbedding, clip_grad_norm_

N, D = 60, 6

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def store(store_path):
    s = le.EmbeddingStore.create(store_path, N, D, chunk_rows=16, seed=5)
    yield s
    s.close()


def _step(emb, opt, ids):
    opt.zero_grad()
    emb(torch.tensor(ids)).pow(2).sum().backward()
    opt.step()


# ------------------------------------------------------------------- refused, never silent
def test_add_param_group_with_foreign_parameters_is_refused(store):
    emb = StoreEmbedding(store)
    opt = SparseAdam(emb, lr=0.1)
    weight = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="add_param_group") as info:
        opt.add_param_group({"params": [weight]})
    assert isinstance(info.value, le.EmbeddingStoreError)
    with pytest.raises(ValueError, match="add_param_group"):
        opt.add_param_group({"params": [emb.proxy]})  # a second group of its own: refused too
    assert len(opt.param_groups) == 1


def test_a_second_optimizer_on_one_embedding_is_refused(store):
    emb = StoreEmbedding(store)
    first = SparseAdam(emb, lr=0.1)
    columns = dict(store.columns)
    for make in (lambda e: SparseAdam(e, lr=0.1), lambda e: SparseSGD(e, lr=0.1), lambda e: SparseAdagrad(e)):
        with pytest.raises(ValueError, match="already has an optimizer") as info:
            make(emb)
        assert isinstance(info.value, le.EmbeddingStoreError)
    assert store.columns == columns  # the refused ones declared nothing
    _step(emb, first, [1, 2])
    assert first.step_count == 1
    sched = torch.optim.lr_scheduler.StepLR(first, step_size=1)  # holds the optimizer in a reference cycle
    del first, sched  # once the first is gone, another may take its place (a resumed training re-creates it)
    second = SparseAdam(emb, lr=0.1)
    _step(emb, second, [1])
    assert second.step_count == 2


def test_grad_scaler_is_refused_instead_of_applying_scaled_gradients(store):
    emb = StoreEmbedding(store)
    opt = SparseSGD(emb, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = store.get(np.arange(N))
    scaler.scale(emb(torch.tensor([1])).sum()).backward()
    with pytest.raises(ValueError, match="GradScaler"):
        scaler.step(opt)
    assert np.array_equal(store.get(np.arange(N)), before)
    _step(emb, opt, [2])  # and the optimizer still steps without the scaler
    assert not np.array_equal(store.get([2]), before[[2]])


# -------------------------------------------------------------------------- state_dict
@pytest.mark.parametrize("make", [lambda e: SparseAdam(e, lr=0.05, betas=(0.8, 0.99)),
                                  lambda e: SparseAdamW(e, lr=0.05, weight_decay=0.1),
                                  lambda e: SparseAdagrad(e, lr=0.1, initial_accumulator_value=0.2),
                                  lambda e: SparseSGD(e, lr=0.3)], ids=["adam", "adamw", "adagrad", "sgd"])
def test_state_dict_round_trips_hyperparameters_and_step_count(store_path, make):
    with le.EmbeddingStore.create(store_path, N, D, chunk_rows=16) as store:
        emb = StoreEmbedding(store)
        opt = make(emb)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for ids in ([1, 2], [2, 3], [4]):
            _step(emb, opt, ids)
            sched.step()
        saved, saved_sched = opt.state_dict(), sched.state_dict()
        assert saved["step"] == (3 if opt.counts_steps else 0) and saved["table"]["uuid"] == store.uuid
        store.commit()
    with le.EmbeddingStore.open(store_path) as store:  # resume: new objects, hyper-parameters from the checkpoint
        emb = StoreEmbedding(store)
        opt = make(emb)
        opt.param_groups[0]["lr"] = 123.0
        opt.load_state_dict(saved)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        sched.load_state_dict(saved_sched)
        assert opt.param_groups[0]["lr"] == saved["param_groups"][0]["lr"]
        assert {k: v for k, v in opt.state_dict()["param_groups"][0].items()} == saved["param_groups"][0]
        assert opt.state_dict()["step"] == saved["step"]


def test_load_state_dict_refuses_another_table_optimizer_or_step(store, tmp_path):
    emb = StoreEmbedding(store)
    opt = SparseAdam(emb, lr=0.1)
    _step(emb, opt, [1])
    saved = opt.state_dict()
    with le.EmbeddingStore.create(str(tmp_path / "other"), N, D) as other:
        other_opt = SparseAdam(StoreEmbedding(other), lr=0.1)
        other_opt.step_count  # noqa: B018
        with pytest.raises(ValueError, match="another table"):
            other_opt.load_state_dict(saved)
    with pytest.raises(ValueError, match="SparseAdam's, not SparseAdamW's"):
        SparseAdamW(StoreEmbedding(store)).load_state_dict(saved)
    _step(emb, opt, [2])
    with pytest.raises(ValueError, match="step 1 .* at step 2"):
        opt.load_state_dict(saved)
    with pytest.raises(ValueError, match="not the state_dict of a store optimizer"):
        opt.load_state_dict(torch.optim.SGD([nn.Parameter(torch.ones(1))]).state_dict())
    assert opt.param_groups[0]["lr"] == 0.1


# ---------------------------------------------------------------------------- clipping
class _Model(nn.Module):
    def __init__(self, emb: nn.Module):
        super().__init__()
        self.emb, self.head = emb, nn.Linear(D, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
@pytest.mark.parametrize("form", ["parameters", "module"])
def test_clip_grad_norm_clips_rows_and_dense_parameters_together_as_torch(store, norm_type, form):
    """Equals torch.nn.utils.clip_grad_norm_ over an nn.Embedding model holding the same rows."""
    torch.manual_seed(0)
    model = _Model(StoreEmbedding(store))
    ref = _Model(nn.Embedding(N, D))
    with torch.no_grad():
        ref.emb.weight.copy_(torch.from_numpy(store.get(np.arange(N))))
    ref.head.load_state_dict(model.head.state_dict())
    row_opt = SparseSGD(model.emb, lr=0.5)
    head_opt = torch.optim.SGD(model.head.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    ids = torch.tensor([3, 1, 3, 9, 20])
    for m in (model, ref):
        (m(ids) * 50).pow(2).sum().backward()
        m(torch.tensor([1])).sum().backward()  # two backward passes: their sum is clipped
    total = clip_grad_norm_(model.parameters() if form == "parameters" else model, 1.0, norm_type)
    ref_total = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0, norm_type)
    assert total > 1.0 and torch.allclose(total, ref_total, rtol=1e-6)
    for opt in (row_opt, head_opt, ref_opt):
        opt.step()
    assert np.allclose(store.get(np.arange(N)), ref.emb.weight.detach().numpy(), rtol=1e-5, atol=1e-7)
    assert torch.allclose(model.head.weight, ref.head.weight, rtol=1e-5)


def test_torch_clip_grad_norm_cannot_see_the_rows_and_ours_can(store):
    emb = StoreEmbedding(store)
    opt = SparseSGD(emb, lr=1.0)
    before = store.get([1])
    (emb(torch.tensor([1])) * 100).sum().backward()
    assert float(torch.nn.utils.clip_grad_norm_(emb.parameters(), 1.0)) == 0.0  # torch's sees a zero-size proxy
    total = clip_grad_norm_(emb.parameters(), 1.0)
    assert float(total) == pytest.approx(100 * np.sqrt(D), rel=1e-6)
    opt.step()
    assert np.linalg.norm(store.get([1]) - before) == pytest.approx(1.0, rel=1e-5)
