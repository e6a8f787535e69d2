"""Store-backed optimizers give torch's numbers: nn.Embedding(sparse=True) + torch.optim as the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lmdb_embeddings as le
from lmdb_embeddings.torch import SparseAdagrad, SparseAdam, SparseAdamW, SparseSGD, StoreEmbedding

# torch's own Adagrad (the reference) warns about sparse invariant checks; not our code
pytestmark = [pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning"),
              pytest.mark.usefixtures("one_torch_thread")]

N, D, B, STEPS = 300, 12, 48, 40
RTOL = 1e-6




def _batches(steps: int = STEPS, seed: int = 0, high: int = 80):
    """Batches drawn from the first ``high`` ids so most batches repeat ids (up to 4+ times)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, high, (B,), generator=gen) for _ in range(steps)]


TARGETS = torch.randn(B, D, generator=torch.Generator().manual_seed(7))
WEIGHTS = torch.arange(1, D + 1, dtype=torch.float32)


def _loss(out: torch.Tensor) -> torch.Tensor:
    return ((out.reshape(B, D) - TARGETS) ** 2 * WEIGHTS).sum()


def _forward(module, ids: torch.Tensor, split: bool) -> torch.Tensor:
    """One forward (ids of shape (B,)) or two forwards of shape (2, B/4) and (B/2,) concatenated."""
    if not split:
        return module(ids)
    first = module(ids[: B // 2].reshape(2, B // 4)).reshape(B // 2, D)
    return torch.cat([first, module(ids[B // 2 :])])


def _train_store(store, make_opt, batches, split=False):
    emb = StoreEmbedding(store)
    opt = make_opt(emb)
    for ids in batches:
        opt.zero_grad()
        _loss(_forward(emb, ids, split)).backward()
        opt.step()
    return opt


def _train_torch(weight0, make_opt, batches, split=False):
    ref = torch.nn.Embedding(N, D, sparse=True)
    with torch.no_grad():
        ref.weight.copy_(weight0)
    opt = make_opt(ref.parameters())
    for ids in batches:
        opt.zero_grad()
        _loss(_forward(ref, ids, split)).backward()
        opt.step()
    return ref.weight.detach(), opt.state[ref.weight] if opt.state else {}


def _all_rows(store) -> torch.Tensor:
    return torch.from_numpy(store.get(np.arange(N)))


CASES = {
    "sgd": (lambda e: SparseSGD(e, lr=0.02), lambda p: torch.optim.SGD(p, lr=0.02), {}),
    "sgd_maximize": (lambda e: SparseSGD(e, lr=0.01, maximize=True),
                     lambda p: torch.optim.SGD(p, lr=0.01, maximize=True), {}),
    "adagrad": (lambda e: SparseAdagrad(e, lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1, eps=1e-9),
                lambda p: torch.optim.Adagrad(p, lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1, eps=1e-9),
                {"sum": "sum"}),
    "adagrad_default": (lambda e: SparseAdagrad(e), lambda p: torch.optim.Adagrad(p), {"sum": "sum"}),
    "adam": (lambda e: SparseAdam(e, lr=0.01), lambda p: torch.optim.SparseAdam(p, lr=0.01),
             {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}),
    "adam_betas_maximize": (lambda e: SparseAdam(e, lr=0.005, betas=(0.8, 0.99), eps=1e-6, maximize=True),
                            lambda p: torch.optim.SparseAdam(p, lr=0.005, betas=(0.8, 0.99), eps=1e-6,
                                                             maximize=True),
                            {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}),
}


@pytest.mark.parametrize("split", [False, True], ids=["one_forward", "two_forwards"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torch_optimizer(store_path, case, split):
    make_store_opt, make_torch_opt, state_map = CASES[case]
    batches = _batches()
    assert max(int(torch.bincount(b).max()) for b in batches) >= 3  # duplicates are exercised
    with le.EmbeddingStore.create(store_path, N, D, chunk_rows=32, seed=5) as store:
        weight0 = _all_rows(store)
        opt = _train_store(store, make_store_opt, batches, split)
        ref_weight, ref_state = _train_torch(weight0, make_torch_opt, batches, split)
        got = _all_rows(store)
        assert not torch.equal(got, weight0)
        torch.testing.assert_close(got, ref_weight, rtol=RTOL, atol=1e-8)
        for ours, theirs in state_map.items():
            column = opt.state_columns[ours]
            torch.testing.assert_close(torch.from_numpy(store.get_column(column, np.arange(N))),
                                       ref_state[theirs], rtol=RTOL, atol=1e-12)
        if "step" in ref_state:
            assert opt.step_count == int(ref_state["step"]) == STEPS
        untouched = np.arange(80, N)
        assert np.array_equal(store.get(untouched), weight0[80:].numpy())


def _reference_row_adamw(weight0, batches, lr, betas, eps, weight_decay):
    """Row-wise AdamW in plain torch, written from the formulas: lazy Adam (SparseAdam's bias
    correction and eps placement) with decoupled decay on the rows in the batch."""
    weight = weight0.clone()
    exp_avg = torch.zeros_like(weight)
    exp_avg_sq = torch.zeros_like(weight)
    beta1, beta2 = betas
    for step, ids in enumerate(batches, start=1):
        leaf = weight[ids].clone().requires_grad_(True)
        _loss(leaf).backward()
        rows = torch.unique(ids)
        grad = torch.zeros(N, D).index_add_(0, ids, leaf.grad)[rows]  # duplicates summed
        weight[rows] *= 1 - lr * weight_decay
        exp_avg[rows] = beta1 * exp_avg[rows] + (1 - beta1) * grad
        exp_avg_sq[rows] = beta2 * exp_avg_sq[rows] + (1 - beta2) * grad * grad
        step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        weight[rows] -= step_size * exp_avg[rows] / (exp_avg_sq[rows].sqrt() + eps)
    return weight, exp_avg, exp_avg_sq


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adamw_matches_plain_torch_reference(store_path, weight_decay):
    batches = _batches(seed=3)
    kw = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    with le.EmbeddingStore.create(store_path, N, D, chunk_rows=32, seed=2) as store:
        weight0 = _all_rows(store)
        opt = _train_store(store, lambda e: SparseAdamW(e, **kw), batches)
        ref_weight, ref_m, ref_v = _reference_row_adamw(weight0, batches, **kw)
        torch.testing.assert_close(_all_rows(store), ref_weight, rtol=RTOL, atol=1e-7)
        m = torch.from_numpy(store.get_column(opt.state_columns["exp_avg"], np.arange(N)))
        v = torch.from_numpy(store.get_column(opt.state_columns["exp_avg_sq"], np.arange(N)))
        # moments are running sums of gradients that cancel near zero: compare on their own scale
        torch.testing.assert_close(m, ref_m, rtol=RTOL, atol=RTOL * float(ref_m.abs().max()))
        torch.testing.assert_close(v, ref_v, rtol=RTOL, atol=RTOL * float(ref_v.abs().max()))
        assert opt.step_count == STEPS


def test_adamw_is_sparse_adam_plus_decay_on_touched_rows(store_path):
    """SparseAdamW == torch.optim.SparseAdam after scaling the rows in the gradient by 1 - lr*wd."""
    batches = _batches(seed=4)
    lr, wd = 0.02, 0.1
    with le.EmbeddingStore.create(store_path, N, D, chunk_rows=32, seed=2) as store:
        weight0 = _all_rows(store)
        _train_store(store, lambda e: SparseAdamW(e, lr=lr, weight_decay=wd), batches)
        ref = torch.nn.Embedding(N, D, sparse=True)
        with torch.no_grad():
            ref.weight.copy_(weight0)
        opt = torch.optim.SparseAdam(ref.parameters(), lr=lr)
        for ids in batches:
            opt.zero_grad()
            _loss(ref(ids)).backward()
            with torch.no_grad():
                rows = ref.weight.grad.coalesce().indices()[0]
                ref.weight[rows] *= 1 - lr * wd
            opt.step()
        torch.testing.assert_close(_all_rows(store), ref.weight.detach(), rtol=RTOL, atol=1e-8)


def test_float64_store_matches_torch_double(store_path):
    batches = _batches(steps=10)
    with le.EmbeddingStore.create(store_path, N, D, dtype="float64", chunk_rows=32) as store:
        weight0 = torch.from_numpy(store.get(np.arange(N)))
        emb = StoreEmbedding(store)
        opt = SparseAdam(emb, lr=0.01)
        ref = torch.nn.Embedding(N, D, sparse=True, dtype=torch.float64)
        with torch.no_grad():
            ref.weight.copy_(weight0)
        ropt = torch.optim.SparseAdam(ref.parameters(), lr=0.01)
        for ids in batches:
            for module, o in ((emb, opt), (ref, ropt)):
                o.zero_grad()
                ((module(ids) - TARGETS.double()) ** 2).sum().backward()
                o.step()
        assert store.columns[opt.state_columns["exp_avg"]]["dtype"] == "float64"
        torch.testing.assert_close(torch.from_numpy(store.get(np.arange(N))), ref.weight.detach(), rtol=1e-12,
                                   atol=0)
