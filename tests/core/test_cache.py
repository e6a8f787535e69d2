"""The L1/L2 chunk caches: byte budgets, hit counting, dirty chunks never lost (the spill
path into the pending write transaction), and the LMDB map growing on demand."""

from __future__ import annotations

import numpy as np
import pytest

from lmdb_embeddings import EmbeddingStore
from lmdb_embeddings.core.cache import CacheStats, ColumnCache
from lmdb_embeddings.processes.space import SpaceBudget

MIB = 1 << 20


def _table(store) -> np.ndarray:
    return store.get(store.ids)


@pytest.mark.parametrize("write_buffer", [False, True])
def test_cache_bytes_stay_within_budget(store_path, write_buffer):
    # 20000 x 128 float32 = ~9.8 MiB table, 1 MiB cache, 32 KiB chunks
    with EmbeddingStore.create(store_path, 20000, 128, chunk_rows=64, cache_mb=1, write_buffer=write_buffer) as store:
        rng = np.random.default_rng(0)
        for i in range(60):
            ids = rng.integers(0, 20000, 512)
            store.get(ids)
            store.put(np.unique(ids), np.zeros((len(np.unique(ids)), 128)))
            if i % 10 == 9:
                store.commit()  # clean chunks pushed out of L1 then go to L2
        store.get(rng.integers(0, 20000, 4096))  # larger than the cache: rows beyond L1 come from the map
        some = np.arange(0, 20000, 997)
        store.put(some, store.get(some))  # clean committed chunks leave L1 for these: into L2
        stats = store.stats()
        assert stats["cache_bytes"] <= MIB + 64 * 128 * 4 * 2  # budget + a couple of chunks
        if write_buffer:  # writes beyond L1 are buffered rows: no chunk comes into L1 or L2
            assert stats["buffered_rows"] > 0 and stats["buffer_merges"] > 0 and stats["map_rows"] > 0
        else:
            assert stats["l1_chunks"] > 0 and stats["l2_chunks"] > 0 and stats["map_rows"] > 0
        store.get(np.arange(20000))  # one call larger than the whole cache
        assert store.stats()["cache_bytes"] <= MIB + 64 * 128 * 4 * 2
    with EmbeddingStore.open(store_path, readonly=True, cache_mb=1) as reader:
        reader.get(np.arange(20000))
        assert reader.stats()["cache_bytes"] <= MIB + 64 * 128 * 4 * 2


def test_explicit_tier_budgets(store_path):
    with EmbeddingStore.create(store_path, 4096, 64, chunk_rows=64, l1_mb=0.25, l2_mb=0.25) as store:
        store.get(np.arange(4096))
        store.get(np.arange(4096))
        stats = store.stats()
        assert stats["cache_budget_bytes"] == MIB // 2
        assert stats["cache_bytes"] <= MIB // 2 + 2 * 64 * 64 * 4


def test_l2_serves_chunks_pushed_out_of_l1(store_path):
    chunk = 64 * 32 * 4  # 8 KiB
    with EmbeddingStore.create(store_path, 64 * 20, 32, chunk_rows=64, l1_mb=4 * chunk / MIB,
                               l2_mb=40 * chunk / MIB, write_buffer=False) as store:  # L1 and L2 at work
        one = np.ones((1, 32), np.float32)
        for c in range(20):  # a put makes its chunk resident (a get of a table larger than L1 reads the map)
            store.put([c * 64], one)
            store.commit()  # clean now: pushed out of L1, it goes to L2
        loaded = store.stats()["chunks_loaded"]
        assert loaded == 20
        for c in range(20):
            store.put([c * 64 + 1], one)
        stats = store.stats()
        assert stats["chunks_loaded"] == loaded  # everything came from L1 or L2
        assert stats["l2_hits"] >= 16


def test_dirty_chunks_survive_a_cache_smaller_than_the_dirty_set(store_path):
    n, dim = 8192, 64  # 2 MiB table, 64 KiB cache: almost every dirty chunk is spilled
    with EmbeddingStore.create(store_path, n, dim, chunk_rows=64, cache_mb=1 / 16) as store:
        original = _table(store)
        new = original + 1.0
        rng = np.random.default_rng(1)
        for part in np.array_split(rng.permutation(n), 40):
            store.put(part, new[part])
        stats = store.stats()
        assert stats["spilled_chunks"] > 50
        assert stats["cache_bytes"] <= MIB / 16 + 2 * 64 * dim * 4
        assert np.array_equal(_table(store), new)  # spilled chunks are read back from the pending txn
        with EmbeddingStore.open(store_path, readonly=True) as reader:
            assert np.array_equal(_table(reader), original)  # nothing visible before commit
        store.commit()
        assert store.stats()["spilled_chunks"] == 0
    with EmbeddingStore.open(store_path, readonly=True) as reader:
        assert np.array_equal(_table(reader), new)


