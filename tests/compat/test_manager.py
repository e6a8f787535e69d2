"""The drop-in TrainableEmbeddingManager: the original's workload, methods, types, durability."""

from __future__ import annotations

import logging
import os
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from checkout import kill_9_once  # noqa: E402

import lmdb_embeddings as le  # noqa: E402
from lmdb_embeddings.compat.manager import UnknownChunkError  # noqa: E402

DIM = 128
N = 1000
# The original benchmark's three configurations (its own numbers).
CONFIGS = {
    "sync_every_update": dict(auto_sync=True, cache_l1_size_mb=1024, cache_l2_size_mb=2048, enable_l3_cache=False,
                              sync_batch_size=1),
    "batched_sync": dict(auto_sync=True, cache_l1_size_mb=128, cache_l2_size_mb=256, enable_l3_cache=True,
                         sync_batch_size=10),
    "no_auto_sync": dict(auto_sync=False, cache_l1_size_mb=256, cache_l2_size_mb=512, enable_l3_cache=True,
                         sync_batch_size=20),
}
# 1 warm-up update + 30 updates: commits after every K-th, force_sync commits the rest
EXPECTED_SYNCS = {"sync_every_update": 31, "batched_sync": 4, "no_auto_sync": 1}


def make(tmp_path, **kw):
    args = dict(sample_ids=list(range(N)), embedding_dim=DIM, device="cpu", storage_mode="disk",
                embeddings_dir=str(tmp_path / "emb"), chunk_size=100, seed=3)
    args.update(kw)
    return le.TrainableEmbeddingManager(**args)


def committed_rows(manager) -> np.ndarray:
    """The rows as committed on disk, read through an independent read-only handle."""
    with le.EmbeddingStore.open(manager.store_path, readonly=True) as reader:
        return reader.get(reader.ids)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_original_benchmark_workload_is_bit_exact_after_reopen(tmp_path, name, capsys):
    config = CONFIGS[name]
    m = make(tmp_path, **config)
    ids_all, start = m.get_all_embeddings()
    assert ids_all == list(range(N))
    ref = start.numpy().copy()
    rng = np.random.default_rng(7)
    torch.manual_seed(7)

    warm = list(range(32))
    assert torch.equal(m.get_embeddings(warm), torch.from_numpy(ref[warm]))
    vals = torch.randn(32, DIM)
    m.update_embeddings(warm, vals)
    ref[warm] = vals.numpy()
    for _ in range(30):
        batch = rng.choice(N, size=32, replace=False).tolist()
        got = m.get_embeddings(batch)
        assert torch.equal(got, torch.from_numpy(ref[batch]))  # sees its own uncommitted updates
        vals = torch.randn(32, DIM)
        m.update_embeddings(batch, vals)
        ref[batch] = vals.numpy()
    if not config["auto_sync"]:
        assert np.array_equal(committed_rows(m), start.numpy())  # nothing committed before the explicit sync
    m.force_sync_all_chunks()
    assert m.get_cache_performance()["sync_operations"] == EXPECTED_SYNCS[name]
    assert np.array_equal(committed_rows(m), ref)  # durable at the sync, before close
    m.close()

    again = make(tmp_path, **config)
    ids_again, table = again.get_all_embeddings()
    assert ids_again == list(range(N))
    assert table.dtype == torch.float32
    assert np.array_equal(table.numpy(), ref)  # every row bit-exact
    again.close()
    out, err = capsys.readouterr()
    assert out == "" and err == ""  # prints nothing


def test_auto_sync_commits_every_sync_batch_size_updates(tmp_path):
    m = make(tmp_path, auto_sync=True, sync_batch_size=3)
    before = committed_rows(m)
    for k in range(2):
        m.update_embeddings([k], torch.full((1, DIM), float(k + 1)))
    assert np.array_equal(committed_rows(m), before)
    m.update_embeddings([2], torch.full((1, DIM), 3.0))
    after = committed_rows(m)
    assert [after[k, 0] for k in range(3)] == [1.0, 2.0, 3.0]
    assert m.get_disk_usage_info()["pending_updates_count"] == 0
    m.update_embeddings([5, 6], torch.zeros(2, DIM))
    assert m.get_disk_usage_info()["pending_updates_count"] == 2
    m.close()  # auto_sync on: close commits the pending update
    assert np.all(committed_rows(m)[[5, 6]] == 0)


