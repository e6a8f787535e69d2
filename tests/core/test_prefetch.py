"""``store.prefetch(ids)``: a hint served by a background thread; it returns at once and changes no result."""

from __future__ import annotations

import gc
import multiprocessing
import threading
import time

import numpy as np
import pytest
from checkout import run_python
from dist_harness import free_port

import lmdb_embeddings as le
from lmdb_embeddings.core import prefetch as prefetch_module
from lmdb_embeddings.format import chunks as chunk_format

N, DIM, CHUNK = 20_000, 16, 64


def _values():
    return np.arange(N * DIM, dtype=np.float32).reshape(N, DIM)


@pytest.fixture
def table(store_path):
    le.EmbeddingStore.create(store_path, N, DIM, chunk_rows=CHUNK, init=_values()).close()
    return store_path


def _threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "lmdb-embeddings-prefetch"]


def test_prefetch_moves_the_lookups_and_checksums_off_the_callers_thread(table, monkeypatch):
    hashed_in: list[str] = []
    real = chunk_format.checksum

    def checksum(payload, index):
        hashed_in.append(threading.current_thread().name)
        return real(payload, index)

    monkeypatch.setattr(chunk_format, "checksum", checksum)
    values = _values()
    order = np.random.default_rng(0).permutation(N)
    batches = np.array_split(order, 40)
    with le.EmbeddingStore.open(table, readonly=True, cache_mb=0.05) as reader:
        hashed_in.clear()
        reader.prefetch(batches[0])
        for i, batch in enumerate(batches):
            if i + 1 < len(batches):
                reader.prefetch(batches[i + 1])  # one batch ahead, as a training loop does
            reader._prefetcher.wait_idle()
            assert np.array_equal(reader.get(batch), values[batch])
        assert hashed_in and set(hashed_in) == {"lmdb-embeddings-prefetch"}  # every chunk verified ahead
        assert reader._prefetcher.served == len(batches)


def test_prefetch_ignores_unknown_ids_and_changes_no_result(store_path):
    with le.EmbeddingStore.create(store_path, [5, 9, 11], 4, init="zeros") as store:
        store.prefetch([5, 123456, -7])  # unknown IDs are ignored
        store.prefetch([])
        store.prefetch(np.array([9, 9, 9]))
        store._prefetcher.wait_idle()
        store.put([9], np.ones((1, 4)))
        store.prefetch([9, 5])
        assert np.array_equal(store.get([9, 5]), [[1.0] * 4, [0.0] * 4])  # its own uncommitted put
        with pytest.raises(le.EmbeddingStoreError):
            store.prefetch(["a"])  # not IDs: the call's own check, as get's
    with pytest.raises(le.EmbeddingStoreError, match="closed"):
        store.prefetch([5])


def test_prefetch_loads_chunks_of_a_table_that_fits_the_cache(store_path):
    with le.EmbeddingStore.create(store_path, N, DIM, chunk_rows=CHUNK, init="zeros") as store:
        assert store.stats()["chunks_loaded"] == 0
        store.prefetch(np.arange(0, N, CHUNK))
        store._prefetcher.wait_idle()
        loaded = store.stats()["chunks_loaded"]
        assert loaded == -(-N // CHUNK)
        store.get(np.arange(N))
        assert store.stats()["chunks_loaded"] == loaded  # the get found every chunk in L1


def test_the_prefetch_thread_ends_when_idle_closed_or_collected(table, monkeypatch):
    monkeypatch.setattr(prefetch_module, "IDLE_S", 0.2)
    before = len(_threads())
    reader = le.EmbeddingStore.open(table, readonly=True, cache_mb=0.05)
    reader.prefetch([1, 2, 3])
    assert len(_threads()) == before + 1
    deadline = time.time() + 5
    while len(_threads()) > before and time.time() < deadline:
        time.sleep(0.05)
    assert len(_threads()) == before  # idle: gone
    reader.prefetch([4])  # started again
    reader.close()
    deadline = time.time() + 5
    while len(_threads()) > before and time.time() < deadline:
        time.sleep(0.05)
    assert len(_threads()) == before
    reader = le.EmbeddingStore.open(table, readonly=True, cache_mb=0.05)
    reader.prefetch(np.arange(100))
    reader._prefetcher.wait_idle()
    del reader
    gc.collect()
    deadline = time.time() + 5
    while len(_threads()) > before and time.time() < deadline:
        time.sleep(0.05)
    assert len(_threads()) == before  # the thread never kept the handle alive


def _child_reads(store, queue):
    try:
        store.prefetch(np.arange(0, N, 7))
        rows = store.get(np.arange(0, N, 7))
        queue.put(float(rows.sum()))
    except BaseException as exc:  # pragma: no cover - reported to the parent
        queue.put(repr(exc))


def test_a_forked_child_prefetches_with_its_own_thread(table):
    expected = float(_values()[::7].sum())
    with le.EmbeddingStore.open(table, readonly=True, cache_mb=0.05) as reader:
        stop = threading.Event()

        def keep_hinting():
            rng = np.random.default_rng(1)
            while not stop.is_set():
                reader.prefetch(rng.integers(0, N, 256))

        hinter = threading.Thread(target=keep_hinting)
        hinter.start()
        try:
            ctx = multiprocessing.get_context("fork")
            for _ in range(4):  # forks while the parent's prefetch thread is busy
                queue = ctx.Queue()
                child = ctx.Process(target=_child_reads, args=(reader, queue))
                child.start()
                assert queue.get(timeout=60) == expected
                child.join(30)
                assert child.exitcode == 0
        finally:
            stop.set()
            hinter.join()
        assert float(reader.get(np.arange(0, N, 7)).sum()) == expected


SHARDED = r"""
import sys
import numpy as np
import torch.distributed as dist
from lmdb_embeddings.distributed import ShardedEmbeddingStore
from lmdb_embeddings.format.layout import choose_chunk_rows

dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=0, world_size=1)
store = ShardedEmbeddingStore.create(sys.argv[1], 5000, 8, init="zeros")
assert store.chunk_rows == choose_chunk_rows(8 * 4)  # chunk_rows=None: the store chose
store.prefetch(np.arange(0, 6000, 7))  # rows 5000 and up are unknown: ignored
assert store.local._prefetcher.wait_idle() and store.local._prefetcher.served == 1
print(float(store.get(np.arange(10)).sum()))
store.close()
dist.destroy_process_group()
"""


def test_a_sharded_store_prefetches_its_local_part(tmp_path):
    proc = run_python(SHARDED, str(tmp_path / "sharded"), str(free_port()), timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "0.0"
