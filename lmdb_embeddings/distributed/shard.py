"""One rank's shard and its half of the two-phase commit: ``prepare(E+1)`` and ``revert_to(E)``.

A shard is a complete :class:`~lmdb_embeddings.EmbeddingStore`, opened with the undo log
(``undo_log=True``): each of its commits keeps, in the same LMDB transaction, the values it
overwrote. So

* ``prepare(E+1)`` = record the global commit ``E+1`` in the shard's attrs and commit the
  shard (one durable, synced LMDB transaction that is still revertible);
* ``revert_to(E)`` = undo that one commit from its undo log (``revert_last_commit``),
  returning the shard to the contents it had at global commit ``E``.

The coordinator (``ShardedEmbeddingStore.commit`` and the recovery in ``open``) only ever
calls these two, so the way a shard keeps its pre-images can change without touching it.
No torch here: offline recovery and the CLI use it too.
"""

from __future__ import annotations

import logging

from ..errors import CorruptionError
from ..store import EmbeddingStore, revert_last_commit
from .manifest import COMMIT_ATTR

log = logging.getLogger(__name__)


def global_commit_of(store: EmbeddingStore) -> int:
    """The global commit a shard holds (its ``dist.commit`` attr)."""
    return int(store.attrs.get(COMMIT_ATTR, 0))


class Shard:
    """A rank's shard store plus the two operations the cross-shard commit needs from it."""

    def __init__(self, path: str, *, readonly: bool, options: dict):
        self.path = path
        self.readonly = readonly
        # the sharded store counts commit_every itself: a shard must never commit on its own
        self._options = {**options, "commit_every": None, "undo_log": not readonly}
        self.store = EmbeddingStore.open(path, readonly=readonly, **self._options)

    @property
    def global_commit(self) -> int:
        return global_commit_of(self.store)

    def prepare(self, commit: int) -> None:
        """Phase 1: make the shard's changes durable as global commit ``commit``, revertible."""
        self.store.set_attr(COMMIT_ATTR, int(commit))
        self.store.commit()

    def revert_to(self, commit: int) -> None:
        """Return the shard to global commit ``commit`` (it is there already, or prepared one past it).

        Uncommitted changes of the handle are discarded; the handle is reopened afterwards.
        """
        self.store.rollback()
        held = self.global_commit
        if held == commit:
            return
        if held != commit + 1:
            raise CorruptionError(f"{self.path}: the shard holds global commit {held}; it cannot be returned to "
                                  f"commit {commit} (only a prepared commit {commit + 1} can be undone)")
        self.store.close()
        try:
            revert_last_commit(self.path)
        finally:
            self.store = EmbeddingStore.open(self.path, readonly=False, **self._options)
        if self.global_commit != commit:
            raise CorruptionError(f"{self.path}: after undoing its last commit the shard holds global commit "
                                  f"{self.global_commit}, not {commit}")
        log.info("%s: prepared commit %d undone, back at global commit %d", self.path, commit + 1, commit)

    def close(self) -> None:
        self.store.close()


def recover_shard(path: str, commit: int) -> bool:
    """Offline: bring the shard at ``path`` to global commit ``commit``; True if it had to be reverted."""
    with EmbeddingStore.open(path, readonly=True) as reader:
        held = global_commit_of(reader)
    if held == commit:
        return False
    shard = Shard(path, readonly=False, options={})
    try:
        shard.revert_to(commit)
    finally:
        shard.close()
    return True
