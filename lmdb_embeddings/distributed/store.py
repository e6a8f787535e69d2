"""ShardedEmbeddingStore: one embedding table sharded over a torch.distributed process group.

Rank r keeps the rows it owns (``owner_of``) in its shard, a complete ``EmbeddingStore`` in
its own sub-directory of ``path`` (manifest.py). Every public method is a collective call:
all ranks call the same methods in the same order, each with its own IDs. A call runs as

1. local checks, then ONE all-gather of ``[status, counts per destination]`` (exchange.py):
   any failure raises the same exception class on every rank (collective.py);
2. one ``all_to_all_single`` of the IDs (and, for ``put``/``add``, their rows) to their owners;
3. the owners' checks (unknown IDs, an ID given by two ranks, an ID already there), agreed
   by one small all-gather;
4. the owners apply the call to their shards (``get`` returns the rows in one more exchange).

``commit`` is the two-phase commit of docs/DISTRIBUTED.md: every shard commits a revertible
"prepared E+1" (shard.py), the decision rank writes the manifest of E+1, and only then
does any rank return; ``open`` returns every shard that is ahead of the manifest to it.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch

from ..errors import (
    ClosedError,
    CorruptionError,
    EmbeddingStoreError,
    InvalidInputError,
    InvalidTypeError,
    ReadOnlyError,
    StoreExistsError,
    UnknownIdError,
    WriterLockedError,
)
from ..inputs import as_dtype, as_ids, as_values, check_unique
from ..options import StoreOptions
from ..store import MAIN, EmbeddingStore
from ..writer_lock import holder_pid
from . import training
from .collective import Collective, attempt, error_code
from .creation import TableSpec, initial_rows
from .exchange import Exchange
from .manifest import (
    COMMIT_ATTR,
    RESERVED_PREFIX,
    ROW_COLUMN,
    Manifest,
    ManifestSyncError,
    is_sharded,
    new_token,
    only_stale_entries,
    read_manifest,
    remove_entries,
    shard_name,
    stale_entries,
    write_manifest,
)
from .ownership import DEFAULT_BUCKETS, owner_of
from .shard import Shard

log = logging.getLogger(__name__)

_BUILD_BLOCK_CHUNKS = 64  # create: global chunks generated (and appended to the shard) per step
_READONLY_WAIT_S = 10.0  # a read-only open waits this long for a commit in progress to be decided
_SHOWN = 10


class ShardedEmbeddingStore:
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
    def create(cls, path, ids, dim, *, dtype="float32", chunk_rows=1024, init="normal", seed=0,
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
        table, error = attempt(TableSpec.from_create_args, ids, dim, dtype, chunk_rows, init, seed)
        options, options_error = attempt(_shard_options, open_options)
        c.agree(error or options_error)
        prints = c.all_gather_ints([table.fingerprint()])[:, 0]
        if (prints != prints[0]).any():
            ranks = ", ".join(str(r) for r in np.flatnonzero(prints != prints[0])[:_SHOWN])
            raise InvalidInputError(f"create: rank(s) {ranks} passed other ids, dim, dtype, chunk_rows, init or seed "
                                    "than rank 0; every rank must pass the same global table")
        plan, error = attempt(_plan_create, path, bool(overwrite)) if c.rank == 0 else (None, None)
        c.agree(error)
        plan = c.broadcast_object(plan, 0)
        manifest = Manifest(commit=0, world_size=c.world_size, buckets=DEFAULT_BUCKETS, token=plan["token"],
                            dim=table.dim, dtype=table.dtype.name, chunk_rows=table.chunk_rows, init=table.init,
                            seed=table.seed, rows=len(table.ids),
                            shards=[shard_name(r, plan["token"]) for r in range(c.world_size)])
        mine = manifest.shard_path(path, c.rank)
        _, error = attempt(_build_shard, path, mine, table, manifest, c.rank, options)
        _agree_or_remove(c, error, mine)
        _, error = attempt(write_manifest, path, manifest) if c.rank == 0 else (None, None)
        _agree_or_remove(c, error, mine)
        _remove_replaced(c, path, manifest, plan["old"])
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
        options, error = attempt(_shard_options, open_options)
        c.agree(error)
        manifest = _read_manifest_on_rank0(c, path)
        if manifest.world_size != c.world_size:
            raise EmbeddingStoreError(
                f"{path} is sharded for world size {manifest.world_size}, but this process group has world size "
                f"{c.world_size}; run it with {manifest.world_size} ranks, or reshard it: `lmdb-embeddings dump "
                f"{path} OUT` then `lmdb-embeddings restore OUT NEW_PATH --shards {c.world_size}`")
        return cls._attach(path, manifest, c, readonly=bool(readonly), options=options)

    @classmethod
    def _attach(cls, path: str, manifest: Manifest, c: Collective, readonly: bool,
                options: dict) -> ShardedEmbeddingStore:
        """Open this rank's shard, bring all shards to the manifest's commit, check the row count."""
        shard, error = attempt(Shard, manifest.shard_path(path, c.rank), readonly=readonly, options=options)
        try:
            c.agree(error)
            manifest = _recover(c, path, manifest, shard, readonly)
            rows = int(c.all_gather_ints([len(shard.store)])[:, 0].sum())
            if rows != manifest.rows:
                raise CorruptionError(f"{path}: the shards hold {rows} rows, the manifest of commit "
                                      f"{manifest.commit} says {manifest.rows}")
        except BaseException:
            if shard is not None:
                _release(shard, readonly)
            raise
        store = cls.__new__(cls)
        store._setup(path, manifest, c, shard, readonly, options)
        return store

    def _setup(self, path: str, manifest: Manifest, c: Collective, shard: Shard, readonly: bool,
               options: dict) -> None:
        self._path, self._manifest, self._collective, self._shard = path, manifest, c, shard
        self._exchange = Exchange(c)
        self._readonly = readonly
        self._dtype = as_dtype(manifest.dtype)
        self._commit = manifest.commit
        self._rows = self._committed_rows = manifest.rows
        self._commit_every = options.get("commit_every")
        self._since_commit = 0
        self._changed = False  # the same on every rank: every change is a collective call
        self._closed = False
        self._broken: str | None = None  # why this rank's shard may no longer be used

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
        """The global commit every shard is at (the manifest's)."""
        return self._commit

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def local(self) -> EmbeddingStore:
        """This rank's shard: an ``EmbeddingStore`` holding the rows this rank owns.

        It pickles like any store (a read-only handle in the receiving process), so
        DataLoader workers of rank r read r's committed rows. Write through the sharded
        store, not through this handle: a commit made on it alone is not a global commit.
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
        """Rows of this rank's ``ids`` in their order, local and remote, uncommitted changes included.

        Raises (on every rank): KeyError if any rank asked for an unknown ID.
        """
        return self._gather(MAIN, ids, "get")

    def get_tensor(self, ids, device=None) -> torch.Tensor:
        """Like :meth:`get`, as a ``torch.Tensor`` on ``device``."""
        tensor = torch.from_numpy(self.get(ids))
        if device is None:
            return tensor
        device = torch.device(device)
        if device.type == "cuda":
            return tensor.pin_memory().to(device, non_blocking=True)
        return tensor.to(device)

    def get_column(self, name: str, ids) -> np.ndarray:
        """Rows of an auxiliary column for this rank's ``ids`` (like :meth:`get`)."""
        return self._gather(name, ids, "get_column")

    def _gather(self, name: str, ids, call: str) -> np.ndarray:
        def checked():
            self._check_open(call)
            self._check_column(name)
            flat = as_ids(ids)
            return flat, self.owner_of(flat)

        checked_args, error = attempt(checked)
        route = self._exchange.route(_owners(checked_args), error)  # raises on every rank if any failed
        flat, _ = checked_args
        (wanted,) = self._exchange.send(route, flat)
        rows, error = attempt(self._read_shard, name, wanted)
        self._collective.agree(error)
        (out,) = self._exchange.send_back(route, rows)
        return out

    def _read_shard(self, name: str, ids: np.ndarray) -> np.ndarray:
        store = self._shard.store
        return store.get(ids) if name == MAIN else store.get_column(name, ids)

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
            self._check_open(call)
            self._check_writable(call)
            width, dtype = self._check_column(name)
            flat = as_ids(ids)
            check_unique(flat, call)
            return flat, as_values(values, len(flat), width, dtype, call), self.owner_of(flat)

        checked_args, error = attempt(checked)
        route = self._exchange.route(_owners(checked_args), error)
        flat, vals, _ = checked_args
        got_ids, got_vals = self._exchange.send(route, flat, vals)
        _, error = attempt(self._check_received, route, got_ids, call, must_exist=True)
        self._collective.agree(error)
        if name == MAIN:
            self._shard.store.put(got_ids, got_vals)
        else:
            self._shard.store.put_column(name, got_ids, got_vals)
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
            self._check_open("add")
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
        _, error = attempt(self._check_received, route, got_ids, "add", must_exist=False)
        self._collective.agree(error)
        shard = self._shard.store
        shard.add(got_ids, got_vals)  # received in rank order: ascending global positions
        shard.put_column(ROW_COLUMN, got_ids, got_pos.astype(np.float64).reshape(-1, 1))
        self._rows += int(route.matrix.sum())
        self._changed = True
        self._count_update()

    def _check_received(self, route, ids: np.ndarray, call: str, must_exist: bool) -> None:
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
        present = self._shard.store.contains(ids)
        if must_exist and not present.all():
            missing = np.unique(ids[~present])
            raise UnknownIdError(f"{call}: {len(missing)} unknown sample id(s): "
                                 f"{', '.join(str(int(x)) for x in missing[:_SHOWN])}")
        if not must_exist and present.any():
            there = ids[present]
            raise InvalidInputError(f"{call}: {len(there)} id(s) already in the store: "
                                    f"{', '.join(str(int(x)) for x in there[:_SHOWN])}")

    def ensure_column(self, name: str, width: int, dtype="float32", fill: float = 0.0) -> None:
        """Declare an auxiliary per-row column on every shard (collective; see ``EmbeddingStore.ensure_column``)."""
        def declare():
            self._check_open("ensure_column")
            if str(name).startswith(RESERVED_PREFIX):
                raise InvalidInputError(f"column name {name!r}: names starting with {RESERVED_PREFIX!r} are "
                                        "reserved by the sharded store")
            new = name not in self._shard.store.columns
            self._shard.store.ensure_column(name, width, dtype, fill)
            return new

        new, error = attempt(declare)
        self._collective.agree(error)
        self._changed = self._changed or bool(new)

    def set_attr(self, key: str, value) -> None:
        """Set a small metadata value on every shard (collective; every rank must pass the same value)."""
        def assign():
            self._check_open("set_attr")
            self._check_writable("set_attr")
            if str(key).startswith(RESERVED_PREFIX):
                raise InvalidInputError(f"attr {key!r}: keys starting with {RESERVED_PREFIX!r} are reserved")
            self._shard.store.set_attr(key, value)

        self._collective.agree(attempt(assign)[1])
        self._changed = True

    def optimizer_step(self, optimizer, grads) -> None:
        """Run one optimizer step at the rows' owners (collective; ``StoreOptimizer.step`` calls it).

        Every rank sends the gradients of the rows it looked up to their owners in one
        exchange of (id, gradient row); each owner sums the gradients of an ID over all
        ranks and applies the optimizer's row-wise update once, to its shard.
        """
        _, error = attempt(self._check_open, "step")
        if error is None:
            _, error = attempt(self._check_writable, "step")
        if training.owner_step(self._exchange, self._shard.store, optimizer, grads, self.owner_of, error):
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
        c = self._collective
        _, error = attempt(self._check_open, "commit")
        if error is None:
            _, error = attempt(self._check_writable, "commit")
        c.agree(error)
        self._since_commit = 0
        if not self._changed:
            return
        target = self._commit + 1
        _, error = attempt(self._shard.prepare, target)  # phase 1: every shard durable at target, revertible
        codes = c.all_gather_ints([error_code(error)])[:, 0]
        if codes.any():
            self._abandon(error is None)
            c.raise_if_failed(codes, error, f"commit {target} failed, every shard is back at commit "
                                            f"{self._commit} and the changes since were discarded: ")
        manifest = self._manifest_for(target)
        _, error = attempt(write_manifest, self._path, manifest) if c.rank == 0 else (None, None)
        made = error is None or isinstance(error, ManifestSyncError)  # the rename is the decision
        gathered = c.all_gather_ints([error_code(error), made])  # phase 2: nobody returns before the decision
        if not gathered[0, 1]:
            self._abandon(True)
            c.raise_if_failed(gathered[:, 0], error, f"commit {target} failed, every shard is back at commit "
                                                     f"{self._commit}: ")
        self._manifest = manifest
        self._commit, self._committed_rows, self._changed = target, self._rows, False
        c.raise_if_failed(gathered[:, 0], error)  # made, but its durability is in doubt: say so everywhere

    def _manifest_for(self, commit: int) -> Manifest:
        m = self._manifest
        return Manifest(commit=commit, world_size=m.world_size, buckets=m.buckets, token=m.token, dim=m.dim,
                        dtype=m.dtype, chunk_rows=m.chunk_rows, init=m.init, seed=m.seed, rows=self._rows,
                        shards=list(m.shards))

    def _abandon(self, prepared: bool) -> None:
        """After a failed commit: undo this shard's prepared commit (or drop its pending changes)."""
        if prepared:
            _, error = attempt(self._shard.revert_to, self._commit)
            if error is not None:  # this shard is ahead of the others: no further call may use it
                self._broken = (f"rank {self.rank} could not undo its prepared commit {self._commit + 1} ({error}); "
                                "close the store and open it again (the open recovers it)")
                log.error("%s: %s", self._path, self._broken)
        else:
            attempt(self._shard.store.rollback)
        self._rows, self._changed = self._committed_rows, False

    def rollback(self) -> None:
        """Discard every change since the last commit, on every shard."""
        def discard():
            self._check_open("rollback")
            self._check_writable("rollback")
            self._shard.store.rollback()

        self._collective.agree(attempt(discard)[1])
        self._rows, self._changed, self._since_commit = self._committed_rows, False, 0

    # ------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Commit pending changes (writable), then release every shard. Collective; idempotent."""
        if self._closed:
            return
        if not self._readonly and self._changed:
            self.commit()  # if it raises, the handle stays open
        self._shard.close()
        self._closed = True
        self._collective.barrier()

    def __enter__(self) -> ShardedEmbeddingStore:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self._closed and not self._readonly:
            self.rollback()  # collective errors are raised on every rank, so every rank gets here
        self.close()

    def __del__(self) -> None:  # no collectives from the garbage collector: release this shard only
        try:
            if not self._closed:
                self._closed = True
                _release(self._shard, self._readonly)
        except Exception:
            pass

    # ----------------------------------------------------------------------- checks
    def _check_open(self, call: str) -> None:
        if self._closed:
            raise ClosedError(f"{call}: the sharded store {self._path} is closed; open it again")
        if self._broken:
            raise CorruptionError(f"{call}: {self._path}: {self._broken}")

    def _check_writable(self, call: str) -> None:
        if self._readonly:
            raise ReadOnlyError(f"{call}: the sharded store {self._path} is open read-only; open it with "
                                "readonly=False")

    def _check_column(self, name: str) -> tuple[int, np.dtype]:
        if name == MAIN:
            return self.dim, self._dtype
        described = self.columns.get(name)
        if described is None:
            raise InvalidInputError(f"no column {name!r}; declare it with ensure_column first")
        return int(described["width"]), as_dtype(described["dtype"])


# ------------------------------------------------------------------------- helpers
def _owners(checked_args):
    """The owners (last item) of a call's checked arguments, None if the checks failed."""
    return None if checked_args is None else checked_args[-1]


def _shard_options(open_options: dict) -> dict:
    """The user's open options, checked; ``undo_log`` belongs to the sharded store."""
    if "undo_log" in open_options:
        raise InvalidTypeError("undo_log is set by the sharded store itself; do not pass it")
    return StoreOptions.from_kwargs(open_options).as_kwargs()


def _release(shard: Shard, readonly: bool) -> None:
    """Close a shard without committing anything (a lone shard commit would not be a global one)."""
    if not readonly:
        shard.store.rollback()
    shard.close()


def _remove_replaced(c: Collective, path: str, manifest: Manifest, old_shards: list[str]) -> None:
    """After a create's manifest: remove the replaced store's shards and leftovers (best effort)."""
    if c.rank == 0:
        _, error = attempt(lambda: remove_entries(stale_entries(path, manifest)))
        if error is not None:
            log.warning("%s: could not remove old shards (%s); the next create removes them", path, error)
    c.barrier()
    if c.rank != 0:  # another node's copy of the directory
        remove_entries([p for p in (os.path.join(path, n) for n in old_shards) if os.path.isdir(p)])


def _agree_or_remove(c: Collective, error, shard_path: str) -> None:
    """Agree on a create step; if it failed anywhere, remove this rank's new shard, then raise."""
    codes = c.all_gather_ints([error_code(error)])[:, 0]
    if codes.any():
        remove_entries([shard_path] if os.path.isdir(shard_path) else [])
        c.raise_if_failed(codes, error)


def _plan_create(path: str, overwrite: bool) -> dict:
    """Rank 0: check what is at ``path``, clear leftovers of killed creates; the new store's token."""
    old_shards: list[str] = []
    if os.path.exists(path) and not os.path.isdir(path):
        raise StoreExistsError(f"{path} exists and is not a directory")
    if is_sharded(path):
        try:
            old = read_manifest(path)
        except EmbeddingStoreError:
            if not overwrite:
                raise
            old = None
        if not overwrite:
            raise StoreExistsError(f"a sharded store already exists at {path}; pass overwrite=True to replace it")
        if old is not None:
            old_shards = list(old.shards)
            for name in old_shards:
                holder = holder_pid(os.path.join(path, name))
                if holder is not None:
                    raise WriterLockedError(f"{os.path.join(path, name)} is open for writing by pid {holder}; "
                                            "close the old store before replacing it")
    elif os.path.isfile(os.path.join(path, "data.mdb")):
        raise StoreExistsError(f"{path} holds a plain EmbeddingStore; refusing to replace it with a sharded one "
                               "(choose another path, or remove it first)")
    elif os.path.isdir(path) and not only_stale_entries(path):
        raise StoreExistsError(f"{path} is a non-empty directory that is not a store; refusing to write there "
                               "(choose another path or empty it)")
    os.makedirs(path, exist_ok=True)
    remove_entries(stale_entries(path, read_manifest(path) if old_shards else None))
    return {"token": new_token(), "old": old_shards}


def _build_shard(root: str, shard_path: str, table: TableSpec, manifest: Manifest, rank: int, options: dict) -> None:
    """Write this rank's shard: its owned IDs in global order, their initial rows and global positions."""
    os.makedirs(root, exist_ok=True)  # on another node, the directory may not exist yet
    owned = np.flatnonzero(owner_of(table.ids, manifest.world_size, manifest.buckets) == rank)
    store = EmbeddingStore.create(shard_path, np.empty(0, np.int64), table.dim, dtype=table.dtype,
                                  chunk_rows=table.chunk_rows, init="zeros", seed=table.seed,
                                  **{**options, "commit_every": None})
    try:
        store.ensure_column(ROW_COLUMN, 1, "float64")
        block = _BUILD_BLOCK_CHUNKS * table.chunk_rows
        for start in range(0, len(table.ids), block):
            lo, hi = np.searchsorted(owned, [start, start + block])
            positions = owned[lo:hi]
            if len(positions) == 0:
                continue
            if table.values is not None:
                values = table.values[positions]
            else:
                values = initial_rows(table.init, table.seed, table.chunk_rows, table.dim, table.dtype, positions)
            store.add(table.ids[positions], values)
            store.put_column(ROW_COLUMN, table.ids[positions], positions.astype(np.float64).reshape(-1, 1))
            store.commit()
        store.set_attr(COMMIT_ATTR, 0)
        store.commit()
    finally:
        store.close()


def _read_manifest_on_rank0(c: Collective, path: str) -> Manifest:
    manifest, error = attempt(read_manifest, path) if c.rank == 0 else (None, None)
    c.agree(error)
    return c.broadcast_object(manifest, 0)


def _recover(c: Collective, path: str, manifest: Manifest, shard: Shard, readonly: bool) -> Manifest:
    """Bring every shard to the manifest's commit: undo prepared commits that were never decided.

    A shard may be one commit ahead (it prepared E+1, the decision rank never wrote the
    manifest of E+1); anything else is damage. A read-only open cannot undo: it waits
    for a commit in progress (another job's) to be decided.
    """
    deadline = time.monotonic() + _READONLY_WAIT_S
    while True:
        held = c.all_gather_ints([shard.global_commit])[:, 0]
        behind_or_far = np.flatnonzero((held < manifest.commit) | (held > manifest.commit + 1))
        if len(behind_or_far):
            r = int(behind_or_far[0])
            raise CorruptionError(f"{path}: the shard of rank {r} holds global commit {int(held[r])}, but the "
                                  f"manifest is at commit {manifest.commit}; restore the store from a dump")
        if (held == manifest.commit).all():
            return manifest
        if not readonly:
            _, error = attempt(shard.revert_to, manifest.commit)
            c.agree(error)
            log.warning("%s: shard(s) of rank(s) %s had prepared commit %d, which was never decided; returned to "
                        "commit %d", path, np.flatnonzero(held != manifest.commit).tolist(), manifest.commit + 1,
                        manifest.commit)
            return manifest
        if time.monotonic() > deadline:
            raise EmbeddingStoreError(f"{path}: a commit is in progress or was interrupted (shards ahead of the "
                                      f"manifest's commit {manifest.commit}); open the store writable once to "
                                      "recover it, or retry")
        time.sleep(0.2)
        manifest = _read_manifest_on_rank0(c, path)
