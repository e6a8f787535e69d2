"""ShardedWrites: the part of a ``ShardedEmbeddingStore`` that changes the table and commits or discards the changes.

``put``/``add`` send each rank's rows to their owners in one exchange; the owners check what they
received (an unknown ID, an ID sent by two ranks, an ID already there for ``add``), the ranks agree,
and only then does any shard change. ``commit`` is the two-phase commit (twophase.py), ``rollback``
drops every shard's changes; both, like every call, start with the skeleton of calls.py.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidInputError, UnknownIdError
from ..format.records import MAIN
from ..inputs import IdsLike, ValuesLike, as_ids, as_values, check_unique
from ..sharding.creation import initial_rows
from ..sharding.manifest import RESERVED_PREFIX, ROW_COLUMN
from ..store import EmbeddingStore
from ..store_writes import checked_attr, column_to_declare
from . import training
from .calls import CollectiveCalls
from .exchange import Route

_SHOWN = 10


class ShardedWrites(CollectiveCalls):
    """Puts, adds, columns, attrs, optimizer steps, commit and rollback (a part of ``ShardedEmbeddingStore``)."""

    def put(self, ids: IdsLike, values: ValuesLike) -> None:
        """Overwrite the rows of existing ``ids`` (sent to their owners); durable at :meth:`commit`.

        Raises (on every rank, nothing changed anywhere): ValueError for a wrong shape,
        NaN/inf, an ID given twice (also by two ranks); KeyError for an unknown ID;
        PermissionError on a read-only store.
        """
        self._scatter(MAIN, ids, values, "put")
        self._count_update()

    def put_column(self, name: str, ids: IdsLike, values: ValuesLike) -> None:
        """Overwrite rows of an auxiliary column (like :meth:`put`, not counted by ``commit_every``)."""
        self._scatter(name, ids, values, "put_column")

    def _scatter(self, name: str, ids: IdsLike, values: ValuesLike, call: str) -> None:
        def checks() -> tuple[np.ndarray, np.ndarray]:
            width, dtype = self._column_shape(name)
            flat = as_ids(ids)
            check_unique(flat, call)
            return flat, as_values(values, len(flat), width, dtype, call)

        (flat, vals), route = self._start_routed(call, checks, writes=True)
        got_ids, got_vals = self._exchange.send(route, flat, vals)
        self._collective.agreed(_check_received, self._shard.store, route, got_ids, call, True)
        with self._shard.writing() as shard:
            shard.put_column(name, got_ids, got_vals)
        self._changed = True

    def add(self, ids: IdsLike, values: ValuesLike | None = None) -> None:
        """Append NEW ``ids`` to their owners (values default to the table's init, as a single store's ``add``).

        The new rows follow the existing ones in the order of the ranks' calls (rank 0's
        IDs first), so the table equals a single store's after ``add`` of the ranks'
        IDs concatenated, defaults included.

        Raises (on every rank, nothing changed anywhere): ValueError if an ID exists or is
        given twice (also by two ranks), or for bad values; PermissionError if read-only.
        """
        m = self._manifest

        def checks() -> tuple[np.ndarray, np.ndarray | None]:
            flat = as_ids(ids)
            check_unique(flat, "add")
            return flat, None if values is None else as_values(values, len(flat), m.dim, self._dtype, "add")

        (flat, vals), route = self._start_routed("add", checks, writes=True)
        start = self._rows + sum(route.sent_by(r) for r in range(self._collective.rank))
        positions = np.arange(start, start + len(flat), dtype=np.int64)
        if vals is None:
            vals = initial_rows(m.init, m.seed, m.chunk_rows, m.dim, self._dtype, positions)
        got_ids, got_pos, got_vals = self._exchange.send(route, flat, positions, vals)
        self._collective.agreed(_check_received, self._shard.store, route, got_ids, "add", False)
        with self._shard.writing() as shard:
            shard.add(got_ids, got_vals)  # received in rank order: ascending global positions
            shard.put_column(ROW_COLUMN, got_ids, got_pos.astype(np.float64).reshape(-1, 1))
        self._rows += route.total
        self._changed = True
        self._count_update()

    def ensure_column(self, name: str, width: int, dtype: str | np.dtype = "float32", fill: float = 0.0) -> None:
        """Declare an auxiliary per-row column on every shard (collective; see ``EmbeddingStore.ensure_column``)."""
        def checks():
            if str(name).startswith(RESERVED_PREFIX):
                raise InvalidInputError(f"column name {name!r}: names starting with {RESERVED_PREFIX!r} are "
                                        "reserved by the sharded store")
            spec = column_to_declare(self._shard.store.columns, name, width, dtype, fill)
            if spec is not None:
                self._check_handle("ensure_column", writes=True)  # only a new column is a write
            return spec

        if self._start("ensure_column", checks, writes=False) is not None:
            with self._shard.writing() as shard:
                shard.ensure_column(name, width, dtype, fill)
            self._changed = True

    def set_attr(self, key: str, value: object) -> None:
        """Set a small metadata value on every shard (collective; every rank must pass the same value)."""
        def checks() -> str:
            if str(key).startswith(RESERVED_PREFIX):
                raise InvalidInputError(f"attr {key!r}: keys starting with {RESERVED_PREFIX!r} are reserved")
            return checked_attr(key, value)

        self._start("set_attr", checks, writes=True)
        with self._shard.writing() as shard:
            shard.set_attr(key, value)
        self._changed = True

    def optimizer_step(self, optimizer, grads) -> None:
        """Run one optimizer step at the rows' owners (collective; ``StoreOptimizer.step`` calls it).

        Every rank sends the gradients of the rows it looked up to their owners in one
        exchange of (id, gradient row); each owner sums the gradients of an ID over all
        ranks and applies the optimizer's row-wise update once, to its shard.
        """
        def checks() -> tuple[np.ndarray, np.ndarray]:
            return training.summed(grads, self._manifest.dim, optimizer.compute_dtype)

        (ids, values), route = self._start_routed("step", checks, writes=True, flag=int(grads is not None),
                                                  context="step: ")
        if training.owner_step(self._exchange, self._shard, optimizer, route, ids, values):
            self._changed = True
            self._count_update()

    def _count_update(self) -> None:
        self._since_commit += 1
        if self._commit_every is not None and self._since_commit >= self._commit_every:
            self.commit()

    # ------------------------------------------------------------------ transactions
    def commit(self) -> None:
        """Make every change so far durable on every shard, atomically across shards (two-phase).

        When it returns on any rank, the new commit survives any crash; a rank killed at
        any moment leaves a store that reopens at the old or the new commit on every shard.

        Raises (on every rank): CommitError if a shard could not commit or the manifest
        could not be written; every shard is then back at the old commit and the changes
        since it are discarded on every rank.
        """
        with self._protocol.failing_as_commit(self._protocol.commit_count + 1, made=False):
            self._start("commit", writes=True)
        self._since_commit = 0
        if not self._changed:
            return
        target = self._protocol.commit_count + 1
        try:
            self._protocol.commit(self._rows)
        finally:
            if self._protocol.commit_count == target:
                self._committed_rows = self._rows
            else:
                self._rows = self._committed_rows
            self._manifest = self._protocol.manifest
            self._changed = False

    def rollback(self) -> None:
        """Discard every change since the last commit, on every shard."""
        self._start("rollback", self._shard.rollback, writes=True)
        self._rows, self._changed, self._since_commit = self._committed_rows, False, 0


def _check_received(shard: EmbeddingStore, route: Route, ids: np.ndarray, call: str, must_exist: bool) -> None:
    """Owner side: no ID sent by two ranks; every ID known (put) or new (add)."""
    if len(ids) > 1:
        order = np.argsort(ids, kind="stable")
        twice = np.flatnonzero(ids[order][1:] == ids[order][:-1])
        if len(twice):
            sources = route.sources[order]
            shown = ", ".join(f"{int(ids[order][i])} (ranks {int(sources[i])} and {int(sources[i + 1])})"
                              for i in twice[:_SHOWN])
            raise InvalidInputError(f"{call}: id(s) given by more than one rank in one call: {shown}; "
                                    "give each id on one rank only")
    present = shard.contains(ids)
    if must_exist and not present.all():
        missing = np.unique(ids[~present])
        raise UnknownIdError(f"{call}: {len(missing)} unknown sample id(s): "
                             f"{', '.join(str(int(x)) for x in missing[:_SHOWN])}")
    if not must_exist and present.any():
        there = ids[present]
        raise InvalidInputError(f"{call}: {len(there)} id(s) already in the store: "
                                f"{', '.join(str(int(x)) for x in there[:_SHOWN])}")