def test_auto_sync_false_commits_only_on_explicit_syncs(tmp_path):
    m = make(tmp_path, auto_sync=False, sync_batch_size=1)
    base = committed_rows(m)
    for k in range(5):
        m.update_embeddings([k], torch.full((1, DIM), 9.0))
    assert np.array_equal(committed_rows(m), base)
    m.sync_dirty_chunks_to_disk()
    assert np.all(committed_rows(m)[:5] == 9.0)
    m.update_embeddings([10], torch.full((1, DIM), 4.0))
    assert committed_rows(m)[10, 0] != 4.0
    m.save_final_embeddings()
    assert committed_rows(m)[10, 0] == 4.0
    m.update_embeddings([11], torch.full((1, DIM), 5.0))
    m.force_sync_all_chunks()
    assert committed_rows(m)[11, 0] == 5.0
    m.update_embeddings([12], torch.full((1, DIM), 6.0))
    m.close()  # auto_sync off: the unsynced update is discarded
    assert committed_rows(m)[12, 0] == base[12, 0]
    again = make(tmp_path)
    assert again.get_embeddings([12])[0, 0].item() == base[12, 0]
    again.close()


def test_enable_auto_sync_switches_and_syncs(tmp_path):
    m = make(tmp_path, auto_sync=False, sync_batch_size=2)
    m.update_embeddings([1], torch.ones(1, DIM))
    assert m.enable_auto_sync(True) is None
    assert committed_rows(m)[1, 0] == 1.0  # switching on commits the current state
    m.update_embeddings([2], torch.ones(1, DIM))
    m.update_embeddings([3], torch.ones(1, DIM))
    assert committed_rows(m)[3, 0] == 1.0
    m.enable_auto_sync(False)
    for k in range(4, 8):
        m.update_embeddings([k], torch.ones(1, DIM))
    assert committed_rows(m)[7, 0] != 1.0
    m.close()


def test_chunk_by_chunk_loop(tmp_path):
    rng = np.random.default_rng(1)
    sample_ids = rng.choice(10**9, size=1050, replace=False)  # not contiguous, any order
    order = np.sort(sample_ids)
    m = le.TrainableEmbeddingManager(sample_ids=sample_ids.tolist(), embedding_dim=16, device="cpu",
                                     storage_mode="disk", embeddings_dir=str(tmp_path / "emb"), chunk_size=100,
                                     cache_l1_size_mb=0, cache_l2_size_mb=0, auto_sync=False)
    assert m.num_chunks == 11 and m.store.chunk_rows == 100
    _, table = m.get_all_embeddings()
    ref = table.numpy().copy()
    for c in range(m.num_chunks):
        ids, emb = m.get_embeddings_by_chunk(c)
        assert isinstance(ids, list) and ids == order[c * 100 : (c + 1) * 100].tolist()  # sorted-id grouping
        assert np.array_equal(emb.numpy(), ref[c * 100 : (c + 1) * 100])
        param = emb.clone().requires_grad_()
        loss = (param ** 2).sum()
        loss.backward()
        with torch.no_grad():
            param -= 0.1 * param.grad  # an optimizer step
        assert m.update_embeddings_by_chunk(c, ids, param) is None
        ref[c * 100 : c * 100 + len(ids)] = param.detach().numpy()
    m.force_sync_all_chunks()
    assert np.array_equal(committed_rows(m), ref)
    with pytest.raises(ValueError, match="not in that chunk"):
        m.update_embeddings_by_chunk(0, [int(order[500])], torch.zeros(1, 16))
    with pytest.raises(ValueError, match="Length mismatch"):
        m.update_embeddings_by_chunk(0, [int(order[0])], torch.zeros(2, 16))
    with pytest.raises(UnknownChunkError) as info:
        m.get_embeddings_by_chunk(11)
    assert isinstance(info.value, ValueError) and isinstance(info.value, FileNotFoundError)
    # the served id list, reordered in place: rows follow the ids, not the served order
    ids, emb = m.get_embeddings_by_chunk(4)
    ids.reverse()
    m.update_embeddings_by_chunk(4, ids, torch.flip(emb, [0]) + 1)
    assert torch.equal(m.get_embeddings_by_chunk(4)[1], emb + 1)
    # part of a chunk, repeated id: the last value wins (the original's dict semantics)
    first = int(order[0])
    m.update_embeddings_by_chunk(0, [first, first], torch.stack([torch.zeros(16), torch.ones(16)]))
    assert torch.equal(m.get_embeddings([first])[0], torch.ones(16))
    m.close()


