"""StoreEmbedding and the optimizers' contract: which rows move, where state lives, what is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkout import run_python

import lmdb_embeddings as le
from lmdb_embeddings.torch import SparseAdagrad, SparseAdam, SparseAdamW, SparseSGD, StoreEmbedding

N, D = 200, 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def store(store_path):
    s = le.EmbeddingStore.create(store_path, N, D, chunk_rows=16, seed=11)
    yield s
    s.close()


def _step(emb, opt, ids, scale=1.0):
    opt.zero_grad()
    (emb(torch.as_tensor(ids)) * scale).pow(2).sum().backward()
    opt.step()


def _train(store, make_opt, batches):
    emb = StoreEmbedding(store)
    opt = make_opt(emb)
    for ids in batches:
        _step(emb, opt, ids)
    return emb, opt


BATCHES = [np.random.default_rng(i).integers(0, 120, 32) for i in range(12)]


# ----------------------------------------------------------------------- the module
def test_forward_returns_store_rows_in_id_shape(store):
    emb = StoreEmbedding(store)
    ids = torch.tensor([[3, 1, 3], [0, 199, 5]])
    out = emb(ids)
    assert out.shape == (2, 3, D) and out.dtype == torch.float32 and out.requires_grad
    assert np.array_equal(out.detach().numpy(), store.get(ids.reshape(-1).numpy()).reshape(2, 3, D))
    assert emb(7).shape == (D,)  # a scalar id gives one row, as nn.Embedding
    out.mul_(2)  # the output is an ordinary tensor: in-place ops are allowed, as on nn.Embedding's
    assert emb.embedding_dim == D and emb.num_embeddings == N
    assert [p.numel() for p in emb.parameters()] == [0]  # only the zero-size proxy: the rows are in the store
    with torch.no_grad():
        assert not emb(ids).requires_grad


def test_an_empty_batch_serves_no_rows_and_counts_a_step_as_torch_does(store):
    before = store.get(np.arange(N))
    emb = StoreEmbedding(store)
    opt = SparseAdam(emb)
    out = emb(torch.tensor([], dtype=torch.int64))
    assert out.shape == (0, D) and emb(torch.empty((2, 0), dtype=torch.int64)).shape == (2, 0, D)
    out.sum().backward()
    opt.step()
    assert np.array_equal(store.get(np.arange(N)), before)
    assert opt.step_count == 1  # as torch: an empty sparse gradient is still a gradient, its step is counted


def test_step_touches_exactly_the_rows_with_gradients(store):
    before = store.get(np.arange(N))
    emb = StoreEmbedding(store)
    opt = SparseAdam(emb, lr=0.1)
    emb(torch.tensor([50, 51]))  # served, never backpropagated: no gradient, not updated
    with torch.no_grad():
        emb(torch.tensor([60]))  # served without autograd
    opt.zero_grad()
    emb(torch.tensor([4, 9, 4])).sum().backward()
    opt.step()
    after = store.get(np.arange(N))
    changed = np.flatnonzero((after != before).any(axis=1))
    assert changed.tolist() == [4, 9]
    m = store.get_column(opt.state_columns["exp_avg"], np.arange(N))
    assert np.flatnonzero(m.any(axis=1)).tolist() == [4, 9]
    assert np.allclose(m[4], 0.1 * 2) and np.allclose(m[9], 0.1)  # duplicate id: gradients summed


def test_gradients_of_rows_served_before_a_step_are_not_reapplied(store):
    emb = StoreEmbedding(store)
    opt = SparseSGD(emb, lr=0.5)
    out = emb(torch.tensor([1, 2]))
    out.sum().backward(retain_graph=True)
    opt.step()
    after_first = store.get([1, 2])
    out.sum().backward()  # old graph, rows served before the last step: ignored
    opt.step()
    assert np.array_equal(store.get([1, 2]), after_first)


def test_zero_grad_drops_pending_gradients(store):
    emb = StoreEmbedding(store)
    opt = SparseAdam(emb, lr=0.1)
    before = store.get(np.arange(N))
    emb(torch.tensor([1, 2])).sum().backward()
    opt.zero_grad()
    opt.step()
    assert np.array_equal(store.get(np.arange(N)), before) and opt.step_count == 0
    out = emb(torch.tensor([3]))
    opt.zero_grad()  # between forward and backward, the usual torch pattern: backward still counts
    out.sum().backward()
    opt.step()
    assert np.flatnonzero((store.get(np.arange(N)) != before).any(axis=1)).tolist() == [3]
    assert opt.step_count == 1


def test_unknown_ids_and_bad_id_types_are_refused(store):
    emb = StoreEmbedding(store)
    with pytest.raises(KeyError, match="500"):
        emb(torch.tensor([1, 500]))
    with pytest.raises(TypeError, match="integer"):
        emb(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="EmbeddingStore"):
        StoreEmbedding("/some/path")


# ------------------------------------------------------------------ state in the store
def test_state_columns_and_step_attr_are_named_per_optimizer(store):
    adam = SparseAdam(StoreEmbedding(store))
    adagrad = SparseAdagrad(StoreEmbedding(store), initial_accumulator_value=0.5)
    emb = StoreEmbedding(store)  # one optimizer per StoreEmbedding
    adamw = SparseAdamW(emb)
    assert set(store.columns) == {
        "opt.SparseAdam.exp_avg", "opt.SparseAdam.exp_avg_sq", "opt.SparseAdagrad.sum",
        "opt.SparseAdamW.exp_avg", "opt.SparseAdamW.exp_avg_sq"}
    assert store.columns["opt.SparseAdagrad.sum"] == {"width": D, "dtype": "float32", "fill": 0.5}
    assert np.all(store.get_column("opt.SparseAdagrad.sum", [0, 199]) == 0.5)
    _step(emb, adamw, [1, 2])
    assert store.attrs == {"opt.SparseAdamW.step": 1}
    assert adam.step_count == 0 and adagrad.step_count == 0 and adamw.step_count == 1


@pytest.mark.parametrize("make_opt", [
    lambda e: SparseAdam(e, lr=0.05), lambda e: SparseAdamW(e, lr=0.05, weight_decay=0.1),
    lambda e: SparseAdagrad(e, lr=0.1, lr_decay=0.05, initial_accumulator_value=0.2)],
    ids=["adam", "adamw", "adagrad"])
def test_reopened_store_continues_exactly(store_path, tmp_path, make_opt):
    """Steps 1-6, commit, close, reopen, steps 7-12 == steps 1-12 in one go (rows, state, step)."""
    with le.EmbeddingStore.create(store_path, N, D, chunk_rows=16, seed=4) as a:
        emb, opt = _train(a, make_opt, BATCHES[:6])
        a.commit()
    with le.EmbeddingStore.open(store_path) as a:
        emb, opt = _train(a, make_opt, BATCHES[6:])
        rows_a, columns = a.get(np.arange(N)), opt.state_columns
        state_a = {c: a.get_column(c, np.arange(N)) for c in columns.values()}
        step_a = opt.step_count
    with le.EmbeddingStore.create(str(tmp_path / "b"), N, D, chunk_rows=16, seed=4) as b:
        _, opt_b = _train(b, make_opt, BATCHES)
        assert np.array_equal(rows_a, b.get(np.arange(N)))
        for c in columns.values():
            assert np.array_equal(state_a[c], b.get_column(c, np.arange(N)))
        assert step_a == opt_b.step_count == len(BATCHES)


def test_rollback_discards_rows_state_and_step_together(store):
    emb = StoreEmbedding(store)
    opt = SparseAdam(emb, lr=0.1)
    _step(emb, opt, [1, 2])
    store.commit()
    committed = store.get(np.arange(N)), store.get_column(opt.state_columns["exp_avg"], np.arange(N))
    _step(emb, opt, [2, 3])
    assert opt.step_count == 2
    store.rollback()
    assert opt.step_count == 1
    assert np.array_equal(store.get(np.arange(N)), committed[0])
    assert np.array_equal(store.get_column(opt.state_columns["exp_avg"], np.arange(N)), committed[1])


def test_auto_commit_includes_the_state_of_the_same_step(store_path):
    """With commit_every=1 every step's put of the rows commits; the state must be in that commit."""
    le.EmbeddingStore.create(store_path, N, D, chunk_rows=16).close()
    with le.EmbeddingStore.open(store_path, commit_every=1) as store:
        emb = StoreEmbedding(store)
        opt = SparseAdam(emb, lr=0.1)
        _step(emb, opt, [5, 6])
        reader = le.EmbeddingStore.open(store_path, readonly=True)
        try:
            assert reader.attrs == {"opt.SparseAdam.step": 1}
            assert np.array_equal(reader.get_column("opt.SparseAdam.exp_avg_sq", [5, 6]),
                                  store.get_column("opt.SparseAdam.exp_avg_sq", [5, 6]))
            assert np.array_equal(reader.get([5, 6]), store.get([5, 6]))
        finally:
            reader.close()