def test_rollback_after_spill_discards_everything(store_path):
    with EmbeddingStore.create(store_path, 4096, 64, chunk_rows=64, cache_mb=1 / 16) as store:
        original = _table(store)
        store.put(np.arange(4096), original + 2.0)
        store.add(np.arange(5000, 5100))
        assert store.stats()["spilled_chunks"] > 0
        store.rollback()
        assert np.array_equal(_table(store), original) and len(store) == 4096
        store.put([0], np.zeros((1, 64)))
    with EmbeddingStore.open(store_path, readonly=True) as reader:
        expected = original.copy()
        expected[0] = 0
        assert np.array_equal(_table(reader), expected)


def test_spill_then_commit_then_keep_training(store_path):
    with EmbeddingStore.create(store_path, 2048, 32, chunk_rows=32, cache_mb=1 / 32, init="zeros") as store:
        for epoch in range(3):
            for part in np.array_split(np.arange(2048), 16):
                store.put(part, store.get(part) + 1.0)
            store.commit()
            assert np.array_equal(_table(store), np.full((2048, 32), epoch + 1.0, np.float32))
    with EmbeddingStore.open(store_path, readonly=True) as reader:
        assert np.array_equal(_table(reader), np.full((2048, 32), 3.0, np.float32))


@pytest.fixture
def small_map(monkeypatch):
    """Start every environment at an 8 MiB map, so growth is exercised with little data."""
    monkeypatch.setattr(SpaceBudget, "MIN_MAP", 8 * MIB)


def test_map_grows_for_commits(store_path, small_map):
    with EmbeddingStore.create(store_path, 100, 256, chunk_rows=64, init="zeros") as store:
        start = store._session.env.env.info()["map_size"]
        assert start == 8 * MIB
        for i in range(8):  # 8 x 4 MiB of new rows, committed each time
            store.add(np.arange(100 + i * 4096, 100 + (i + 1) * 4096), np.full((4096, 256), float(i)))
            store.commit()
        assert store._session.env.env.info()["map_size"] > 32 * MIB
    with EmbeddingStore.open(store_path, readonly=True) as reader:
        assert len(reader) == 100 + 8 * 4096
        assert np.array_equal(reader.get([100 + 7 * 4096]), np.full((1, 256), 7.0, np.float32))


def test_map_grows_while_spilling_into_an_open_transaction(store_path, small_map):
    # The pending write transaction cannot grow the map: it must be large enough up front.
    with EmbeddingStore.create(store_path, 10, 256, chunk_rows=64, init="zeros", cache_mb=0.5) as store:
        for i in range(36):  # 144 MiB of uncommitted rows through a 0.5 MiB cache (more than the
            # 128 MiB map that the slack reserved when the transaction opened gives)
            store.add(np.arange(10 + i * 4096, 10 + (i + 1) * 4096), np.full((4096, 256), float(i)))
        assert store.stats()["spilled_chunks"] > 100
        store.commit()
    with EmbeddingStore.open(store_path, readonly=True) as reader:
        assert len(reader) == 10 + 36 * 4096
        assert np.array_equal(reader.get([10, 10 + 35 * 4096 + 5]), [[0.0] * 256, [35.0] * 256])


def test_reader_adopts_a_map_grown_by_the_writer(store_path, small_map):
    with EmbeddingStore.create(store_path, 10, 256, chunk_rows=64, init="zeros") as store:
        reader = EmbeddingStore.open(store_path, readonly=True)
        assert len(reader) == 10
        store.add(np.arange(10, 10 + 50000), np.ones((50000, 256)))
        store.commit()
        assert len(reader) == 50010 and reader.get([49999]).all()
        reader.close()


