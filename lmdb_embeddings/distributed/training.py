"""Optimizer steps on a sharded store: gradients travel to the rows' owners, which update once.

``StoreOptimizer.step`` hands its gradients to ``ShardedEmbeddingStore.optimizer_step``,
which runs, on every rank:

1. (:func:`summed`, as the checks of the call's skeleton) each rank sums the gradients of its
   own lookups per ID (torch's coalesce), in the optimizer's compute dtype;
2. ONE exchange (the skeleton's all-gather of counts, then, in :func:`owner_step`, one
   ``all_to_all_single`` of (id, gradient row) records) delivers every row's gradients to its owner;
3. the owner builds the sparse gradient of the IDs it received (duplicates from several
   ranks are summed by the update's own coalesce, as torch sums duplicate IDs), reads
   the rows and optimizer state from its shard and computes torch's update
   (``compute_update``); the ranks agree that no update is NaN/inf;
4. every owner writes its rows and state (``write_update``), step counts included.
   A step counts when any rank had a backward since the last one (as a single store,
   and torch, count a step whose sparse gradient is empty); every shard counts it, also
   one that received no gradient, so the per-table step count stays the same everywhere.

The result equals one single-store step over the concatenation of all ranks' batches
with the sum of their losses (to float rounding: the sums are taken in another order).
"""

from __future__ import annotations

import numpy as np
import torch

from ..torch.gradients import RowGradients
from .exchange import Exchange, Route
from .shard import Shard


def owner_step(exchange: Exchange, shard: Shard, optimizer, route: Route, ids: np.ndarray,
               values: np.ndarray) -> bool:
    """Steps 2-4 of the step (the route planned by the sharded store's call skeleton from :func:`summed`);
    True if any rank had gradients (and so the shards changed)."""
    if not route.flags.any():
        return False  # no rank had a backward since the last step: nothing to do, as on a single store
    dim = shard.store.dim
    got_ids, got_values = exchange.send(route, ids, values)
    unique, inverse = np.unique(got_ids, return_inverse=True)
    grad = torch.sparse_coo_tensor(torch.from_numpy(inverse.reshape(1, -1).astype(np.int64)),
                                   torch.from_numpy(got_values), (len(unique), dim), check_invariants=False)
    local = RowGradients(unique, grad, parts=int((route.recv_counts > 0).sum()))
    update = exchange.collective.agreed(optimizer.compute_update, shard.store, local)
    with shard.writing() as store:
        optimizer.write_update(store, *update)
    return True


def summed(grads: RowGradients | None, dim: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Step 1: (unique IDs, their summed gradient rows) of this rank's lookups, in the compute dtype."""
    if grads is None:
        return np.empty(0, np.int64), np.empty((0, dim), dtype)
    torch_dtype = torch.from_numpy(np.empty(0, dtype)).dtype
    coalesced = grads.grad.to(torch_dtype).coalesce()
    values = np.empty((len(grads.ids), dim), dtype)
    values[coalesced.indices()[0].numpy()] = coalesced.values().numpy()
    return grads.ids, values

