"""EmbeddingStore's Python API as ../shared/SPEC.md states it: create/open, get/put/add, commit and
rollback, lifecycle, properties, stats, auxiliary columns and attrs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkout import rows_like, run_python

import lmdb_embeddings as le
from lmdb_embeddings import EmbeddingStore

INIT_KINDS = ["normal", "zeros", "uniform", "xavier", "kaiming"]


# ------------------------------------------------------------------ create / open / ids
@pytest.mark.parametrize(
    "ids",
    [
        [5, -3, 100, 7, 2**40, -(2**62)],
        np.array([9, 8, 7, 1, 0, -1], dtype=np.int32),
        torch.tensor([11, -4, 3, 99, 0], dtype=torch.int64),
        np.arange(40, dtype=np.int64)[::-2],  # non-contiguous memory, descending
    ],
    ids=["list", "numpy-int32", "torch", "strided-numpy"],
)
def test_create_with_id_sequences_keeps_row_order(store_path, ids):
    expected = np.asarray(ids.numpy() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
    init = rows_like(len(expected), 4, seed=3)
    with EmbeddingStore.create(store_path, ids, 4, chunk_rows=4, init=init) as store:
        assert store.ids.dtype == np.int64
        assert np.array_equal(store.ids, expected)
        assert np.array_equal(store.get(expected), init)  # row i belongs to ids[i]
        assert np.array_equal(store.get(expected[::-1]), init[::-1])
        assert len(store) == len(expected)
        for sample_id in expected[:3].tolist():
            assert sample_id in store
    with EmbeddingStore.open(store_path, readonly=True) as store:
        assert np.array_equal(store.ids, expected)
        assert np.array_equal(store.get(expected), init)


def test_create_with_int_gives_ids_0_to_n(store_path):
    with EmbeddingStore.create(store_path, 130, 3, chunk_rows=16) as store:
        assert np.array_equal(store.ids, np.arange(130))
        assert 129 in store and 130 not in store and -1 not in store
        assert np.int64(5) in store and "x" not in store


def test_ids_property_is_a_copy(small_store):
    ids = small_store.ids
    ids[:] = -7
    assert np.array_equal(small_store.ids, np.arange(1000))


def test_empty_store_can_grow(store_path):
    with EmbeddingStore.create(store_path, 0, 4, chunk_rows=8) as store:
        assert len(store) == 0 and store.get([]).shape == (0, 4)
        store.add([10, 20], np.ones((2, 4)))
    with EmbeddingStore.open(store_path) as store:
        assert np.array_equal(store.ids, [10, 20])
        assert np.array_equal(store.get([20]), np.ones((1, 4), np.float32))


@pytest.mark.parametrize("kind", INIT_KINDS)
def test_init_kinds_are_seed_deterministic(tmp_path, kind):
    tables = []
    for name, seed in (("a", 4), ("b", 4), ("c", 5)):
        with EmbeddingStore.create(str(tmp_path / name), 300, 8, chunk_rows=64, init=kind, seed=seed) as s:
            tables.append(s.get(np.arange(300)))
    assert np.array_equal(tables[0], tables[1])
    if kind == "zeros":
        assert not tables[0].any()
    else:
        assert not np.array_equal(tables[0], tables[2])
        assert len(np.unique(tables[0])) > 1000


def test_init_distributions(tmp_path):
    n, dim = 4000, 32
    def table(kind):
        with EmbeddingStore.create(str(tmp_path / kind), n, dim, init=kind, chunk_rows=512) as s:
            return s.get(np.arange(n)).astype(np.float64)
    normal = table("normal")
    assert abs(normal.mean()) < 2e-4 and abs(normal.std() - 0.01) < 2e-4
    uniform = table("uniform")
    assert uniform.min() >= -0.01 and uniform.max() <= 0.01 and uniform.max() > 0.0099
    xavier_bound = np.sqrt(6.0 / (dim + n))  # torch.nn.init.xavier_uniform_ on (n, dim)
    xavier = table("xavier")
    assert np.abs(xavier).max() <= xavier_bound and np.abs(xavier).max() > 0.99 * xavier_bound
    kaiming_bound = np.sqrt(6.0 / dim)  # kaiming_uniform_(a=0): gain sqrt(2) * sqrt(3 / fan_in)
    kaiming = table("kaiming")
    assert np.abs(kaiming).max() <= kaiming_bound and np.abs(kaiming).max() > 0.99 * kaiming_bound


@pytest.mark.parametrize("kind", ["normal", "zeros", "uniform", "kaiming"])
def test_create_at_once_equals_create_then_add(tmp_path, kind):
    ids = np.random.default_rng(0).permutation(np.arange(-500, 500))
    with EmbeddingStore.create(str(tmp_path / "once"), ids, 6, chunk_rows=64, init=kind, seed=9) as s:
        once = s.get(ids)
    with EmbeddingStore.create(str(tmp_path / "grown"), ids[:130], 6, chunk_rows=64, init=kind, seed=9) as s:
        s.add(ids[130:131])
        s.add(ids[131:700])
        s.commit()
        s.add(ids[700:])
        assert np.array_equal(s.get(ids), once)  # before the commit: default init values
    with EmbeddingStore.open(str(tmp_path / "grown")) as s:
        assert np.array_equal(s.get(ids), once)
        assert np.array_equal(s.ids, ids)


def test_init_array_row_i_belongs_to_ids_i(store_path):
    ids = np.array([30, 10, 20])
    init = np.arange(12, dtype=np.float64).reshape(3, 4)
    with EmbeddingStore.create(store_path, ids, 4, init=init, dtype="float16") as store:
        got = store.get([10, 20, 30])
        assert got.dtype == np.float16
        assert np.array_equal(got, init[[1, 2, 0]].astype(np.float16))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_dtypes_round_trip(store_path, dtype):
    values = rows_like(50, 8, seed=2)
    with EmbeddingStore.create(store_path, 50, 8, dtype=dtype, chunk_rows=16) as store:
        assert store.dtype == np.dtype(dtype)
        store.put(np.arange(50), values)
        assert store.get([0]).dtype == np.dtype(dtype)
    with EmbeddingStore.open(store_path, readonly=True) as store:
        assert store.dtype == np.dtype(dtype)
        assert np.array_equal(store.get(np.arange(50)), values.astype(dtype))


# ------------------------------------------------------------------------------ reading
def test_get_order_duplicates_and_fresh_copy(small_store):
    base = small_store.get(np.arange(1000))
    ids = [999, 3, 3, 500, 0, 3]
    got = small_store.get(ids)
    assert got.shape == (6, 16) and got.dtype == np.float32
    assert np.array_equal(got, base[ids])
    got[:] = 42.0
    assert np.array_equal(small_store.get(ids), base[ids])
    assert small_store.get(np.array([], dtype=np.int64)).shape == (0, 16)
    assert np.array_equal(small_store.get(7), base[[7]])  # a single int is one id


def test_get_accepts_tensors_and_unsigned(small_store):
    base = small_store.get(np.arange(10))
    assert np.array_equal(small_store.get(torch.tensor([4, 2])), base[[4, 2]])
    assert np.array_equal(small_store.get(np.array([9, 1], np.uint32)), base[[9, 1]])


def test_get_unknown_id_names_it(small_store):
    with pytest.raises(KeyError) as info:
        small_store.get([1, 5000, 2, -8])
    assert "5000" in str(info.value) and "-8" in str(info.value)
    assert isinstance(info.value, le.EmbeddingStoreError)


def test_get_sees_own_uncommitted_puts(small_store):
    small_store.put([10, 900], np.full((2, 16), 3.0))
    assert np.array_equal(small_store.get([900, 10]), np.full((2, 16), 3.0, np.float32))
    with EmbeddingStore.open(small_store.path, readonly=True) as reader:
        assert not np.array_equal(reader.get([900]), np.full((1, 16), 3.0, np.float32))
        small_store.commit()
        assert np.array_equal(reader.get([900]), np.full((1, 16), 3.0, np.float32))


def test_get_tensor(small_store):
    tensor = small_store.get_tensor([3, 1, 3])
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
    assert np.array_equal(tensor.numpy(), small_store.get([3, 1, 3]))
    on_cpu = small_store.get_tensor(torch.tensor([2]), device="cpu")
    assert on_cpu.device.type == "cpu" and np.array_equal(on_cpu.numpy(), small_store.get([2]))


def test_get_tensor_float16(store_path):
    with EmbeddingStore.create(store_path, 10, 4, dtype="float16") as store:
        assert store.get_tensor([1]).dtype == torch.float16


# ------------------------------------------------------------------------------ writing
def test_put_casts_and_accepts_tensors(small_store):
    small_store.put([1, 2], np.full((2, 16), 0.5, np.float64))
    small_store.put(torch.tensor([3]), torch.full((1, 16), 1.5, dtype=torch.float64))
    small_store.put([4], np.full((1, 16), 7, np.int64))
    got = small_store.get([1, 2, 3, 4])
    assert np.array_equal(got, np.array([[0.5] * 16, [0.5] * 16, [1.5] * 16, [7.0] * 16], np.float32))


def test_put_to_float16_rounds(store_path):
    with EmbeddingStore.create(store_path, 4, 2, dtype="float16") as store:
        store.put([0], np.array([[0.1, 1000.3]], np.float32))
        assert np.array_equal(store.get([0]), np.array([[0.1, 1000.3]], np.float16))


def test_add_appends_in_row_order_and_is_durable_at_commit(store_path):
    with EmbeddingStore.create(store_path, [4, 2], 3, chunk_rows=2, init="zeros") as store:
        store.add([-9, 50, 7], np.arange(9).reshape(3, 3))
        assert np.array_equal(store.ids, [4, 2, -9, 50, 7])
        assert len(store) == 5 and 50 in store
        assert np.array_equal(store.get([50]), [[3, 4, 5]])
        with EmbeddingStore.open(store_path, readonly=True) as reader:
            assert len(reader) == 2 and 50 not in reader
            store.commit()
            assert len(reader) == 5 and np.array_equal(reader.get([7]), [[6, 7, 8]])
            assert np.array_equal(reader.ids, [4, 2, -9, 50, 7])


def test_add_default_values_follow_init(store_path):
    with EmbeddingStore.create(store_path, 10, 4, init="zeros") as store:
        store.add([100])
        assert not store.get([100]).any()
    with EmbeddingStore.create(store_path, 10, 4, init="normal", overwrite=True) as store:
        store.add([100, 101])
        added = store.get([100, 101])
        assert 0 < np.abs(added).max() < 0.1


def test_add_then_put_then_rollback(small_store):
    before = small_store.get(np.arange(1000))
    small_store.add(np.arange(1000, 1100))
    small_store.put([5, 1050], np.ones((2, 16)))
    small_store.rollback()
    assert len(small_store) == 1000 and 1050 not in small_store
    assert np.array_equal(small_store.get(np.arange(1000)), before)
    small_store.add([1050], np.full((1, 16), 2.0))  # the rolled-back id can be added again
    assert np.array_equal(small_store.get([1050]), np.full((1, 16), 2.0, np.float32))


# ---------------------------------------------------------------- commit / rollback / close
def test_commit_makes_puts_durable_and_rollback_discards(small_store):
    path = small_store.path
    base = small_store.get(np.arange(1000))
    small_store.put([1], np.ones((1, 16)))
    small_store.commit()
    small_store.put([2], np.ones((1, 16)))
    small_store.rollback()
    assert np.array_equal(small_store.get([2]), base[[2]])
    small_store.close()
    with EmbeddingStore.open(path, readonly=True) as store:
        assert np.array_equal(store.get([1]), np.ones((1, 16), np.float32))
        assert np.array_equal(store.get([2]), base[[2]])


def test_close_commits_pending_changes_and_is_idempotent(small_store):
    small_store.put([3], np.full((1, 16), 9.0))
    small_store.close()
    small_store.close()
    with pytest.raises(le.ClosedError):
        small_store.get([3])
    with EmbeddingStore.open(small_store.path) as store:
        assert np.array_equal(store.get([3]), np.full((1, 16), 9.0, np.float32))


def test_context_manager_commits_on_clean_exit_and_rolls_back_on_exception(store_path):
    EmbeddingStore.create(store_path, 10, 2, init="zeros").close()
    with EmbeddingStore.open(store_path) as store:
        store.put([1], np.ones((1, 2)))
    with pytest.raises(RuntimeError):
        with EmbeddingStore.open(store_path) as store:
            store.put([1, 2], np.full((2, 2), 5.0))
            store.add([77])
            raise RuntimeError("boom")
    with EmbeddingStore.open(store_path) as store:  # the writer lock was released by __exit__
        assert np.array_equal(store.get([1, 2]), [[1, 1], [0, 0]])
        assert 77 not in store


def test_commit_every_k_updates(store_path):
    with EmbeddingStore.create(store_path, 100, 2, init="zeros", commit_every=3) as store:
        with EmbeddingStore.open(store_path, readonly=True) as reader:
            store.put([1], np.ones((1, 2)))
            store.put([2], np.ones((1, 2)))
            assert store.stats()["commits"] == 0 and not reader.get([1]).any()
            store.add([500])  # add counts too: the third update commits
            assert store.stats()["commits"] == 1
            assert reader.get([1, 2]).all() and 500 in reader
            store.commit()  # an explicit commit restarts the count
            store.put([3], np.ones((1, 2)))
            store.put([4], np.ones((1, 2)))
            assert not reader.get([3]).any()
            store.put([5], np.ones((1, 2)))
            assert reader.get([3, 4, 5]).all() and store.stats()["commits"] == 2


def test_commit_every_none_never_commits_by_itself(store_path):
    with EmbeddingStore.create(store_path, 10, 2, init="zeros", commit_every=None) as store:
        for i in range(10):
            store.put([i], np.ones((1, 2)))
        assert store.stats()["commits"] == 0 and store.stats()["dirty_chunks"] == 1


def test_commit_without_changes_is_a_no_op(small_store):
    small_store.commit()
    assert small_store.stats()["commits"] == 0 and small_store.commit_count == 0
    small_store.put([0], np.zeros((1, 16)))
    small_store.commit()
    assert small_store.stats()["commits"] == 1 and small_store.commit_count == 1


def test_readonly_handle_refuses_every_write(small_store):
    small_store.ensure_column("m", 2)
    small_store.commit()
    with EmbeddingStore.open(small_store.path, readonly=True) as reader:
        assert reader.readonly
        for call in (lambda: reader.put([1], np.ones((1, 16))), lambda: reader.add([5000]),
                     reader.commit, reader.rollback, lambda: reader.ensure_column("n", 2),
                     lambda: reader.put_column("m", [1], np.ones((1, 2))), lambda: reader.set_attr("k", 1)):
            with pytest.raises(PermissionError) as info:
                call()
            assert isinstance(info.value, le.EmbeddingStoreError) and "read-only" in str(info.value)


def test_properties(store_path):
    with EmbeddingStore.create(store_path, [3, 1], 5, dtype="float16", chunk_rows=7) as store:
        assert store.path == store_path and store.dim == 5 and store.dtype == np.float16
        assert store.chunk_rows == 7 and store.readonly is False and len(store) == 2
        assert isinstance(store.dtype, np.dtype)
    with EmbeddingStore.open(store_path, readonly=True) as store:
        assert store.readonly is True and store.dim == 5 and store.chunk_rows == 7


def test_stats_keys_and_counters(small_store):
    stats = small_store.stats()
    for key in ("l1_hits", "l1_misses", "l2_hits", "l2_misses", "hit_rate", "chunks_loaded", "commits",
                "bytes_committed", "dirty_chunks", "cache_bytes"):
        assert key in stats
    small_store.get([0, 1, 64])  # two chunks, both loaded
    small_store.get([2])  # hit
    stats = small_store.stats()
    assert stats["l1_misses"] == 2 and stats["l1_hits"] == 1 and stats["chunks_loaded"] == 2
    assert 0 < stats["hit_rate"] < 1
    small_store.put([0, 200], np.zeros((2, 16)))
    assert small_store.stats()["dirty_chunks"] == 2
    small_store.commit()
    stats = small_store.stats()
    assert stats["dirty_chunks"] == 0 and stats["commits"] == 1 and stats["bytes_committed"] >= 2 * 64 * 16 * 4


# ------------------------------------------------------------ auxiliary columns and attrs
def test_columns_and_attrs_commit_atomically_and_survive_reopen(small_store):
    small_store.ensure_column("adam_m", 16, fill=0.25)
    small_store.ensure_column("adam_m", 16)  # again: a no-op
    small_store.ensure_column("step", 1, dtype="float64")
    assert np.array_equal(small_store.get_column("adam_m", [5, 999]), np.full((2, 16), 0.25, np.float32))
    small_store.put_column("adam_m", [5], np.ones((1, 16)))
    small_store.put_column("step", [5, 6], np.array([[3.0], [4.0]]))
    small_store.set_attr("opt_step", 12)
    assert small_store.attrs == {"opt_step": 12}
    with EmbeddingStore.open(small_store.path, readonly=True) as reader:
        assert reader.columns == {} and reader.attrs == {}
        small_store.commit()
        assert set(reader.columns) == {"adam_m", "step"} and reader.attrs == {"opt_step": 12}
        assert np.array_equal(reader.get_column("adam_m", [5, 6]), [[1.0] * 16, [0.25] * 16])
        assert reader.get_column("step", [6]).dtype == np.float64
    small_store.close()
    with EmbeddingStore.open(small_store.path) as store:
        assert store.columns["adam_m"] == {"width": 16, "dtype": "float32", "fill": 0.25}
        assert np.array_equal(store.get_column("step", [5, 6, 7]), [[3.0], [4.0], [0.0]])
        assert store.attrs == {"opt_step": 12}
        store.add([5000])  # new rows of an auxiliary column start at its fill
        assert np.array_equal(store.get_column("adam_m", [5000]), np.full((1, 16), 0.25, np.float32))


def test_columns_and_attrs_roll_back(small_store):
    small_store.ensure_column("kept", 2)
    small_store.set_attr("a", 1)
    small_store.commit()
    small_store.put_column("kept", [1], np.ones((1, 2)))
    small_store.ensure_column("dropped", 2)
    small_store.set_attr("a", 2)
    small_store.rollback()
    assert set(small_store.columns) == {"kept"} and small_store.attrs == {"a": 1}
    assert not small_store.get_column("kept", [1]).any()
    with pytest.raises(ValueError, match="ensure_column"):
        small_store.get_column("dropped", [1])


def test_column_errors(small_store):
    small_store.ensure_column("c", 2)
    with pytest.raises(ValueError, match="width 2"):
        small_store.ensure_column("c", 3)
    for bad in ("", "embeddings", "a/b"):
        with pytest.raises(ValueError):
            small_store.ensure_column(bad, 2)
    with pytest.raises(ValueError):
        small_store.put_column("c", [1], np.ones((1, 3)))
    with pytest.raises(KeyError):
        small_store.put_column("c", [123456], np.ones((1, 2)))
    with pytest.raises(ValueError, match="msgpack"):
        small_store.set_attr("k", object())


def test_reader_in_another_process_sees_committed_columns(small_store):
    small_store.ensure_column("m", 3, fill=1.0)
    small_store.put_column("m", [7], np.full((1, 3), 2.0))
    small_store.set_attr("step", 5)
    small_store.commit()
    code = (
        "import sys, lmdb_embeddings as le\n"
        "s = le.EmbeddingStore.open(sys.argv[1], readonly=True)\n"
        "print(s.attrs['step'], s.get_column('m', [7, 8]).tolist())\n"
    )
    out = run_python(code, small_store.path).stdout.split(maxsplit=1)
    assert out[0] == "5" and out[1].strip() == "[[2.0, 2.0, 2.0], [1.0, 1.0, 1.0]]"


_THREADS = """
import sys, threading, numpy as np, lmdb_embeddings as le
store = le.EmbeddingStore.create(sys.argv[1], 4096, 32, chunk_rows=64, cache_mb=1 / 16, init="zeros")

def in_thread(fn):
    t = threading.Thread(target=fn)
    t.start()
    t.join()

in_thread(lambda: store.put(np.arange(4096), np.ones((4096, 32))))  # spills: the write txn begins here
assert store.stats()["spilled_chunks"] > 0
store.commit()                                                        # ... and ends in another thread
in_thread(lambda: store.put(np.arange(4096), np.full((4096, 32), 5.0)))
store.rollback()
in_thread(lambda: (store.put([2], np.full((1, 32), 3.0)), store.commit()))
store.close()
with le.EmbeddingStore.open(sys.argv[1], readonly=True) as reader:
    print(reader.get([0, 1, 2])[:, 0].tolist())
"""


def test_a_handle_shared_by_threads_commits_what_another_thread_spilled(store_path):
    # LMDB ties a write transaction to the thread that began it; spills begin it in whichever
    # thread called put. A hang here would be caught by run_python's timeout.
    assert run_python(_THREADS, store_path, timeout=60).stdout.split() == ["[1.0,", "1.0,", "3.0]"]