# ----------------------------------------------------------------- ColumnCache on its own
class _FakeIO:
    """A ChunkIO over an in-memory dict: chunk c holds the value c (version 1) unless overwritten; a spilled
    chunk loads back as spilled (the pending transaction), the map serves committed rows only."""

    def __init__(self):
        self.loads: list[int] = []
        self.map_reads: list[int] = []
        self.spilled: list[tuple[int, np.ndarray]] = []
        self.version = {}

    def load(self, chunks):
        pending = dict(self.spilled)
        for chunk in chunks:
            self.loads.append(chunk)
            rows = pending.get(chunk, np.full((4, 2), float(chunk), np.float32))
            yield chunk, rows, self.version.get(chunk, 1)

    def versions(self, chunks):
        return [self.version.get(c, 1) for c in chunks]

    def spill(self, chunk, rows):
        self.spilled.append((chunk, rows.copy()))

    def read_rows(self, slots):
        assert not {int(c) for c in slots // 4} & {c for c, _ in self.spilled}, "a spilled chunk read from the map"
        self.map_reads.extend((slots // 4).tolist())
        return np.repeat((slots // 4).astype(np.float32)[:, None], 2, axis=1)


class _Table:
    def __init__(self, rows=400, validate_against=None):
        self.rows, self.validate_against = rows, validate_against


def _cache(capacity_chunks: int, l2_chunks: int, table=None):
    chunk_bytes = 4 * 2 * 4
    stats, io = CacheStats(), _FakeIO()
    cache = ColumnCache(2, np.float32, 4, 0.0, stats, io, table or _Table())
    cache.set_budget(capacity_chunks * chunk_bytes, l2_chunks * chunk_bytes)
    return cache, stats, io


def _rows_of(chunk):
    return np.array([chunk * 4 + 1])  # a row slot inside the chunk


def _value(chunk, value=None):
    return np.full((1, 2), float(chunk if value is None else value), np.float32)


def test_column_cache_lru_eviction_to_l2_and_back():
    cache, stats, io = _cache(capacity_chunks=2, l2_chunks=2)
    for chunk in (0, 1, 0, 2):  # a put makes its chunk resident; 1 is least recently used when 2 arrives
        cache.scatter(_rows_of(chunk), _value(chunk))
        cache.mark_clean(1)  # committed: a clean chunk pushed out of L1 goes to L2
    assert io.loads == [0, 1, 2] and list(cache.l2) == [1]
    cache.scatter(_rows_of(1), _value(1))  # from L2, not reloaded
    assert io.loads == [0, 1, 2] and stats.l2_hits == 1 and list(cache.l2) == [0]
    assert np.array_equal(cache.gather(np.array([1, 5])), [[0.0, 0.0], [1.0, 1.0]])
    assert io.map_reads == [0]  # chunk 0 (not in L1) was read in place, not loaded
    assert io.loads == [0, 1, 2] and list(cache.l2) == [0]


def test_column_cache_spills_dirty_victims_and_never_drops_them():
    cache, _, io = _cache(capacity_chunks=2, l2_chunks=4)
    cache.scatter(np.arange(20, 24), np.full((4, 2), 99.0, np.float32))  # chunk 5, dirty
    cache.scatter(_rows_of(6), _value(6))
    cache.scatter(_rows_of(7), _value(7))  # evicts dirty chunk 5
    assert [c for c, _ in io.spilled] == [5] and np.all(io.spilled[0][1] == 99.0)
    assert 5 not in cache.l2  # a spilled chunk is not kept as a clean copy
    assert cache.n_dirty == 2
    assert np.array_equal(cache.gather(_rows_of(5)), [[99.0, 99.0]])  # loaded back from the pending transaction
    assert io.map_reads == [] and io.loads[-1] == 5


def test_column_cache_serves_more_chunks_than_it_holds_in_groups():
    cache, _, io = _cache(capacity_chunks=2, l2_chunks=0)
    slots = np.array([37, 1, 13, 5, 9, 2])  # chunks 9, 0, 3, 1, 2, 0: more than the 2 L1 slots
    assert np.array_equal(cache.gather(slots)[:, 0], slots // 4)
    cache.scatter(np.array([3, 7, 11]), np.full((3, 2), -1.0, np.float32))  # chunks 0, 1, 2
    assert sorted(c for c, _ in io.spilled) == [0]  # dirty chunks leave L1 only through spill
    assert np.array_equal(cache.gather(np.array([3, 7, 11, 13]))[:, 0], [-1.0, -1.0, -1.0, 3.0])


def test_column_cache_reader_drops_chunks_rewritten_by_a_newer_commit():
    table = _Table(rows=16, validate_against=1)  # 4 chunks: the whole table fits L1, so reads load it
    cache, stats, io = _cache(capacity_chunks=4, l2_chunks=4, table=table)
    cache.gather(np.array([1, 5]))
    assert io.loads == [0, 1]
    table.validate_against = 2  # a commit happened; it rewrote chunk 1 only
    io.version[1] = 2
    cache.gather(np.array([1, 5]))
    assert io.loads == [0, 1, 1]  # chunk 0 was re-checked (same version) and kept, chunk 1 reloaded
    loaded = stats.chunks_loaded
    cache.gather(np.array([1, 5]))  # both checked at commit 2 now: the hot path, no reload
    assert stats.chunks_loaded == loaded


def test_an_explicit_budget_that_holds_the_table_keeps_it_all_in_l1(store_path):
    """cache_mb = 1.25x the table: L1 takes all of it (l1_fraction is a floor), no chunk bounces via L2."""
    n, dim = 20_000, 32
    budget = 1.25 * n * dim * 4 / MIB
    with EmbeddingStore.create(store_path, n, dim, chunk_rows=256, cache_mb=budget) as store:
        rng = np.random.default_rng(0)
        for _ in range(3):
            for part in np.array_split(rng.permutation(n), 40):
                store.put(part, store.get(part) + 1.0)
        stats = store.stats()
        assert stats["l1_chunks"] == -(-n // 256) and stats["l2_hits"] == 0 and stats["chunks_loaded"] == -(-n // 256)
        assert stats["cache_bytes"] <= budget * MIB
        assert stats["anon_bytes"] > 0
