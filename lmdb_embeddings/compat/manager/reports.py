"""The manager's figures, with the upstream keys: cache performance, disk usage, the ``cache`` attribute.

Upstream (2025-09) kept a ``MultiTierCache`` of chunk dicts; ours is the store's L1 slab and
L2 victim cache, with the OS page cache under LMDB's memory map as the third tier. The
figures below are the store's counters under the upstream names.
"""

from __future__ import annotations

import logging
import os

from ...fsutil import dir_size

log = logging.getLogger(__name__)

_MIB = 1 << 20


def _tiers(table, s: dict) -> tuple[int, int, int, int]:
    """Bytes used and budgeted of L1 and L2: ``(l1_used, l2_used, l1_max, l2_max)``."""
    chunk_bytes = table.chunk_rows * table.dim * table.dtype.itemsize
    opts = table.cache_options
    return (s["l1_chunks"] * chunk_bytes, s["l2_chunks"] * chunk_bytes, int(opts["l1_mb"] * _MIB),
            int(opts["l2_mb"] * _MIB))


def performance_stats(table) -> dict:
    """The 2025-09 manager's ``performance_stats`` keys."""
    s = table.store.stats()
    return {"cache_hits": s["l1_hits"] + s["l2_hits"], "cache_misses": s["l2_misses"],
            "disk_loads": s["chunks_loaded"], "sync_operations": table.sync_operations}


def cache_info(table, l3_enabled: bool) -> dict:
    """The 2025-09 ``MultiTierCache.get_cache_info()`` keys."""
    s = table.store.stats()
    l1_used, l2_used, l1_max, l2_max = _tiers(table, s)
    return {
        "l1_items": s["l1_chunks"], "l1_size_mb": l1_used / _MIB, "l1_max_mb": l1_max / _MIB,
        "l2_items": s["l2_chunks"], "l2_size_mb": l2_used / _MIB, "l2_max_mb": l2_max / _MIB,
        "l3_enabled": l3_enabled,
        # chunks that left L1 = chunks brought in minus chunks still there
        "stats": {"hits": s["l1_hits"] + s["l2_hits"], "misses": s["l2_misses"],
                  "evictions": max(0, s["chunks_loaded"] + s["l2_hits"] - s["l1_chunks"])},
        "hit_rate": s["hit_rate"],
    }


def cache_performance(table) -> dict:
    """``get_cache_performance()``: chunk-cache counters, with the original's keys."""
    s = table.store.stats()
    lookups = s["l1_hits"] + s["l1_misses"]
    l1_used, l2_used, l1_max, l2_max = _tiers(table, s)
    return {
        "cache_hit_rate": s["hit_rate"],
        "total_requests": lookups,
        "disk_load_ratio": s["chunks_loaded"] / lookups if lookups else 0.0,
        "sync_operations": table.sync_operations,
        "l1_usage_percent": l1_used / l1_max * 100 if l1_max else 0.0,
        "l2_usage_percent": l2_used / l2_max * 100 if l2_max else 0.0,
    }


def disk_usage(table, embeddings_dir, storage_mode: str, l3_enabled: bool) -> dict:
    """``get_disk_usage_info()``: disk and cache figures (chunk sizes are the raw row bytes)."""
    s = table.store.stats()
    n, itemsize = len(table.store_ids), table.dtype.itemsize
    chunk_details = {}
    for c in range(table.n_chunks):
        rows = min(table.chunk_rows, n - c * table.chunk_rows)
        chunk_details[c] = {"file": os.path.basename(table.store.path),
                            "size_mb": rows * table.dim * itemsize / _MIB, "sample_count": rows}
    return {
        "embeddings_dir": str(embeddings_dir),
        "store_path": table.store.path,
        "total_size_mb": dir_size(table.store.path) / _MIB,
        "num_chunks": table.n_chunks,
        "chunk_details": chunk_details,
        "storage_mode": storage_mode,
        "auto_sync": table.auto_sync,
        "sync_batch_size": table.sync_batch_size,
        "cache_info": cache_info(table, l3_enabled),
        "performance_stats": performance_stats(table),
        "dirty_chunks_count": s["dirty_chunks"],
        "pending_updates_count": table.pending_rows,
    }


class CacheView:
    """``manager.cache``: the 2025-09 ``MultiTierCache`` calls its test scripts make."""

    def __init__(self, table, l3_enabled: bool):
        self._table, self._l3 = table, l3_enabled

    def get_cache_info(self) -> dict:
        return cache_info(self._table, self._l3)

    def adaptive_eviction(self) -> None:
        """Nothing to do: the store's L1/L2 evict least-recently-used chunks themselves and never exceed
        their budgets (upstream evicted here when over budget)."""
        log.debug("adaptive_eviction(): the store's caches stay within their budgets by themselves")
