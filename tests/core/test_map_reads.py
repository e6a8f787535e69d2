"""Rows read in place from LMDB's map (core/directory.py): tables larger than the cache, touched at random.

A read of a table larger than L1 copies the rows of chunks that are neither cached nor spilled straight out of
LMDB's map: no chunk is loaded, nothing is evicted, each chunk's checksum is verified once per committed
version, and one get still sees exactly one commit.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from checkout import run_python

import lmdb_embeddings as le
from lmdb_embeddings.format import chunks as chunk_format
from lmdb_embeddings.processes.space import SpaceBudget

MIB = 1 << 20
N, DIM, CHUNK = 20_000, 16, 64  # 313 chunks of 4 KiB


def _values(n=N, dim=DIM, shift=0.0):
    return (np.arange(n * dim, dtype=np.float32).reshape(n, dim) + shift)


@pytest.fixture
def table(store_path):
    values = _values()
    le.EmbeddingStore.create(store_path, N, DIM, chunk_rows=CHUNK, init=values).close()
    return store_path, values


@pytest.fixture
def hashes(monkeypatch):
    """Count the chunks whose checksum is computed (payload hashes), by chunk."""
    seen: list[int] = []
    real = chunk_format.checksum

    def counting(payload, index):
        seen.append(index)
        return real(payload, index)

    monkeypatch.setattr(chunk_format, "checksum", counting)
    return seen


def test_a_reader_reads_a_table_larger_than_its_cache_from_the_map(table):
    path, values = table
    rng = np.random.default_rng(0)
    with le.EmbeddingStore.open(path, readonly=True, cache_mb=0.05) as reader:
        for size in (1, 7, 256, 3000):
            ids = rng.integers(0, N, size)
            assert np.array_equal(reader.get(ids), values[ids])
        assert np.array_equal(reader.get(np.arange(N)), values)
        stats = reader.stats()
        assert stats["chunks_loaded"] == 0 and stats["cache_bytes"] == 0 and stats["map_rows"] > N


def test_each_chunk_is_hashed_once_per_committed_version(table, hashes):
    path, values = table
    with le.EmbeddingStore.open(path, readonly=True, cache_mb=0.05) as reader:
        hashes.clear()  # the ID chunks read at open
        reader.get(np.arange(N))
        assert sorted(hashes) == list(range(-(-N // CHUNK)))  # every chunk once
        hashes.clear()
        for _ in range(3):
            reader.get(np.random.default_rng(1).integers(0, N, 500))
        assert hashes == []  # verified versions are not hashed again
        with le.EmbeddingStore.open(path) as writer:
            writer.put([5, 6 * CHUNK + 1], np.zeros((2, DIM)))  # chunks 0 and 6 get a new version
        hashes.clear()
        got = reader.get(np.arange(N))
        assert sorted(set(hashes)) == [0, 6]  # the writer's commit hashed them; the reader once more each
        assert got[5].sum() == 0 and got[6 * CHUNK + 1].sum() == 0
        assert np.array_equal(np.delete(got, [5, 6 * CHUNK + 1], 0), np.delete(values, [5, 6 * CHUNK + 1], 0))


def test_a_reader_sees_each_commit_whole_through_the_map(table):
    path, values = table
    with le.EmbeddingStore.open(path, readonly=True, cache_mb=0.05) as reader, le.EmbeddingStore.open(path) as writer:
        ids = np.arange(N)
        for r in range(1, 4):
            writer.put(ids, np.full((N, DIM), float(r), np.float32))
            before = values[::7] if r == 1 else np.full((len(ids[::7]), DIM), r - 1.0)
            assert np.array_equal(reader.get(ids[::7]), before)  # the put is not committed yet
            writer.commit()
            assert (reader.get(ids) == r).all()


def test_a_damaged_chunk_is_never_served_from_the_map(table):
    path, values = table
    chunk = 9
    payload = values[chunk * CHUNK : (chunk + 1) * CHUNK].tobytes()
    data = open(os.path.join(path, "data.mdb"), "rb").read()
    at = data.find(payload)
    assert at >= 0 and data.find(payload, at + 1) < 0
    with open(os.path.join(path, "data.mdb"), "r+b") as fh:
        fh.seek(at + 100)
        fh.write(bytes([data[at + 100] ^ 0x40]))
    for readonly in (True, False):
        with le.EmbeddingStore.open(path, readonly=readonly, cache_mb=0.05) as store:
            with pytest.raises(le.CorruptionError, match=f"chunk {chunk}\\b"):
                store.get([chunk * CHUNK + 3])
            with pytest.raises(le.CorruptionError):  # again: a failed check is not remembered as verified
                store.get([1, chunk * CHUNK + 60])
            assert np.array_equal(store.get([1, 2, N - 1]), values[[1, 2, N - 1]])


def test_a_writer_reads_clean_chunks_in_place_and_its_own_changes_from_the_cache(store_path):
    values = _values()
    with le.EmbeddingStore.create(store_path, N, DIM, chunk_rows=CHUNK, init=values, cache_mb=0.05) as store:
        rng = np.random.default_rng(3)
        changed = rng.choice(N // 2, 2000, replace=False)  # chunks of the second half stay unchanged
        new = values.copy()
        new[changed] = -1.0
        store.put(changed, new[changed])  # far more chunks than L1: most are spilled into the pending txn
        assert store.stats()["spilled_chunks"] > 50
        before = store.stats()["map_rows"]
        for ids in (np.arange(N), rng.integers(0, N, 999), changed[:10]):
            assert np.array_equal(store.get(ids), new[ids])
        assert store.stats()["map_rows"] > before  # the unchanged chunks came from the map
        store.rollback()
        assert np.array_equal(store.get(np.arange(N)), values)
        store.put(changed, new[changed])
        store.commit()
        assert np.array_equal(store.get(np.arange(N)), new)


def test_rollback_forgets_a_spilled_chunk_that_was_read_back(store_path):
    """A chunk spilled into the pending transaction and read back is the uncommitted one: rollback drops it too."""
    values = _values(4096)
    with le.EmbeddingStore.create(store_path, 4096, DIM, chunk_rows=CHUNK, init=values, cache_mb=1 / 64) as store:
        store.put(np.arange(4096), values + 1.0)  # every chunk spilled (L1 holds 3)
        back = [0, 64, 128]  # chunks 0-2, read back from the pending transaction into L1
        assert np.array_equal(store.get(back), values[back] + 1.0)
        store.rollback()
        assert np.array_equal(store.get(back), values[back])  # (before: the rolled-back rows, still cached)
        assert np.array_equal(store.get(np.arange(4096)), values)


def test_the_directory_follows_a_map_grown_by_a_writer_of_the_same_process(store_path, monkeypatch):
    monkeypatch.setattr(SpaceBudget, "MIN_MAP", 8 * MIB)
    with le.EmbeddingStore.create(store_path, 4096, 256, chunk_rows=64, init="zeros") as writer:
        reader = le.EmbeddingStore.open(store_path, readonly=True, cache_mb=0.1)
        try:
            assert not reader.get(np.arange(0, 4096, 3)).any()  # directory entries, addresses in the small map
            epoch = writer._session.env.map_epoch
            writer.add(np.arange(4096, 4096 + 40_000), np.ones((40_000, 256)))
            writer.put(np.arange(4096), np.full((4096, 256), 2.0))
            writer.commit()
            assert writer._session.env.map_epoch > epoch  # the map moved
            assert (reader.get(np.arange(0, 4096, 3)) == 2.0).all() and (reader.get([44_095]) == 1.0).all()
        finally:
            reader.close()


def test_a_column_with_unwritten_and_short_chunks_reads_as_its_fill(store_path):
    with le.EmbeddingStore.create(store_path, 1000, 8, chunk_rows=CHUNK, init="zeros") as store:
        store.ensure_column("state", 4, fill=0.5)
        store.put_column("state", [3], np.full((1, 4), 7.0))
        store.commit()
        store.add(np.arange(1000, 1100))  # the state column's last chunks are short or absent now
        store.commit()
    with le.EmbeddingStore.open(store_path, readonly=True, cache_mb=0.001) as reader:
        got = reader.get_column("state", reader.ids)
        expected = np.full((1100, 4), 0.5, np.float32)
        expected[3] = 7.0
        assert np.array_equal(got, expected) and reader.stats()["chunks_loaded"] == 0


SHUFFLED_READS = r"""
import json, sys
import numpy as np
import lmdb_embeddings as le
from lmdb_embeddings.processes.memory import rss_anon_bytes