def test_memory_mode_keeps_the_whole_table_resident(tmp_path):
    m = make(tmp_path, storage_mode="memory", cache_l1_size_mb=0, cache_l2_size_mb=0, auto_sync=False)
    stats = m.store.stats()
    assert stats["l1_chunks"] == m.num_chunks == 10
    loaded = stats["chunks_loaded"]
    rng = np.random.default_rng(0)
    for _ in range(20):
        batch = rng.choice(N, 64, replace=False).tolist()
        m.update_embeddings(batch, m.get_embeddings(batch) + 1)
    assert m.store.stats()["chunks_loaded"] == loaded  # no chunk was read again
    assert m.get_cache_performance()["l1_usage_percent"] > 50
    _, table = m.get_all_embeddings()
    m.force_sync_all_chunks()
    m.close()
    again = make(tmp_path, storage_mode="memory")
    assert np.array_equal(again.get_all_embeddings()[1].numpy(), table.numpy())
    again.close()


def test_methods_and_return_types(tmp_path):
    class FeatureManager:
        chunk_size = 250

    m = make(tmp_path, feature_manager=FeatureManager(), auto_sync=False)
    assert m.chunk_size == 250 and m.num_chunks == 4
    emb = m.get_embeddings([3, 1, 3])
    assert isinstance(emb, torch.Tensor) and emb.shape == (3, DIM) and emb.device.type == "cpu"
    assert torch.equal(emb[0], emb[2])
    assert m.update_embeddings([1], torch.zeros(1, DIM)) is None
    ids, chunk = m.get_embeddings_by_chunk(1)
    assert ids == list(range(250, 500)) and chunk.shape == (250, DIM)
    assert m.update_embeddings_by_chunk(1, ids, chunk * 2) is None
    all_ids, table = m.get_all_embeddings()
    assert isinstance(all_ids, list) and all_ids == list(range(N)) and table.shape == (N, DIM)
    assert m.force_sync_all_chunks() is None
    assert m.sync_dirty_chunks_to_disk() is None

    perf = m.get_cache_performance()
    assert set(perf) == {"cache_hit_rate", "total_requests", "disk_load_ratio", "sync_operations",
                         "l1_usage_percent", "l2_usage_percent"}
    assert all(isinstance(v, (int, float)) for v in perf.values())
    assert 0.0 <= perf["cache_hit_rate"] <= 1.0 and perf["total_requests"] > 0 and perf["sync_operations"] == 1

    assert m.optimize_cache_settings(32) is None and m.sync_batch_size == 8
    m.optimize_cache_settings(1000)
    assert m.sync_batch_size == 20

    info = m.get_disk_usage_info()
    for key in ("embeddings_dir", "total_size_mb", "num_chunks", "chunk_details", "storage_mode", "auto_sync",
                "sync_batch_size", "cache_info", "performance_stats", "dirty_chunks_count",
                "pending_updates_count"):
        assert key in info
    assert info["num_chunks"] == 4 and info["total_size_mb"] > 0 and info["dirty_chunks_count"] == 0
    assert sum(d["sample_count"] for d in info["chunk_details"].values()) == N
    assert set(info["cache_info"]) >= {"l1_items", "l1_size_mb", "l1_max_mb", "l2_items", "l2_size_mb",
                                       "l2_max_mb", "l3_enabled", "stats", "hit_rate"}

    stats = m.get_embedding_statistics()
    full = table.double()
    norms = full.norm(dim=1)
    assert stats["total_samples"] == N and stats["num_frozen"] == 0
    assert stats["mean_norm"] == pytest.approx(norms.mean().item(), rel=1e-9)
    assert stats["std_norm"] == pytest.approx(norms.std().item(), rel=1e-6)
    assert torch.allclose(stats["mean_values"].double(), full.mean(0), atol=1e-7)
    assert torch.allclose(stats["std_values"].double(), full.std(0), rtol=1e-5)
    assert torch.equal(stats["min_values"], table.min(0).values)
    assert torch.equal(stats["max_values"], table.max(0).values)

    unit = make(tmp_path / "unit", sample_ids=list(range(300)), embedding_dim=8, chunk_size=64)
    rows = torch.nn.functional.normalize(torch.randn(300, 8, dtype=torch.float64), dim=1).float()
    unit.update_embeddings(list(range(300)), rows)
    unit_stats = unit.get_embedding_statistics()  # unit-norm rows: the norms' spread is ~1e-8, not noise
    assert unit_stats["std_norm"] == pytest.approx(rows.double().norm(dim=1).std().item(), rel=1e-3, abs=1e-12)
    unit.close()

    saved = tmp_path / "final"
    assert m.save_final_embeddings(str(saved)) is None
    assert m.embeddings_dir == saved and m.store_path.startswith(str(saved))
    assert np.array_equal(m.get_all_embeddings()[1].numpy(), table.numpy())  # continues on the copy
    m.close()
    with le.EmbeddingStore.open(str(tmp_path / "emb" / "embeddings.lmdb"), readonly=True) as original:
        assert np.array_equal(original.get(original.ids), table.numpy())