def test_float16_store_keeps_float32_state(store_path):
    with le.EmbeddingStore.create(store_path, N, D, dtype="float16", chunk_rows=16) as store:
        emb = StoreEmbedding(store)
        opt = SparseAdam(emb, lr=0.01)
        assert emb(torch.tensor([1])).dtype == torch.float16
        before = store.get([1, 2])
        _step(emb, opt, [1, 2], scale=10.0)
        assert store.columns["opt.SparseAdam.exp_avg"]["dtype"] == "float32"
        assert store.get([1, 2]).dtype == np.float16 and not np.array_equal(store.get([1, 2]), before)


def test_lr_scheduler_drives_the_learning_rate(store):
    emb = StoreEmbedding(store)
    opt = SparseSGD(emb, lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    before = store.get([0])
    emb(torch.tensor([0])).sum().backward()
    opt.step()
    sched.step()
    assert np.allclose(store.get([0]), before - 1.0)
    emb(torch.tensor([0])).sum().backward()
    opt.step()
    assert np.allclose(store.get([0]), before - 1.5)


# ------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("make, message", [
    (lambda e: SparseSGD(e, lr=0.1, momentum=0.9), "momentum"),
    (lambda e: SparseSGD(e, lr=0.1, weight_decay=0.01), "weight_decay"),
    (lambda e: SparseSGD(e, lr=0.1, nesterov=True), "nesterov"),
    (lambda e: SparseSGD(e, lr=-1.0), "lr"),
    (lambda e: SparseAdagrad(e, weight_decay=0.1), "weight_decay"),
    (lambda e: SparseAdagrad(e, lr_decay=-0.1), "lr_decay"),
    (lambda e: SparseAdagrad(e, initial_accumulator_value=-1), "initial_accumulator_value"),
    (lambda e: SparseAdam(e, betas=(1.0, 0.999)), "beta"),
    (lambda e: SparseAdam(e, betas=(0.9,)), "betas"),
    (lambda e: SparseAdam(e, eps=-1e-8), "eps"),
    (lambda e: SparseAdam(e, lr=float("nan")), "lr"),
    (lambda e: SparseAdamW(e, weight_decay=-0.1), "weight_decay"),
    (lambda e: SparseAdamW(e, amsgrad=True), "amsgrad"),
    (lambda e: SparseAdamW(e, fused=True), "fused"),
])
def test_bad_hyperparameters_raise_value_errors_and_declare_nothing(store, make, message):
    emb = StoreEmbedding(store)
    with pytest.raises(ValueError, match=message) as info:
        make(emb)
    assert isinstance(info.value, le.EmbeddingStoreError)
    assert store.columns == {}


