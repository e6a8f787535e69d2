"""ShardedReads: the part of a ``ShardedEmbeddingStore`` that reads rows, local and remote, in one exchange per call.

Each rank's IDs go to their owners (one ``all_to_all_single``), each owner reads what it was asked
from its shard, and the rows go back (one more). A writable store reads every shard's own state,
uncommitted changes included (every change is a collective call, so all shards are in step); a
read-only one serves one decided global commit (``twophase.read_decided``).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..format.records import MAIN
from ..inputs import IdsLike, as_ids
from ..store_reads import as_tensor
from .calls import CollectiveCalls
from .twophase import read_decided


class ShardedReads(CollectiveCalls):
    """``get``, ``get_tensor``, ``get_column`` (a part of ``ShardedEmbeddingStore``: calls.py)."""

    def get(self, ids: IdsLike) -> np.ndarray:
        """Rows of this rank's ``ids`` in their order, local and remote.

        A writable store sees every put/add of earlier collective calls, committed or not; a
        read-only one serves one decided global commit, the same on every shard.

        Raises (on every rank): KeyError if any rank asked for an unknown ID.
        """
        return self._gather(MAIN, ids, "get")

    def get_tensor(self, ids: IdsLike, device: torch.device | str | int | None = None) -> torch.Tensor:
        """Like :meth:`get`, as a ``torch.Tensor`` on ``device`` (CUDA copies go through pinned memory)."""
        return as_tensor(self.get(ids), device)

    def get_column(self, name: str, ids: IdsLike) -> np.ndarray:
        """Rows of an auxiliary column for this rank's ``ids`` (like :meth:`get`)."""
        return self._gather(name, ids, "get_column")

    def prefetch(self, ids: IdsLike) -> None:
        """A hint for the rows of ``ids`` this rank owns, through its own shard (the others are unknown to
        it, so ignored); returns at once. Not a collective call: each rank hints its own next batch."""
        self._shard.store.prefetch(ids)

    def _gather(self, name: str, ids: IdsLike, call: str) -> np.ndarray:
        def checks() -> tuple[np.ndarray]:
            self._column_shape(name)  # an undeclared column is refused on every rank
            return (as_ids(ids),)

        (flat,), route = self._start_routed(call, checks, writes=False)
        (wanted,) = self._exchange.send(route, flat)
        if self._readonly:
            read = functools.partial(self._shard.store.get_with_state, wanted, name)
            rows, self._commit, self._rows = read_decided(self._collective, self._path, read)
            self._committed_rows = self._rows
        else:
            rows = self._collective.agreed(self._shard.store.get_column, name, wanted)
        (out,) = self._exchange.send_back(route, rows)
        return out