def test_unknown_and_repeated_ids(tmp_path):
    m = make(tmp_path)
    with pytest.raises(KeyError, match="99999"):
        m.get_embeddings([5, 99999])
    with pytest.raises(ValueError):  # the original raised ValueError
        m.update_embeddings([99999], torch.zeros(1, DIM))
    with pytest.raises(ValueError, match="shape"):
        m.update_embeddings([1, 2], torch.zeros(3, DIM))
    m.update_embeddings([4, 5, 4], torch.stack([torch.zeros(DIM), torch.ones(DIM), torch.full((DIM,), 2.0)]))
    assert m.get_embeddings([4, 5])[:, 0].tolist() == [2.0, 1.0]
    with pytest.raises(ValueError, match="duplicates"):
        le.TrainableEmbeddingManager([1, 2, 2], 4, device="cpu", embeddings_dir=str(tmp_path / "dup"))
    with pytest.raises(ValueError, match="storage_mode"):
        le.TrainableEmbeddingManager([1, 2], 4, device="cpu", storage_mode="ssd", embeddings_dir=str(tmp_path / "x"))
    m.close()


def test_a_plain_writable_handle_in_this_process_refuses_a_manager(tmp_path):
    """Managers on one directory share their store (tests/compat/test_manager_sharing.py); a plain writer does not."""
    first = make(tmp_path)
    path = first.store_path
    first.close()
    with le.EmbeddingStore.open(path):
        with pytest.raises(le.WriterLockedError, match="EmbeddingStore handle") as info:
            make(tmp_path)
        assert info.value.holder_pid == os.getpid()
    second = make(tmp_path)  # fine once the writer is closed
    del second  # dropped without close(): an unreachable manager does not block the next one
    third = make(tmp_path)
    third.close()


