"""CollectiveCalls: the state of a ``ShardedEmbeddingStore`` handle and the ONE skeleton its collective calls run.

Every public call of the sharded store is collective: all ranks make it, in the same order. Each one
starts the same way, here:

1. on every rank, the handle's own checks (open, not broken, writable for a write), then the call's
   ``checks`` (types, shapes, NaN, duplicates in this call: anything this rank can tell alone);
2. ONE all-gather that agrees on the outcome (collective.py): if any rank failed, every rank raises
   the same class before anything changes anywhere. A call that moves rows to their owners
   (:meth:`CollectiveCalls._start_routed`) folds this agreement into the exchange's all-gather of
   counts, which also plans the route (exchange.py);
3. then the call's own steps, each agreed the same way (``Collective.agreed``): the owners' checks of
   what they received, the reads at the owners, the apply.

The handle is assembled from parts over this one, as ``EmbeddingStore`` is: reading rows
(reads.py), writing them and committing (writes.py), and in store.py creating, opening, the
properties and closing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from ..errors import ClosedError, CorruptionError, InvalidInputError, ReadOnlyError
from ..format.records import MAIN
from ..inputs import IdsLike, as_dtype
from ..options import StoreOptions
from ..sharding.manifest import RESERVED_PREFIX, Manifest
from ..sharding.ownership import owner_of
from . import failures
from .collective import Collective, attempt
from .exchange import Exchange, Route
from .shard import Shard
from .twophase import TwoPhaseCommit

T = TypeVar("T")


class CollectiveCalls:
    """A sharded store handle's group, shard and counters, and how each of its calls starts (module docstring)."""

    _path: str
    _manifest: Manifest
    _collective: Collective
    _shard: Shard
    _exchange: Exchange
    _protocol: TwoPhaseCommit
    _readonly: bool
    _dtype: np.dtype
    _commit: int  # a reader: the global commit its last get served
    _rows: int  # global rows, uncommitted adds included
    _committed_rows: int
    _commit_every: int | None
    _since_commit: int  # collective put/add/step calls since the last commit
    _changed: bool  # the same on every rank: every change is a collective call
    _closed: bool

    def _setup(self, path: str, manifest: Manifest, c: Collective, shard: Shard, readonly: bool,
               options: StoreOptions) -> None:
        self._path, self._manifest, self._collective, self._shard = path, manifest, c, shard
        self._exchange = Exchange(c)
        self._protocol = TwoPhaseCommit(c, path, shard, manifest)
        self._readonly = readonly
        self._dtype = as_dtype(manifest.dtype)
        self._commit = manifest.commit
        self._rows = self._committed_rows = manifest.rows
        self._commit_every = options.commit_every
        self._since_commit = 0
        self._changed = False
        self._closed = False
        c.where_it_stands = functools.partial(failures.where_it_stands, self._protocol, readonly)

    # ------------------------------------------------------------------ the skeleton
    def _start(self, call: str, checks: Callable[[], T] | None = None, *, writes: bool) -> T:
        """Steps 1 and 2 of a call that moves no rows: this rank's checks, agreed; returns what ``checks`` returned.

        ``checks`` may also do this rank's whole local part when nothing is left to agree on after it
        (``rollback``: the shard drops its changes).
        """
        return self._collective.agreed(self._check_call, call, writes, checks)

    def _start_routed(self, call: str, checks: Callable[[], tuple], *, writes: bool, flag: int = 0,
                      context: str = "") -> tuple[tuple, Route]:
        """Steps 1 and 2 of a call that moves rows: ``checks()`` returns ``(ids, *per-ID arrays)``; the agreement
        rides on the all-gather of counts that plans the route of the IDs to their owners.

        Returns what ``checks`` returned and the route. ``flag`` and ``context``: see ``Exchange.route``.
        """
        def checked() -> tuple[tuple, np.ndarray]:
            args = self._check_call(call, writes, checks)
            return args, self.owner_of(args[0])

        result, error = attempt(checked)
        route = self._exchange.route(None if result is None else result[1], error, context, flag)
        return result[0], route  # (the route raised on every rank if any rank's checks failed)

    def _check_call(self, call: str, writes: bool, checks: Callable[[], T] | None) -> Any:
        self._check_handle(call, writes)
        return None if checks is None else checks()

    def _check_handle(self, call: str, writes: bool) -> None:
        """The handle's own checks: open, not broken by a failed undo, and writable for a write."""
        if self._closed:
            raise ClosedError(f"{call}: the sharded store {self._path} is closed; open it again")
        if self._protocol.broken:
            raise CorruptionError(f"{call}: {self._path}: {self._protocol.broken}")
        if writes and self._readonly:
            raise ReadOnlyError(f"{call}: the sharded store {self._path} is open read-only; open it with "
                                "readonly=False")

    # ------------------------------------------------------------- what calls need
    def owner_of(self, ids: IdsLike) -> np.ndarray:
        """The rank owning each of ``ids`` in this store (local, not collective)."""
        return owner_of(ids, self._collective.world_size, self._manifest.buckets)

    def _column_shape(self, name: str) -> tuple[int, np.dtype]:
        """(width, dtype) of column ``name`` (the embeddings or a declared auxiliary column)."""
        if name == MAIN:
            return self._manifest.dim, self._dtype
        described = self._shard.store.columns.get(name)
        if described is None or str(name).startswith(RESERVED_PREFIX):
            raise InvalidInputError(f"no column {name!r}; declare it with ensure_column first")
        return int(described["width"]), as_dtype(described["dtype"])
