"""The row-level write buffer (``core/write_buffer.py``): writes beyond the cache cost a row, not a chunk.

A writer of a table larger than its L1 keeps rows written to chunks that are not in L1 in a bounded
buffer, merged into their chunks (each changed chunk rewritten ONCE per merge) when it is full and at
commit. Checked here through the public API on real LMDB stores: what reads return at every moment (a
numpy model), that no chunk is loaded per row, that rollback, reopen and readers see exactly the committed
state, and that a write-heavy shuffled pass over a table 10x the cache with ONE commit stays within the
cache's memory and a small multiple of the table on disk (a real subprocess, its own RssAnon sampled).
The cache-level model check is ``tests/testing/test_cache_model.py``; kill -9 during merges and readers during
merges are in ``tests/torture/test_write_buffer_crash.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from checkout import run_python

import lmdb_embeddings as le

DIM = 32


def _create(path: str, rows: int, **options) -> le.EmbeddingStore:
    return le.EmbeddingStore.create(path, rows, DIM, chunk_rows=128, seed=0, cache_mb=0.25, **options)


@pytest.mark.parametrize("writemap", [True, False])  # the pending transaction's values in the map, or malloc'd
def test_buffered_puts_and_gets_match_a_numpy_model_across_merges_commit_and_rollback(store_path, writemap):
    rows = 20_000  # 2.4 MiB of rows + a state column, through a 0.25 MiB cache
    store = _create(store_path, rows, writemap=writemap)
    try:
        store.ensure_column("m", DIM)
        model, state = store.get(store.ids), np.zeros((rows, DIM), np.float32)
        committed = (model.copy(), state.copy())
        rng = np.random.default_rng(0)
        for step in range(60):
            ids = rng.choice(rows, 300, replace=False)
            v = rng.standard_normal((300, DIM)).astype(np.float32)
            store.put_column("m", ids, v * 2)
            store.put(ids, v)
            model[ids], state[ids] = v, v * 2
            probe = rng.integers(0, rows, 900)  # duplicates, buffered and merged rows, rows from the map
            assert np.array_equal(store.get(probe), model[probe]), step
            assert np.array_equal(store.get_column("m", probe), state[probe]), step
            if step == 20:
                store.commit()
                committed = (model.copy(), state.copy())
            if step == 40:  # everything since the commit is gone, the buffer included
                store.rollback()
                model, state = committed[0].copy(), committed[1].copy()
                assert store.stats()["buffered_rows"] == 0
        stats = store.stats()
        assert stats["buffer_merges"] > 0 and stats["buffered_rows"] > 0
        store.commit()
        assert store.stats()["buffered_rows"] == 0
    finally:
        store.close()
    with le.EmbeddingStore.open(store_path, readonly=True) as reader:
        assert np.array_equal(reader.get(reader.ids), model)
        assert np.array_equal(reader.get_column("m", reader.ids), state)


def test_a_put_beyond_the_cache_loads_no_chunk_and_a_merge_rewrites_each_chunk_once(store_path):
    """Without the buffer every row written to a chunk not in L1 loads that chunk (and later spills it
    whole); with it, nothing is loaded for the puts, and a merge writes each changed chunk once."""
    rows = 20_000  # 157 chunks
    with _create(store_path, rows) as store:
        rng = np.random.default_rng(1)
        ids = rng.choice(rows, 1000, replace=False)
        store.put(ids, np.ones((1000, DIM), np.float32))
        stats = store.stats()
        assert stats["chunks_loaded"] == 0 and stats["buffered_rows"] == 1000
        store.commit()
        stats = store.stats()
        changed_chunks = len(np.unique(ids // 128))
        assert stats["buffer_merges"] == 1 and stats["merged_chunks"] == changed_chunks
        assert np.array_equal(store.get(ids), np.ones((1000, DIM), np.float32))


def test_add_beyond_the_cache_goes_through_the_buffer_and_a_failed_add_leaves_no_rows(store_path):
    with _create(store_path, 10_000) as store:
        new = np.arange(10_000, 10_300)
        store.add(new, np.full((300, DIM), 3.0, np.float32))
        assert store.stats()["buffered_rows"] == 300
        with pytest.raises(le.EmbeddingStoreError):
            store.add([10_300, 10_300], np.zeros((2, DIM), np.float32))  # duplicate IDs: refused, nothing added
        assert len(store) == 10_300
        store.commit()
    with le.EmbeddingStore.open(store_path, readonly=True) as reader:
        assert np.array_equal(reader.get(new), np.full((300, DIM), 3.0, np.float32))


def test_write_buffer_off_keeps_the_chunk_path(store_path):
    with _create(store_path, 20_000, write_buffer=False) as store:
        store.put(np.arange(0, 20_000, 997), np.ones((21, DIM), np.float32))
        stats = store.stats()
        assert stats["buffered_rows"] == 0 and stats["chunks_loaded"] > 0


CHILD = r"""
import json, os, sys, threading, time
import numpy as np
import lmdb_embeddings as le