def test_context_manager(tmp_path):
    with make(tmp_path, auto_sync=True, sync_batch_size=100) as m:
        m.update_embeddings([0], torch.full((1, DIM), 7.0))
    assert committed_rows(m)[0, 0] == 7.0  # auto_sync on: leaving the block commits
    with pytest.raises(RuntimeError):
        with make(tmp_path, auto_sync=True, sync_batch_size=100) as m:
            m.update_embeddings([0], torch.full((1, DIM), 8.0))
            raise RuntimeError("boom")
    assert committed_rows(m)[0, 0] == 7.0  # an exception discards the pending update
    with pytest.raises(le.ClosedError):
        m.get_embeddings([0])


def test_resume_adds_new_ids_and_checks_dim(tmp_path):
    m = make(tmp_path)
    m.update_embeddings([0], torch.ones(1, DIM))
    m.force_sync_all_chunks()
    m.close()
    grown = make(tmp_path, sample_ids=list(range(N + 20)))
    assert len(grown.sample_ids) == N + 20
    assert grown.get_embeddings([0])[0, 0].item() == 1.0
    assert grown.get_embeddings([N + 19]).abs().max().item() > 0  # initialized, not empty
    grown.close()
    with pytest.raises(ValueError, match="dim"):
        make(tmp_path, embedding_dim=DIM + 1)


def test_resume_after_kill_9_between_two_syncs(tmp_path):
    emb = str(tmp_path / "emb")
    child = textwrap.dedent(f"""
        import sys, time, torch, lmdb_embeddings as le
        m = le.TrainableEmbeddingManager(list(range({N})), {DIM}, device="cpu", storage_mode="disk",
                                         embeddings_dir={emb!r}, chunk_size=100, auto_sync=True, sync_batch_size=2)
        for step in range(5):
            m.update_embeddings([step * 7, step * 7 + 1], torch.full((2, {DIM}), float(step + 1)))
            if step == 3:
                print("SYNCED", flush=True)
        print("READY", flush=True)
        time.sleep(60)
    """)
    kill_9_once(child, ready=lambda lines: "READY" in lines)
    m = make(tmp_path)
    for step in range(4):  # updates 1-4 were committed by the two auto-syncs
        assert torch.all(m.get_embeddings([step * 7, step * 7 + 1]) == float(step + 1))
    fifth = m.get_embeddings([28, 29])
    assert not torch.any(fifth == 5.0)  # the unsynced fifth update is gone
    m.close()


def test_imports_original_chunk_files_once_and_logs_it(tmp_path, caplog, capsys):
    from upstream_managers import write_original

    emb = tmp_path / "emb"
    ids = np.arange(0, 450, dtype=np.int64)
    rows = np.random.default_rng(2).standard_normal((450, 8)).astype(np.float32)
    files = write_original(emb, ids, rows, chunk_size=100)
    before = {f: os.path.getmtime(f) for f in files}
    with caplog.at_level(logging.INFO, logger="lmdb_embeddings"):
        m = le.TrainableEmbeddingManager(ids.tolist(), 8, device="cpu", storage_mode="disk",
                                         embeddings_dir=str(emb), chunk_size=100)
    assert sum("importing" in r.getMessage() for r in caplog.records) == 1
    assert capsys.readouterr() == ("", "")  # told through logging only
    assert np.array_equal(m.get_all_embeddings()[1].numpy(), rows)
    assert m.get_embeddings_by_chunk(2)[0] == list(range(200, 300))  # chunk ids kept
    m.update_embeddings([0], torch.zeros(1, 8))
    m.force_sync_all_chunks()
    m.close()
    assert {f: os.path.getmtime(f) for f in files} == before  # old files untouched
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lmdb_embeddings"):
        again = le.TrainableEmbeddingManager(ids.tolist(), 8, device="cpu", storage_mode="disk",
                                             embeddings_dir=str(emb), chunk_size=100)
    assert not any("importing" in r.getMessage() for r in caplog.records)  # resumes the store
    assert again.get_embeddings([0]).abs().max().item() == 0.0
    again.close()
