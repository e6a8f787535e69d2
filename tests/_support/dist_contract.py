"""StoreContract on ShardedEmbeddingStore: the file every rank runs with pytest, in step, inside its process group
(``dist_scenarios.store_contract``; tests/testing/test_contracts.py checks every rank's outcomes)."""

from __future__ import annotations

from lmdb_embeddings.testing.sharded_contract import ShardedStoreContract


class TestShardedStore(ShardedStoreContract):
    open_options = {"cache_mb": 8}


class TestShardedStoreTinyCache(ShardedStoreContract):
    """Every multi-chunk call evicts and every rewrite spills into the pending transaction (with the undo log)."""

    open_options = {"cache_mb": 0.02}