def anon_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

path, cache_mb, table_mb, write_buffer = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
dim = 128
rows = table_mb * (1 << 20) // (dim * 4)
le.EmbeddingStore.create(path, rows, dim, init="zeros").close()
store = le.EmbeddingStore.open(path, cache_mb=cache_mb, write_buffer=write_buffer)
data = os.path.join(path, "data.mdb")
peak, disk = [anon_kib()], [0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], anon_kib())
        disk[0] = max(disk[0], os.stat(data).st_blocks * 512)
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
order = np.random.default_rng(0).permutation(rows)
for batch in np.array_split(order, rows // 2048):  # every row written once, in shuffled order
    store.put(batch, np.repeat(batch.astype(np.float32)[:, None], dim, axis=1))
stats = store.stats()
store.commit()
stop.set()
peak[0] = max(peak[0], anon_kib())
disk[0] = max(disk[0], os.stat(data).st_blocks * 512)
store.close()
with le.EmbeddingStore.open(path, readonly=True) as reader:
    got = reader.get(reader.ids)
    ok = bool((got == np.arange(rows, dtype=np.float32)[:, None]).all())
print(json.dumps({"peak_mb": peak[0] / 1024, "disk_x_table": disk[0] / (rows * dim * 4), "ok": ok,
                  "merges": stats["buffer_merges"], "loaded": stats["chunks_loaded"]}))
"""

CACHE_MB, TABLE_MB = 12, 120  # the table is 10x the cache
OVERHEAD_MB = 110  # interpreter + numpy + lmdb + msgpack (as tests/processes/test_memory_bound.py)


def test_write_heavy_shuffled_pass_10x_the_cache_then_one_commit_stays_within_memory_and_disk(tmp_path):
    proc = run_python(CHILD, str(tmp_path / "store"), str(CACHE_MB), str(TABLE_MB), "1", timeout=600)
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["ok"] and seen["merges"] > 0 and seen["loaded"] == 0, seen
    assert seen["peak_mb"] <= CACHE_MB + OVERHEAD_MB, seen
    assert seen["disk_x_table"] <= 3.0, seen


def test_the_row_buffer_matches_a_dict_through_appends_inserts_takes_cuts_and_compactions():
    """RowWriteBuffer alone against a dict: runs of keys past the held ones (appended in place), random keys
    (inserted), keys written twice, chunks taken out, ranges dropped, compactions; keys stay sorted and unique."""
    from lmdb_embeddings.core.write_buffer import RowWriteBuffer

    rng = np.random.default_rng(5)
    buffer = RowWriteBuffer(3, np.float32)
    buffer.set_budget(400 * (12 + 16))
    model: dict[int, np.ndarray] = {}
    for step in range(400):
        action = rng.integers(0, 6)
        if action <= 2:  # a run past the held keys, random keys, or both kinds at once
            top = max(model, default=-1)
            run = np.arange(top + 1, top + 1 + rng.integers(1, 20), dtype=np.int64)
            scattered = rng.choice(2000, size=rng.integers(1, 20), replace=False).astype(np.int64)
            slots = run if action == 0 else scattered if action == 1 else np.unique(np.concatenate([run, scattered]))
            slots = rng.permutation(slots) if action == 2 else slots
            new = sum(int(k) not in model for k in slots.tolist())
            if new > buffer.room:
                buffer.compact() if buffer.limit - len(buffer) >= new else (buffer.clear(), model.clear())
            values = rng.standard_normal((len(slots), 3)).astype(np.float32)
            buffer.write(slots, values)
            model.update(zip(slots.tolist(), values, strict=True))
        elif action == 3 and model:  # a chunk of 16 slots comes into L1 and takes its rows
            lo = int(rng.choice(list(model))) // 16 * 16
            keys, rows = buffer.take(lo, lo + 16)
            assert keys.tolist() == sorted(k for k in model if lo <= k < lo + 16)
            for k, row in zip(keys.tolist(), rows, strict=True):
                assert np.array_equal(row, model.pop(k))
        elif action == 4 and model:
            lo = int(rng.integers(0, max(model) + 1))
            buffer.drop_range(lo, lo + 50)
            model = {k: v for k, v in model.items() if not lo <= k < lo + 50}
        else:
            buffer.compact()
        held = sorted(model)
        assert buffer.keys.tolist() == held, f"step {step}"
        if held:
            out = np.zeros((len(held), 3), np.float32)
            buffer.overlay(np.array(held, np.int64), out)
            assert np.array_equal(out, np.array([model[k] for k in held])), f"step {step}"
