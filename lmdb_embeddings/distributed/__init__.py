"""Scale-out: one embedding table sharded over a ``torch.distributed`` process group.

::

    import torch.distributed as dist
    from lmdb_embeddings.distributed import ShardedEmbeddingStore, ShardedSampler, owner_of
    dist.init_process_group("gloo")
    store = ShardedEmbeddingStore.create(path, ids, dim)

``owner_of`` (which rank owns an ID) needs no torch: it comes, with the sharded directory's
manifest, snapshot and shard builders, from ``lmdb_embeddings.sharding``, which ``ops`` and the
CLI use to read sharded directories without torch. ``ShardedEmbeddingStore`` and
``ShardedSampler`` import torch when first used. docs/ARCHITECTURE.md ("Scale-out") has the design.
"""

from __future__ import annotations

import importlib

from ..sharding.ownership import DEFAULT_BUCKETS, owner_of

_LAZY = {"ShardedEmbeddingStore": ".store", "ShardedSampler": ".sampler"}

__all__ = ["ShardedEmbeddingStore", "ShardedSampler", "owner_of", "DEFAULT_BUCKETS"]


def __getattr__(name):
    """The torch-backed classes, imported on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lmdb_embeddings.distributed' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