path = sys.argv[1]
with le.EmbeddingStore.open(path, readonly=True, cache_mb=4) as reader:
    n = len(reader)
    reader.get(np.arange(256))
    before = rss_anon_bytes()
    peak = before
    rng = np.random.default_rng(0)
    order = rng.permutation(n)
    for start in range(0, n, 256):  # one shuffled epoch in batches of 256
        reader.get(order[start : start + 256])
        peak = max(peak, rss_anon_bytes())
    for _ in range(2000):
        reader.get([int(rng.integers(n))])
    peak = max(peak, rss_anon_bytes())
    stats = reader.stats()
print(json.dumps({"grew_mb": (peak - before) / 2**20, "map_rows": stats["map_rows"], "cache": stats["cache_bytes"]}))
"""


def test_shuffled_reads_of_a_table_25x_the_cache_stay_within_it(tmp_path):
    """A reader with cache_mb=4 over a 100 MiB table, one shuffled epoch: anonymous memory does not follow the table."""
    path = str(tmp_path / "store")
    n, dim = 200_000, 128  # 100 MiB
    le.EmbeddingStore.create(path, n, dim, init="zeros").close()
    proc = run_python(SHUFFLED_READS, path, timeout=600)
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["map_rows"] >= n and seen["cache"] <= 4 * MIB, seen
    assert seen["grew_mb"] <= 4 + 16, seen  # the cache, and numpy temporaries of a batch


def test_nothing_of_a_reader_stays_pinned_between_calls(table):
    """The directory keeps addresses, not transactions: a writer rewriting the table reuses its pages."""
    path, _ = table
    with le.EmbeddingStore.open(path, readonly=True, cache_mb=0.05) as reader, le.EmbeddingStore.open(path) as writer:
        reader.get(np.arange(N))
        sizes = []
        for r in range(12):
            writer.put(np.arange(N), np.full((N, DIM), float(r), np.float32))
            writer.commit()
            assert (reader.get(np.arange(0, N, 11)) == r).all()
            sizes.append(writer._session.env.used_bytes())
        assert sizes[-1] <= sizes[3], sizes  # levels off: old pages are reused


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_other_dtypes_read_in_place_bit_exact(store_path, dtype):
    values = np.random.default_rng(2).standard_normal((3000, 7)).astype(dtype)  # odd row bytes: unaligned rows
    le.EmbeddingStore.create(store_path, 3000, 7, dtype=dtype, chunk_rows=50, init=values).close()
    with le.EmbeddingStore.open(store_path, readonly=True, cache_mb=0.001) as reader:
        ids = np.random.default_rng(3).integers(0, 3000, 500)
        got = reader.get(ids)
        assert got.dtype == np.dtype(dtype) and got.tobytes() == values[ids].tobytes()
        assert reader.get([2999]).tobytes() == values[2999:].tobytes()
        assert reader.stats()["chunks_loaded"] == 0
