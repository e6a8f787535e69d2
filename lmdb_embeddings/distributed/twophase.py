"""The commit that is atomic across shards: prepare on every shard, decide with the manifest, recover on open.

Invariant: the manifest's commit E IS the store's commit; a shard holds E, or (between the
phases, or after a crash there) a *prepared* E+1 that its undo log can take back to E.

:meth:`TwoPhaseCommit.commit`, on every rank:

1. **prepare**: each shard records ``dist.commit = E+1`` and commits with its undo log (one
   synced, revertible LMDB transaction); the ranks all-gather the outcome. Any failure: the
   shards that prepared undo it, every rank drops its changes and raises ``CommitError``.
2. **decide**: the decision rank (0) writes the manifest of E+1 (temporary file, fsync,
   rename, fsync of the directory); the rename is the decision. The ranks all-gather the
   outcome, so no rank returns before the decision is on disk. A failure before the rename
   undoes every prepared shard (``CommitError`` everywhere); a failed directory sync after
   it keeps the commit and says on every rank that its durability is in doubt.

:func:`recover` (every collective ``open``): a shard one commit ahead of the manifest prepared a
commit that was never decided, so a writable open undoes it; anything else is damage. A
read-only store cannot undo: its open and every ``get`` go through :func:`read_decided`, which
accepts a read only if every shard served the same global commit and the manifest has decided it.
docs/ARCHITECTURE.md ("Scale-out") has the crash analysis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

import numpy as np

from ..errors import CorruptionError, EmbeddingStoreError, ManifestSyncError, ProcessGroupError
from ..sharding.manifest import COMMIT_ATTR, Manifest, read_manifest, write_manifest
from .collective import Collective, attempt, error_code
from .failures import commit_failed
from .shard import Shard

log = logging.getLogger(__name__)

READ_RETRIES = 60  # a read-only open or get re-reads while a writer job commits: ~10 s in all, then gives up


class TwoPhaseCommit:
    """The coordinator of one sharded store's commits, on one rank (see the module docstring)."""

    def __init__(self, collective: Collective, path: str, shard: Shard, manifest: Manifest):
        self.collective, self.path, self.shard, self.manifest = collective, path, shard, manifest
        self.broken: str | None = None  # why this rank's shard may no longer be used

    @property
    def commit_count(self) -> int:
        return self.manifest.commit

    def commit(self, rows: int) -> None:
        """Move every shard from commit E to E+1, whose table has ``rows`` global rows.

        Raises (on every rank): CommitError; then ``commit_count`` tells whether the commit
        was made (only when the manifest's directory sync failed after its rename) or not
        (every shard is back at E and the changes since were dropped).
        """
        c, committed = self.collective, self.manifest.commit
        target = committed + 1
        _, error = attempt(self.shard.prepare, target)
        with self.failing_as_commit(target, made=False if c.rank == 0 else None):
            codes = c.all_gather_ints([error_code(error)])[:, 0]
        if codes.any():
            self._abandon(prepared=error is None)
            with self.failing_as_commit(target, made=False):  # (its message is broadcast)
                c.raise_if_failed(codes, error, f"commit {target} failed, every shard is back at commit "
                                                f"{committed} and the changes since were discarded: ")
        manifest = dataclasses.replace(self.manifest, commit=target, rows=int(rows), shards=list(self.manifest.shards))
        _, error = attempt(write_manifest, self.path, manifest) if c.rank == 0 else (None, None)
        made = error is None or isinstance(error, ManifestSyncError)  # the rename is the decision
        with self.failing_as_commit(target, made=made if c.rank == 0 else None, manifest=manifest):
            gathered = c.all_gather_ints([error_code(error), made])
        made = bool(gathered[0, 1])  # now every rank knows
        if not made:
            self._abandon(prepared=True)
        else:
            self.manifest = manifest
        with self.failing_as_commit(target, made=made, manifest=manifest):
            c.raise_if_failed(gathered[:, 0], error, "" if made else f"commit {target} failed, every shard is back "
                                                                      f"at commit {committed} and the changes since "
                                                                      "were discarded: ")

    @contextlib.contextmanager
    def failing_as_commit(self, target: int, made: bool | None, manifest: Manifest | None = None):
        """A failure of the process group in a commit step: say which commit the store is at.

        ``made``: whether this rank knows the commit was decided (rank 0, whose manifest ``manifest``
        was renamed into place), knows it was not, or cannot know (None).
        """
        try:
            yield
        except ProcessGroupError as exc:
            if made and manifest is not None:
                self.manifest = manifest  # decided: the store is at the new commit
            failure = self.collective.failure or str(exc)
            raise commit_failed(failure, self.path, target, self.collective.rank, made) from exc

    def _abandon(self, prepared: bool) -> None:
        """After a failed commit: undo this shard's prepared commit (or drop its pending changes)."""
        if not prepared:
            attempt(self.shard.rollback)
            return
        _, error = attempt(self.shard.revert_to, self.manifest.commit)
        if error is not None:  # this shard is ahead of the others: no further call may use it
            self.broken = (f"rank {self.collective.rank} could not undo its prepared commit "
                           f"{self.manifest.commit + 1} ({error}); close the store and open it again (the open "
                           "recovers it)")
            log.error("%s: %s", self.path, self.broken)


