"""The column cache against its model (``lmdb_embeddings/testing/cache_model.py``): hits, misses, spills,
evictions, revalidation after commits and rows served from the map, in random interleavings."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

from lmdb_embeddings.testing.cache_model import CacheMachine

TestColumnCacheModel = CacheMachine.TestCase
TestColumnCacheModel.settings = settings(max_examples=100, stateful_step_count=40, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
