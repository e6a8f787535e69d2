"""ShardedEmbeddingStore: one embedding table sharded over a torch.distributed process group.

Rank r keeps the rows it owns (``owner_of``) in its shard, a complete ``EmbeddingStore`` in
its own sub-directory of ``path`` (manifest.py). Every public method is a collective call:
all ranks call the same methods in the same order, each with its own IDs. Every call starts
with the same skeleton (calls.py): local checks, then ONE all-gather that agrees on them (any
failure raises the same exception class on every rank, collective.py), folded, for a call that
moves rows, into the all-gather of counts before the one ``all_to_all_single`` to the owners
(exchange.py); the owners' checks are agreed the same way before any shard changes.

The handle is assembled from parts: the skeleton and the handle's state (calls.py), reading
rows (reads.py), writing them, ``commit`` (the two-phase commit of twophase.py) and
``rollback`` (writes.py); creating, opening, the properties and closing are here. ``open``
first brings every shard to the manifest's commit. It implements ``handle.ShardedTableHandle``.
"""

from __future__ import annotations

import logging
import os
from typing import ClassVar

import numpy as np

from ..errors import InvalidTypeError
from ..handle import implements_table_handle
from ..options import StoreOptions
from ..sharding.manifest import RESERVED_PREFIX, Manifest
from ..store import EmbeddingStore
from . import failures, opening
from .collective import Collective
from .reads import ShardedReads
from .writes import ShardedWrites

log = logging.getLogger(__name__)


@implements_table_handle
class ShardedEmbeddingStore(ShardedReads, ShardedWrites):
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

    sharded: ClassVar[bool] = True  # handle.TableHandle: every call is collective

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
                options: StoreOptions) -> ShardedEmbeddingStore:
        """Open this rank's shard and bring all shards to the manifest's commit."""
        shard, manifest = opening.attach_shard(c, path, manifest, readonly, options)
        store = cls.__new__(cls)
        store._setup(path, manifest, c, shard, readonly, options)
        return store

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
        try:
            self._collective.agreed(self._shard.close)  # a shard that cannot close: every rank raises
        finally:
            self._closed = True  # on every rank alike, so that no rank calls close() again alone

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