def test_first_argument_must_be_a_store_embedding(store):
    with pytest.raises(TypeError, match="StoreEmbedding"):
        SparseAdam(store, lr=0.1)
    with pytest.raises(TypeError, match="StoreEmbedding"):
        SparseAdam(torch.nn.Embedding(3, 2, sparse=True).parameters())


def test_read_only_store_can_serve_but_not_be_optimized(store_path):
    le.EmbeddingStore.create(store_path, N, D, chunk_rows=16).close()
    with le.EmbeddingStore.open(store_path, readonly=True) as reader:
        emb = StoreEmbedding(reader)
        assert emb(torch.tensor([1, 2])).shape == (2, D)
        with pytest.raises(PermissionError, match="read-only"):
            SparseAdam(emb)


def test_resuming_with_another_initial_accumulator_is_refused(store):
    emb = StoreEmbedding(store)
    SparseAdagrad(emb, initial_accumulator_value=0.1)
    with pytest.raises(ValueError, match="initial value 0.1"):
        SparseAdagrad(emb, initial_accumulator_value=0.2)


def test_non_finite_gradient_or_update_writes_nothing(store):
    emb = StoreEmbedding(store)
    opt = SparseAdam(emb, lr=0.1)
    _step(emb, opt, [1, 2])
    rows, state = store.get(np.arange(N)), store.get_column("opt.SparseAdam.exp_avg", np.arange(N))
    opt.zero_grad()
    (emb(torch.tensor([1, 3])) * float("inf")).sum().backward()
    with pytest.raises(ValueError, match="NaN or inf"):
        opt.step()
    assert np.array_equal(store.get(np.arange(N)), rows) and opt.step_count == 1
    assert np.array_equal(store.get_column("opt.SparseAdam.exp_avg", np.arange(N)), state)
    emb2 = StoreEmbedding(store)  # one optimizer per StoreEmbedding
    sgd = SparseSGD(emb2, lr=1e38)  # finite gradient, update overflows float32
    emb2(torch.tensor([4])).mul(1e3).sum().backward()
    with pytest.raises(ValueError, match="overflow"):
        sgd.step()
    assert np.array_equal(store.get(np.arange(N)), rows)
    _step(emb, opt, [5])  # the optimizer still works afterwards
    assert opt.step_count == 2


def test_core_import_does_not_import_torch():
    proc = run_python("import sys, lmdb_embeddings; assert 'torch' not in sys.modules; "
                      "import lmdb_embeddings.torch as t; print(sorted(t.__all__))")
    assert "SparseAdamW" in proc.stdout
