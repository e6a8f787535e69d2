"""One rank's shard and its half of the two-phase commit: ``prepare(E+1)`` and ``revert_to(E)``.

A shard is a complete :class:`~lmdb_embeddings.EmbeddingStore`, opened with the undo log
(``undo_log=True``): each of its commits keeps, in the same LMDB transaction, the values it
overwrote (``core.undo``). So

* ``prepare(E+1)`` = record the global commit ``E+1`` in the shard's attrs and commit the
  shard (one durable, synced LMDB transaction that is still revertible);
* ``revert_to(E)`` = undo that one commit from its undo log (``revert_last_commit``),
  returning the shard to the contents it had at global commit ``E``.

The coordinator (``twophase``) only ever calls these two, so the way a shard keeps its
pre-images can change without touching it. The handle users get as ``store.local`` is a
:class:`ShardStore`: it reads like any store, but refuses writes (they would bypass the
protocol); the sharded store writes inside :meth:`Shard.writing`. No torch here:
:func:`recover_sharded` brings a whole directory to its manifest's commit in one process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import numpy as np

from ..core.undo import revert_last_commit
from ..errors import CorruptionError, ReadOnlyError
from ..options import StoreOptions
from ..sharding.manifest import COMMIT_ATTR, Manifest, read_manifest
from ..store import EmbeddingStore

log = logging.getLogger(__name__)


def global_commit_of(store: EmbeddingStore) -> int:
    """The global commit a shard holds (its ``dist.commit`` attr)."""
    return int(store.attrs.get(COMMIT_ATTR, 0))


class ShardStore(EmbeddingStore):
    """A rank's shard as ``ShardedEmbeddingStore.local``: an ``EmbeddingStore`` whose writes are refused.

    A put, add, commit or close made on the shard alone would not be a global commit (the
    other shards would not follow), so only the sharded store writes, inside
    :meth:`Shard.writing`. It pickles into a plain read-only ``EmbeddingStore`` (DataLoader
    workers of rank r read r's committed rows).
    """

    # The gate: open only inside Shard.writing(), which holds the handle's mutex for the whole block, and
    # read only under that mutex (every write and close checks it there), so no other thread's call sees it open.
    _unlocked = False
    _owner_pid: int | None = None

    def _writer(self, call: str):  # called with the mutex held, as every write does
        if not self._unlocked:
            raise ReadOnlyError(f"{call}: {self.path} is a shard of a ShardedEmbeddingStore; write through the "
                                "sharded store (its collective put/add/commit), not through store.local")
        return super()._writer(call)

    def close(self) -> None:
        with self._mutex:
            if not self._unlocked and self._owner_pid == os.getpid():
                raise ReadOnlyError(f"close: {self.path} is a shard of a ShardedEmbeddingStore; close the sharded "
                                    "store (a collective call), not store.local")
            super().close()

    def __reduce__(self):
        return _plain_store, (self.__getstate__(),)

    def id_blocks(self, block: int = 1 << 20) -> Iterator[np.ndarray]:
        """The IDs in row order, ``block`` at a time (copies: no lock is held between blocks)."""
        for start in range(0, len(self), block):
            with self._mutex:
                yield self._caught_up().index.slice(start, start + block).copy()


def _plain_store(state: dict) -> EmbeddingStore:
    """Unpickle a shard as a plain (read-only) EmbeddingStore."""
    store = EmbeddingStore.__new__(EmbeddingStore)
    store.__setstate__(state)
    return store


class Shard:
    """A rank's shard store plus the two operations the cross-shard commit needs from it."""

    def __init__(self, path: str, *, readonly: bool, options: StoreOptions):
        self.path = path
        self.readonly = readonly
        # the sharded store counts commit_every itself: a shard must never commit on its own
        self._options = replace(options, commit_every=None, undo_log=not readonly)
        self.store = self._open()

    def _open(self) -> ShardStore:
        store = ShardStore.open_with_options(self.path, self._options, readonly=self.readonly)
        store._owner_pid = os.getpid()
        return store

    @contextmanager
    def writing(self) -> Iterator[ShardStore]:
        """The shard handle with writes allowed, for the sharded store's own calls: the block holds the handle's
        mutex, so another thread's call through ``store.local`` waits for it to end, then finds the gate shut."""
        store = self.store
        with store._mutex:
            store._unlocked = True
            try:
                yield store
            finally:
                store._unlocked = False

    def mismatch(self, manifest: Manifest, root: str, rank: int) -> str | None:
        """Why this shard does not belong under rank ``rank`` of ``manifest`` (None if it does): every ID checked."""
        store = self.store
        return manifest.shard_problem(root, rank, store.dim, store.dtype.name, store.chunk_rows, store.columns,
                                      store.attrs, store.id_blocks())

    @property
    def global_commit(self) -> int:
        return global_commit_of(self.store)

    def prepare(self, commit: int) -> None:
        """Phase 1: make the shard's changes durable as global commit ``commit``, revertible."""
        with self.writing() as store:
            store.set_attr(COMMIT_ATTR, int(commit))
            store.commit()

    def rollback(self) -> None:
        """Drop the shard's uncommitted changes."""
        if not self.readonly:
            with self.writing() as store:
                store.rollback()

    def revert_to(self, commit: int) -> None:
        """Return the shard to global commit ``commit`` (it is there already, or prepared one past it).

        Uncommitted changes of the handle are discarded; the handle is reopened afterwards.
        """
        self.rollback()
        held = self.global_commit
        if held == commit:
            return
        if held != commit + 1:
            raise CorruptionError(f"{self.path}: the shard holds global commit {held}; it cannot be returned to "
                                  f"commit {commit} (only a prepared commit {commit + 1} can be undone)")
        self.close()
        try:
            revert_last_commit(self.path)
        finally:
            self.store = self._open()
        if self.global_commit != commit:
            raise CorruptionError(f"{self.path}: after undoing its last commit the shard holds global commit "
                                  f"{self.global_commit}, not {commit}")
        log.info("%s: prepared commit %d undone, back at global commit %d", self.path, commit + 1, commit)

    def release(self) -> None:
        """Close without committing anything (a lone shard commit would not be a global one)."""
        self.rollback()
        self.close()

    def close(self) -> None:
        with self.writing() as store:
            store.close()


def recover_shard(path: str, commit: int) -> bool:
    """Offline: bring the shard at ``path`` to global commit ``commit``; True if it had to be reverted."""
    with EmbeddingStore.open(path, readonly=True) as reader:
        held = global_commit_of(reader)
    if held == commit:
        return False
    shard = Shard(path, readonly=False, options=StoreOptions())
    try:
        shard.revert_to(commit)
    finally:
        shard.close()
    return True


def recover_sharded(path: str) -> dict:
    """Bring every shard to the manifest's commit (undo undecided prepared commits), without a process group.

    What ``ShardedEmbeddingStore.open`` does collectively, for a whole directory in one
    process (no rank may have the store open). Returns the commit and the ranks reverted.
    """
    path = os.path.abspath(path)
    manifest = read_manifest(path)
    reverted = [r for r in range(manifest.world_size)
                if recover_shard(manifest.shard_path(path, r), manifest.commit)]
    return {"path": path, "commit": manifest.commit, "reverted": reverted}
