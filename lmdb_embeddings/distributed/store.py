"""ShardedEmbeddingStore: one embedding table sharded over a torch.distributed process group.

Rank r keeps the rows it owns (``owner_of``) in its shard, a complete ``EmbeddingStore`` in
its own sub-directory of ``path`` (manifest.py). Every public method is a collective call:
all ranks call the same methods in the same order, each with its own IDs. A call runs as

1. local checks, then ONE all-gather of ``[status, flag, counts per destination]``
   (exchange.py): any failure raises the same exception class on every rank (collective.py);
2. one ``all_to_all_single`` of the IDs (and, for ``put``/``add``, their rows) to their owners;
3. the owners' checks (unknown IDs, an ID given by two ranks, an ID already there), agreed
   by one small all-gather;
4. the owners apply the call to their shards (``get`` returns the rows in one more exchange).

``commit`` is the two-phase commit of twophase.py; ``open`` first brings every shard to the
manifest's commit. A read-only store's ``get`` serves one decided global commit: the ranks
check that every shard served the same one, no newer than the manifest, else read again.
"""

from __future__ import annotations

import functools
import logging
import os

import numpy as np
import torch

from ..core.inputs import as_dtype, as_ids, as_values, check_unique
from ..errors import (
    ClosedError,
    CorruptionError,
    InvalidInputError,
    InvalidTypeError,
    ReadOnlyError,
    UnknownIdError,
)
from ..format.records import MAIN
from ..store import EmbeddingStore, as_tensor
from . import failures, opening, training
from .collective import Collective, attempt
from .creation import initial_rows
from .exchange import Exchange, Route
from .manifest import (
    RESERVED_PREFIX,
    ROW_COLUMN,
    Manifest,
)
from .ownership import owner_of
from .shard import Shard
from .twophase import TwoPhaseCommit, read_decided

log = logging.getLogger(__name__)

_SHOWN = 10


class _LocalHints:
    """What a sharded store does on this rank alone, through its own shard: never a collective call."""

    _shard: Shard

    def prefetch(self, ids) -> None:
        """``store.local.prefetch(ids)``: a hint for the rows of ``ids`` this rank owns (the others are unknown to
        its shard, so ignored); returns at once."""
        self._shard.store.prefetch(ids)


