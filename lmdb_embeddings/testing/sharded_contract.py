"""ShardedStoreContract: :class:`~lmdb_embeddings.testing.StoreContract` run on a ``ShardedEmbeddingStore``.

Every call of a sharded store is collective, so every rank of an initialized ``torch.distributed``
process group (the default group) runs the same test file with pytest, the same tests in the same
order, each test's calls in step::

    from lmdb_embeddings.testing.sharded_contract import ShardedStoreContract

    class TestSharded(ShardedStoreContract):
        open_options = {"cache_mb": 8}

tests/_support/dist_contract.py is such a file; tests/testing/test_contracts.py has every rank of a real gloo group
(1 and 2 ranks, tests/_support/dist_harness.py) run it with ``pytest.main`` and checks every rank's outcomes.
The store is made in rank 0's temporary directory, a path every rank uses (the ranks share one
machine); each rank writes its :meth:`ShardedStoreContract.share` of every write; the handles are
the writer and a read-only sharded store (a sharded store does not pickle: its shard,
``store.local``, does). Without a process group every test is skipped, saying so. A test that fails
on one rank only leaves the ranks out of step: the next collective call fails after the group's timeout.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch.distributed as dist

from ..distributed.store import ShardedEmbeddingStore
from .store_contract import StoreContract


class ShardedStoreContract(StoreContract):
    """The store contract on a sharded store, run by every rank in step (see the module docstring)."""

    store_class = ShardedEmbeddingStore
    handle_kinds = ("writer", "readonly")

    @pytest.fixture
    def store_dir(self, tmp_path) -> str:
        """Rank 0's temporary directory, on every rank."""
        if not dist.is_available() or not dist.is_initialized():
            pytest.skip("ShardedStoreContract runs inside an initialized torch.distributed process group, on "
                        "every rank of it (see lmdb_embeddings.testing.sharded_contract)")
        box = [str(tmp_path)]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def share(self, n: int) -> np.ndarray:
        """This rank's part of a write's ``n`` rows: every world_size-th, from its rank."""
        return np.arange(n)[dist.get_rank()::dist.get_world_size()]
