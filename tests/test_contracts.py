"""The reusable contract suites of ``lmdb_embeddings.testing``, over several kinds of open options."""

from __future__ import annotations

from lmdb_embeddings.testing import StoreContract, TableContract


class TestStoreTinyCache(StoreContract):
    """A cache of a few chunks: every multi-chunk call evicts, every rewrite spills."""

    open_options = {"cache_mb": 0.02}


class TestStoreDefaultOptions(StoreContract):
    open_options = {}


class TestStoreHugeCacheAllInL1(StoreContract):
    open_options = {"cache_mb": 2048, "l1_fraction": 1.0}


class TestStoreSmallL1LargeL2(StoreContract):
    """Chunks bounce between the tiers: L1 holds a few, L2 the rest."""

    open_options = {"l1_mb": 0.02, "l2_mb": 64}


class TestTables(TableContract):
    pass