class ShardedEmbeddingStore(_LocalHints):
    """An embedding table sharded over the ranks of a process group; every method is collective.

    Create one with :meth:`create` or open one with :meth:`open` on EVERY rank. ``get``,
    ``get_tensor``, ``put``, ``add`` take each rank's own IDs (any length, 0 included).

    Example (under ``torchrun --nproc_per_node=2``)::

        dist.init_process_group("gloo")
        store = ShardedEmbeddingStore.create("/data/emb", 1_000_000, 64)
        rows = store.get(my_ids)            # local and remote rows, in the order of my_ids
        store.put(my_ids, rows + 0.1)
        store.commit()                      # all shards move to the next commit together
        store.close()
    """

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, path, ids, dim, *, dtype="float32", chunk_rows=None, init="normal", seed=0,
               overwrite=False, group=None, **open_options) -> ShardedEmbeddingStore:
        """Build a sharded store at ``path`` on every rank of ``group`` and open it writable.

        Every rank passes the same global ``ids``, ``dim`` ... ``init``; each builds its own
        shard. Every ID's initial row equals the row ``EmbeddingStore.create`` gives it, for
        any world size. The store exists once the manifest is written (after every shard
        is complete): a create killed before that leaves no store (its leftovers are
        removed by the next create), and ``overwrite`` keeps the old store until then.

        Raises (on every rank): ValueError/TypeError for bad arguments or arguments that
        differ between ranks; FileExistsError if a store or other files are at ``path``
        and not ``overwrite``; EmbeddingStoreError if a writer holds the old store.
        """
        c = Collective(group)
        path = os.path.abspath(os.fspath(path))
        with failures.collective_open("create", path):
            manifest, options = opening.create_shards(c, path, (ids, dim, dtype, chunk_rows, init, seed),
                                                      bool(overwrite), open_options)
            return cls._attach(path, manifest, c, readonly=False, options=options)

    @classmethod
    def open(cls, path, *, readonly=False, group=None, **open_options) -> ShardedEmbeddingStore:
        """Open the sharded store at ``path`` on every rank of ``group``.

        A writable open first brings every shard to the manifest's commit (undoing a
        prepared commit that was never decided). A read-only open waits a few seconds
        for a commit in progress elsewhere to be decided.

        Raises (on every rank): FileNotFoundError (no store), EmbeddingStoreError (made
        for another world size: the message names both; a writer holds a shard; damage).
        """
        c = Collective(group)
        path = os.path.abspath(os.fspath(path))
        with failures.collective_open("open", path):
            manifest, options = opening.read_for_open(c, path, open_options)
            return cls._attach(path, manifest, c, readonly=bool(readonly), options=options)

    @classmethod
    def _attach(cls, path: str, manifest: Manifest, c: Collective, readonly: bool,
                options: dict) -> ShardedEmbeddingStore:
        """Open this rank's shard and bring all shards to the manifest's commit."""
        shard, manifest = opening.attach_shard(c, path, manifest, readonly, options)
        store = cls.__new__(cls)
        store._setup(path, manifest, c, shard, readonly, options)
        return store

    def _setup(self, path: str, manifest: Manifest, c: Collective, shard: Shard, readonly: bool,
               options: dict) -> None:
        self._path, self._manifest, self._collective, self._shard = path, manifest, c, shard
        self._exchange = Exchange(c)
        self._protocol = TwoPhaseCommit(c, path, shard, manifest)
        self._readonly = readonly
        self._dtype = as_dtype(manifest.dtype)
        self._commit = manifest.commit  # a reader: the commit its last get was served
        self._rows = self._committed_rows = manifest.rows
        self._commit_every = options.get("commit_every")
        self._since_commit = 0
        self._changed = False  # the same on every rank: every change is a collective call
        self._closed = False
        c.where_it_stands = functools.partial(failures.where_it_stands, self._protocol, readonly)

    # ----------------------------------------------------------------- properties
    @property
    def path(self) -> str:
        return self._path

    @property
    def rank(self) -> int:
        return self._collective.rank

    @property
    def world_size(self) -> int:
        return self._collective.world_size

    @property
    def group(self):
        return self._collective.group

    @property
    def collective(self) -> Collective:
        """The store's communicator (rank, size, agreement steps); the sampler uses it."""
        return self._collective

    @property
    def buckets(self) -> int:
        return self._manifest.buckets

    @property
    def dim(self) -> int:
        return self._manifest.dim

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def chunk_rows(self) -> int:
        return self._manifest.chunk_rows

    @property
    def commit_count(self) -> int:
        """The global commit every shard is at (a read-only store: the one its last ``get`` served)."""
        return self._protocol.commit_count if not self._readonly else self._commit

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def uuid(self) -> str:  # the table's identity: its shards' token, new at each create and restore
        return self._manifest.token

    @property
    def local(self) -> EmbeddingStore:
        """This rank's shard: an ``EmbeddingStore`` holding the rows this rank owns.

        It reads like any store and pickles like one (a read-only handle in the receiving
        process), so DataLoader workers of rank r read r's committed rows. Its writes (and
        ``close``) raise ``PermissionError``: a change made on one shard alone would not be a
        global commit; write through the sharded store.
        """
        return self._shard.store

    def __len__(self) -> int:
        """Rows of the whole table (all shards), uncommitted adds included."""
        return self._rows

    def owner_of(self, ids) -> np.ndarray:
        """The rank owning each of ``ids`` in this store (local, not collective)."""
        return owner_of(ids, self.world_size, self.buckets)

    @property
    def columns(self) -> dict:
        """Auxiliary columns (optimizer state), as every shard declares them."""
        return {n: d for n, d in self._shard.store.columns.items() if not n.startswith(RESERVED_PREFIX)}

    @property
    def attrs(self) -> dict:
        """Small metadata committed with the rows (the same on every shard), e.g. optimizer step counts."""
        return {k: v for k, v in self._shard.store.attrs.items() if not k.startswith(RESERVED_PREFIX)}

    def __repr__(self) -> str:
        mode = "closed" if self._closed else ("read-only" if self._readonly else "writable")
        return f"ShardedEmbeddingStore({self._path!r}, rank {self.rank} of {self.world_size}, {mode})"

    def __reduce__(self):
        raise InvalidTypeError("a ShardedEmbeddingStore cannot be pickled (its calls are collective); "
                               "give DataLoader workers store.local, this rank's shard")

    # --------------------------------------------------------------------- reading
    def get(self, ids) -> np.ndarray:
        """Rows of this rank's ``ids`` in their order, local and remote.

        A writable store sees every put/add of earlier collective calls, committed or not; a
        read-only one serves one decided global commit, the same on every shard.

        Raises (on every rank): KeyError if any rank asked for an unknown ID.
        """
        return self._gather(MAIN, ids, "get")

    def get_tensor(self, ids, device=None) -> torch.Tensor:
        """Like :meth:`get`, as a ``torch.Tensor`` on ``device`` (CUDA copies go through pinned memory)."""
        return as_tensor(self.get(ids), device)

    def get_column(self, name: str, ids) -> np.ndarray:
        """Rows of an auxiliary column for this rank's ``ids`` (like :meth:`get`)."""
        return self._gather(name, ids, "get_column")

    def _gather(self, name: str, ids, call: str) -> np.ndarray:
        def checked():
            self._check_open(call)
            _column_shape(self, name)
            flat = as_ids(ids)
            return flat, self.owner_of(flat)

        checked_args, error = attempt(checked)
        route = self._exchange.route(_owners(checked_args), error)  # raises on every rank if any failed
        flat, _ = checked_args
        (wanted,) = self._exchange.send(route, flat)
        if self._readonly:
            read = functools.partial(self._shard.store.get_with_state, wanted, name)
            rows, self._commit, self._rows = read_decided(self._collective, self._path, read)
            self._committed_rows = self._rows
        else:
            rows, error = attempt(self._shard.store.get_column, name, wanted)
            self._collective.agree(error)
        (out,) = self._exchange.send_back(route, rows)
        return out

    # --------------------------------------------------------------------- writing
    def put(self, ids, values) -> None:
        """Overwrite the rows of existing ``ids`` (sent to their owners); durable at :meth:`commit`.

        Raises (on every rank, nothing changed anywhere): ValueError for a wrong shape,
        NaN/inf, an ID given twice (also by two ranks); KeyError for an unknown ID;
        PermissionError on a read-only store.
        """
        self._scatter(MAIN, ids, values, "put")
        self._count_update()

    def put_column(self, name: str, ids, values) -> None:
        """Overwrite rows of an auxiliary column (like :meth:`put`, not counted by ``commit_every``)."""
        self._scatter(name, ids, values, "put_column")

    def _scatter(self, name: str, ids, values, call: str) -> None:
        def checked():
            self._check_writable(call)
            width, dtype = _column_shape(self, name)
            flat = as_ids(ids)
            check_unique(flat, call)
            return flat, as_values(values, len(flat), width, dtype, call), self.owner_of(flat)

        checked_args, error = attempt(checked)
        route = self._exchange.route(_owners(checked_args), error)
        flat, vals, _ = checked_args
        got_ids, got_vals = self._exchange.send(route, flat, vals)
        _, error = attempt(_check_received, self._shard.store, route, got_ids, call, must_exist=True)
        self._collective.agree(error)
        with self._shard.writing() as shard:
            shard.put_column(name, got_ids, got_vals)
        self._changed = True

    def add(self, ids, values=None) -> None:
        """Append NEW ``ids`` to their owners (values default to the table's init, as a single store's ``add``).

        The new rows follow the existing ones in the order of the ranks' calls (rank 0's
        IDs first), so the table equals a single store's after ``add`` of the ranks'
        IDs concatenated, defaults included.

        Raises (on every rank, nothing changed anywhere): ValueError if an ID exists or is
        given twice (also by two ranks), or for bad values; PermissionError if read-only.
        """
        def checked():
            self._check_writable("add")
            flat = as_ids(ids)
            check_unique(flat, "add")
            vals = None if values is None else as_values(values, len(flat), self.dim, self._dtype, "add")
            return flat, vals, self.owner_of(flat)

        checked_args, error = attempt(checked)
        route = self._exchange.route(_owners(checked_args), error)
        flat, vals, _ = checked_args
        start = self._rows + sum(route.sent_by(r) for r in range(self.rank))
        positions = np.arange(start, start + len(flat), dtype=np.int64)
        if vals is None:
            m = self._manifest
            vals = initial_rows(m.init, m.seed, m.chunk_rows, m.dim, self._dtype, positions)
        got_ids, got_pos, got_vals = self._exchange.send(route, flat, positions, vals)
        _, error = attempt(_check_received, self._shard.store, route, got_ids, "add", must_exist=False)
        self._collective.agree(error)
        with self._shard.writing() as shard:
            shard.add(got_ids, got_vals)  # received in rank order: ascending global positions
            shard.put_column(ROW_COLUMN, got_ids, got_pos.astype(np.float64).reshape(-1, 1))
        self._rows += route.total
        self._changed = True
        self._count_update()

    def ensure_column(self, name: str, width: int, dtype="float32", fill: float = 0.0) -> None:
        """Declare an auxiliary per-row column on every shard (collective; see ``EmbeddingStore.ensure_column``)."""
        def declare():
            self._check_open("ensure_column")
            if str(name).startswith(RESERVED_PREFIX):
                raise InvalidInputError(f"column name {name!r}: names starting with {RESERVED_PREFIX!r} are "
                                        "reserved by the sharded store")
            new = name not in self._shard.store.columns
            with self._shard.writing() as shard:
                shard.ensure_column(name, width, dtype, fill)
            return new

        new, error = attempt(declare)
        self._collective.agree(error)
        self._changed = self._changed or bool(new)

    def set_attr(self, key: str, value) -> None:
        """Set a small metadata value on every shard (collective; every rank must pass the same value)."""
        def assign():
            self._check_writable("set_attr")
            if str(key).startswith(RESERVED_PREFIX):
                raise InvalidInputError(f"attr {key!r}: keys starting with {RESERVED_PREFIX!r} are reserved")
            with self._shard.writing() as shard:
                shard.set_attr(key, value)

        self._collective.agree(attempt(assign)[1])
        self._changed = True

    def optimizer_step(self, optimizer, grads) -> None:
        """Run one optimizer step at the rows' owners (collective; ``StoreOptimizer.step`` calls it).

        Every rank sends the gradients of the rows it looked up to their owners in one
        exchange of (id, gradient row); each owner sums the gradients of an ID over all
        ranks and applies the optimizer's row-wise update once, to its shard.
        """
        _, error = attempt(self._check_writable, "step")
        if training.owner_step(self._exchange, self._shard, optimizer, grads, self.owner_of, error):
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
            self._collective.agree(attempt(self._check_writable, "commit")[1])
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
        def discard():
            self._check_writable("rollback")
            self._shard.rollback()

        self._collective.agree(attempt(discard)[1])
        self._rows, self._changed, self._since_commit = self._committed_rows, False, 0

    # ------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Commit pending changes (writable), then release every shard. Collective; idempotent."""
        if self._closed:
            return
        if self._collective.failure is not None:  # the group failed: release this shard, no collective
            self._closed = True
            self._shard.release()
            return
        if not self._readonly and self._changed:
            self.commit()  # if it raises, the handle stays open
        self._shard.close()
        self._closed = True
        self._collective.barrier()

    def __enter__(self) -> ShardedEmbeddingStore:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self._closed and not self._readonly and self._collective.failure is None:
            self.rollback()  # collective errors are raised on every rank, so every rank gets here
        self.close()

    def __del__(self) -> None:  # no collectives from the garbage collector: release this shard only
        try:
            if not self._closed:
                self._closed = True
                self._shard.release()
        except Exception:
            pass

    # ----------------------------------------------------------------------- checks
    def _check_open(self, call: str) -> None:
        if self._closed:
            raise ClosedError(f"{call}: the sharded store {self._path} is closed; open it again")
        if self._protocol.broken:
            raise CorruptionError(f"{call}: {self._path}: {self._protocol.broken}")

    def _check_writable(self, call: str) -> None:
        self._check_open(call)
        if self._readonly:
            raise ReadOnlyError(f"{call}: the sharded store {self._path} is open read-only; open it with "
                                "readonly=False")



# ------------------------------------------------------------------------- helpers
def _column_shape(store: ShardedEmbeddingStore, name: str) -> tuple[int, np.dtype]:
    """(width, dtype) of column ``name`` (the embeddings or a declared auxiliary column)."""
    if name == MAIN:
        return store.dim, store.dtype
    described = store.columns.get(name)
    if described is None:
        raise InvalidInputError(f"no column {name!r}; declare it with ensure_column first")
    return int(described["width"]), as_dtype(described["dtype"])


def _owners(checked_args):
    """The owners (last item) of a call's checked arguments, None if the checks failed."""
    return None if checked_args is None else checked_args[-1]




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