def read_manifest_on_rank0(c: Collective, path: str) -> Manifest:
    """The manifest, read by rank 0 (on a multi-node job only its node may hold it) and broadcast."""
    manifest, error = attempt(read_manifest, path) if c.rank == 0 else (None, None)
    c.agree(error)
    return c.broadcast_object(manifest, 0)


def recover(c: Collective, path: str, manifest: Manifest, shard: Shard, readonly: bool) -> Manifest:
    """Bring every shard to the manifest's commit: undo prepared commits that were never decided.

    A shard may be one commit ahead (it prepared E+1, the decision rank never wrote the
    manifest of E+1); anything else is damage. Read-only: nothing is undone; the returned
    manifest is that of the decided commit every shard holds (waiting for one, see
    :func:`read_decided`), since a writer job may have moved on since ``manifest`` was read.
    """
    if readonly:
        _, commit, rows = read_decided(c, path, lambda: shard.store.get_with_state([]))
        return dataclasses.replace(manifest, commit=commit, rows=rows, shards=list(manifest.shards))
    held = c.all_gather_ints([shard.global_commit])[:, 0]
    behind_or_far = np.flatnonzero((held < manifest.commit) | (held > manifest.commit + 1))
    if len(behind_or_far):
        r = int(behind_or_far[0])
        raise CorruptionError(f"{path}: the shard of rank {r} holds global commit {int(held[r])}, but the "
                              f"manifest is at commit {manifest.commit}; restore the store from a dump")
    if (held != manifest.commit).any():
        _, error = attempt(shard.revert_to, manifest.commit)
        c.agree(error)
        log.warning("%s: shard(s) of rank(s) %s had prepared commit %d, which was never decided; returned to "
                    "commit %d", path, np.flatnonzero(held != manifest.commit).tolist(), manifest.commit + 1,
                    manifest.commit)
    return manifest


def read_decided(c: Collective, path: str, read) -> tuple:
    """``read()`` -> ``(result, state)`` on every rank's shard, until all served one decided global commit.

    ``state`` is what ``EmbeddingStore.get_with_state`` returns: one LMDB read transaction
    names the global commit the shard held (its ``dist.commit`` attr) and its rows. Rank 0
    reads the manifest after its own read; the ranks all-gather ``[status, commit, rows,
    manifest commit]``. The read stands if every shard served the same commit and the
    manifest is at least there (so it was decided: a prepared commit may still be undone);
    else every rank reads again (a writer job is between its phases). Only gathered values
    decide, so the ranks never part. Returns ``(result, commit, global rows)``.

    Raises (on every rank): the failing rank's error class; EmbeddingStoreError if no read
    stood within ``READ_RETRIES`` tries (a commit interrupted by a crash: open writable once).
    """
    for attempt_no in range(READ_RETRIES):
        served, error = attempt(read)
        decided, manifest_error = attempt(read_manifest, path) if c.rank == 0 else (None, None)
        error = error or manifest_error
        result, state = served if served is not None else (None, {"attrs": {}, "rows": 0})
        held = int(state["attrs"].get(COMMIT_ATTR, 0))
        gathered = c.all_gather_ints([error_code(error), held, state["rows"],
                                      decided.commit if decided is not None else -1])
        c.raise_if_failed(gathered[:, 0], error)
        commits = gathered[:, 1]
        if (commits == commits[0]).all() and commits[0] <= gathered[0, 3]:
            return result, int(commits[0]), int(gathered[:, 2].sum())
        time.sleep(min(0.2, 0.005 * 2 ** attempt_no))
    raise EmbeddingStoreError(f"{path}: the shards hold global commits {commits.tolist()}, the manifest "
                              f"{int(gathered[0, 3])}: a commit is in progress or was interrupted; retry, or open "
                              "the store writable once to recover it")
