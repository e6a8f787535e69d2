"""Chunk geometry: ``chunk_rows=None`` lets the store choose from dim and dtype, sized to LMDB's overflow pages,
and a chunk always fits the cache (issue 18 item 9: dim 65536 with cache_mb=16 once took +510-770 MiB)."""

from __future__ import annotations

import inspect
import json
import mmap

import numpy as np
import pytest
from checkout import run_cli, run_python

import lmdb_embeddings as le
from lmdb_embeddings.format.chunks import encode_chunk
from lmdb_embeddings.format.layout import CHUNK_TARGET_BYTES, choose_chunk_rows

PAGE = mmap.PAGESIZE
LMDB_PAGE_HEADER = 16


def _pages(value_bytes: int) -> int:
    """Pages LMDB takes for one overflow value of ``value_bytes``."""
    return -(-(value_bytes + LMDB_PAGE_HEADER) // PAGE)


@pytest.mark.parametrize("dim", [1, 3, 16, 100, 128, 257, 1000, 1024, 4096, 65536])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_chosen_chunks_fill_whole_overflow_pages(dim, dtype):
    row_bytes = dim * np.dtype(dtype).itemsize
    rows = choose_chunk_rows(row_bytes)
    assert rows >= 1
    # the longest value a commit can write for it: the largest version, a checksum of 8 bytes
    longest = len(encode_chunk(np.zeros((rows, dim), dtype), 2**40 + 7, 2**64 - 1))
    if row_bytes <= CHUNK_TARGET_BYTES // 2:
        # the run of overflow pages stays within the target, and one more row would take another page
        assert _pages(longest) <= CHUNK_TARGET_BYTES // PAGE < _pages(longest + row_bytes + 8)
        assert _pages(longest) * PAGE - (longest + LMDB_PAGE_HEADER) < max(row_bytes, PAGE)  # the waste
    else:
        assert rows == 1  # a row larger than the target: one row per chunk
        assert _pages(longest) * PAGE - (longest + LMDB_PAGE_HEADER) < PAGE


def test_create_defaults_to_the_chosen_chunk_rows(store_path):
    for func in (le.EmbeddingStore.create,):
        assert inspect.signature(func).parameters["chunk_rows"].default is None
    with le.EmbeddingStore.create(store_path, 5000, 128) as store:
        assert store.chunk_rows == choose_chunk_rows(128 * 4)
    with le.EmbeddingStore.create(store_path, 10, 64, dtype="float16", chunk_rows=None, overwrite=True) as store:
        assert store.chunk_rows == choose_chunk_rows(64 * 2)
    with le.EmbeddingStore.open(store_path, readonly=True) as store:  # kept by the store, not re-chosen
        assert store.chunk_rows == choose_chunk_rows(64 * 2)


def test_an_explicit_chunk_rows_is_kept(store_path):
    with le.EmbeddingStore.create(store_path, 100, 8, chunk_rows=1024) as store:
        assert store.chunk_rows == 1024
    with le.EmbeddingStore.open(store_path) as store:
        assert store.chunk_rows == 1024


def test_a_cache_that_cannot_hold_two_chunks_is_refused_naming_both_options(store_path):
    # 1024 rows x 65536 float32 = 256 MiB per chunk; the cache needs two of them at least
    with pytest.raises(ValueError) as info:
        le.EmbeddingStore.create(store_path, 4, 65536, chunk_rows=1024, init="zeros", cache_mb=16)
    assert isinstance(info.value, le.EmbeddingStoreError)
    message = str(info.value)
    assert "chunk_rows" in message and "cache_mb" in message and "512" in message
    with le.EmbeddingStore.create(store_path, 4, 65536, chunk_rows=1024, init="zeros", cache_mb=600) as store:
        store.put([1], np.ones((1, 65536)))
    with pytest.raises(ValueError, match="cache_mb"):
        le.EmbeddingStore.open(store_path, cache_mb=16)
    with le.EmbeddingStore.open(store_path, readonly=True, cache_mb=16) as reader:  # reads come from the map
        assert reader.get([1]).min() == 1.0


WIDE = r"""
import json, sys
import numpy as np
import lmdb_embeddings as le
from lmdb_embeddings.processes.memory import rss_anon_bytes

path, dim, rows = sys.argv[1], 65536, 512  # 256 KiB rows: a 128 MiB table, 8x the cache
before = rss_anon_bytes()
peak = before
store = le.EmbeddingStore.create(path, rows, dim, init="zeros", cache_mb=16)
rng = np.random.default_rng(0)
for step in range(12):
    ids = rng.permutation(rows)[:4]
    store.put(ids, store.get(ids) + 1.0)
    peak = max(peak, rss_anon_bytes())
    if step % 4 == 3:
        store.commit()
        peak = max(peak, rss_anon_bytes())
store.close()
with le.EmbeddingStore.open(path, readonly=True, cache_mb=16) as reader:
    for _ in range(8):
        reader.get(rng.permutation(rows)[:8])
        peak = max(peak, rss_anon_bytes())
    chunk_rows = reader.chunk_rows
print(json.dumps({"grew_mb": (peak - before) / 2**20, "chunk_rows": chunk_rows}))
"""


def test_a_wide_table_with_a_small_cache_stays_within_the_cache(tmp_path):
    """dim=65536, default chunk_rows, cache_mb=16: anonymous memory grows by the cache plus a fixed overhead."""
    proc = run_python(WIDE, str(tmp_path / "wide"), timeout=300)
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["grew_mb"] <= 16 + 48, seen  # 16 MiB of cache; the rest: a few chunks of 256 KiB, numpy temporaries


def test_a_column_the_cache_cannot_hold_two_chunks_of_is_refused_and_nothing_changes(store_path):
    # 1024 rows x 2048 float32 = 8 MiB chunks: two fit cache_mb=17, two of each of two such columns do not
    with le.EmbeddingStore.create(store_path, 10, 2048, chunk_rows=1024, init="zeros", cache_mb=17) as store:
        with pytest.raises(ValueError, match="ensure_column: cache_mb=17 .*chunk_rows=1024"):
            store.ensure_column("state", 2048)
        assert store.columns == {}
        store.ensure_column("small", 8)  # 2 x 1024 x (2048 + 8) x 4 bytes = 16.06 MiB: fits
        assert list(store.columns) == ["small"]


def test_the_cli_create_and_an_npy_restore_choose_the_chunking_too(tmp_path):
    made = run_cli("create", str(tmp_path / "c"), "--rows", "100", "--dim", "48", "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["chunk_rows"] == choose_chunk_rows(48 * 4)
    npy = tmp_path / "npy"
    npy.mkdir()
    np.save(npy / "ids.npy", np.arange(10))
    np.save(npy / "embeddings.npy", np.ones((10, 24), np.float16))
    restored = run_cli("restore", str(npy), str(tmp_path / "r"))
    assert restored.returncode == 0, restored.stderr
    with le.EmbeddingStore.open(str(tmp_path / "r"), readonly=True) as store:
        assert store.chunk_rows == choose_chunk_rows(24 * 2)
