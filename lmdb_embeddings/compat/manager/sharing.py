"""One writable store per store directory and process, shared by every manager opened on it.

Upstream managers kept their rows in files that any number of managers could open at once,
and CoSiR's scripts do: a second manager reads back what the first wrote, or keeps writing
beside it. A store has one writable handle per process, so the managers of one process on
one ``embeddings_dir`` share it (:class:`SharedStore`), reference-counted:

* every manager sees the same rows, uncommitted ones included: disk mode reads the shared
  store; memory mode's ``nn.Parameter`` is shared by managers with the same rows in the same
  order on the same device, and every write through one manager is copied into the other
  managers' Parameters (``ManagedTable.mirror``);
* a sync through any manager is one commit of everything pending (every manager's updates
  and Parameter writes);
* the store closes when the last manager on it closes; a close that fails (a full disk)
  changes nothing, so it can be retried and the other managers keep working;
* another process still gets ``WriterLockedError`` naming this one's pid;
* a store whose files were deleted under it (a script's temporary directory removed while its
  managers live) is not the directory's store any more: a new manager there starts anew, a sync
  through its old managers raises :class:`StoreDeletedError`, and their close (or the end of the
  run) drops what was pending, as upstream's managers lost nothing: they had written every update.

Locking: the module's registry lock guards which managers share which store. A manager's
``weakref.finalize`` callback never waits for it: if the lock is taken (possibly by the very
thread the garbage collector interrupted), the release is queued and done by the holder when
it lets go (:func:`_unlock`), or at interpreter exit.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import threading

import numpy as np

from ...errors import InvalidInputError, StoreDeletedError
from ...processes.environment import data_file_identity
from ...store import EmbeddingStore
from .table_dir import check_dim, open_table, store_path_in

log = logging.getLogger(__name__)

_lock = threading.Lock()
_shares: dict[str, SharedStore] = {}
_deferred: collections.deque = collections.deque()  # tables of unreachable managers waiting for the lock


class SharedStore:
    """The writable store of one directory in this process, and the tables of the managers open on it."""

    def __init__(self, key: str, store: EmbeddingStore, cache_options: dict):
        self.key = key
        self.store = store
        self.identity = data_file_identity(store.path)  # the open data file's inode: it cannot be reused while open
        self.cache_options = cache_options
        self.pid = os.getpid()
        self.tables: list = []        # the ManagedTables of the open managers
        self.orphans: list = []       # tables of unreachable managers whose Parameter writes await the next sync
        self.commit_at_close = False  # an unreachable auto_sync manager left updates for the last close to commit
        self.dirty: set[int] = set()  # store chunks changed since the last commit
        self.pending_rows = 0
        self.updates = 0              # updates through any manager since the last commit
        self.sync_operations = 0

    # ------------------------------------------------------------------ writes
    def wrote(self, writer, ids: np.ndarray, rows: np.ndarray, slots: np.ndarray) -> None:
        """Rows ``writer`` put into the store: count them, and copy them into the other managers' Parameters."""
        self.dirty.update(np.unique(slots // self.store.chunk_rows).tolist())
        self.pending_rows += len(ids)
        for table in self.param_owners(with_orphans=True):
            if table.param is not writer.param:
                table.mirror(ids, rows)

    def param_owners(self, with_orphans: bool = False) -> list:
        """One table per distinct memory-mode Parameter."""
        seen, owners = set(), []
        for table in self.tables + (self.orphans if with_orphans else []):
            if table.param is not None and id(table.param) not in seen:
                seen.add(id(table.param))
                owners.append(table)
        return owners

    def matching_param(self, view_ids: np.ndarray, device):
        """The Parameter of an open memory-mode manager with these rows in this order on ``device``, or None."""
        for table in self.param_owners():
            if table.device == device and np.array_equal(table.view_ids, view_ids):
                return table.param
        return None

    def deleted(self) -> bool:
        """The store's files were deleted or replaced under the open handle: nothing can be committed to them."""
        return data_file_identity(self.store.path) != self.identity

    def commit(self, full: bool) -> None:
        """One commit of everything pending (``full``: every manager's Parameter writes first)."""
        if self.deleted():
            raise StoreDeletedError(
                f"{self.store.path} was deleted while this TrainableEmbeddingManager had it open, so nothing can be "
                f"committed to it; its {self.updates} uncommitted update(s) are kept in memory only. A new manager "
                "on the directory starts a new table")
        written = sum(table.reconcile_rows() for table in self.param_owners(with_orphans=True)) if full else 0
        changed = self.updates > 0 or written > 0
        self.store.commit()
        if changed:
            self.sync_operations += 1
        self.synced()
        if full:
            self.orphans.clear()
        self.commit_at_close = bool(self.orphans)  # what is left for the last close: orphans' Parameter writes

    def rollback(self) -> None:
        """Back to the last commit for every manager (their Parameters are reloaded in place)."""
        self.store.rollback()
        self.synced()
        self.orphans.clear()
        self.commit_at_close = False
        for table in self.param_owners():
            table.reload()

    def synced(self) -> None:
        self.updates = 0
        self.pending_rows = 0
        self.dirty.clear()
        for table in self.tables:
            table.updates_since_sync = 0

    # --------------------------------------------------------------- closing
    def release(self, table, discard: bool) -> None:
        """``close()`` of ``table``'s manager (registry lock held). Raises, changing nothing, if the commit fails."""
        others = [t for t in self.tables if t is not table]
        path = self.store.path
        if self.deleted():
            if not others:
                self.drop_deleted()
        elif table.auto_sync and not discard:
            self.commit(full=True)
        elif others:
            if table.updates_since_sync:
                log.warning("%d uncommitted updates of a closed TrainableEmbeddingManager stay pending in %s, which "
                            "%d other manager(s) still use: their next sync commits them", table.updates_since_sync,
                            path, len(others))
        elif self.commit_at_close and not discard:
            self.commit(full=True)
        else:
            if self.updates or self.dirty:
                log.warning("discarding %d uncommitted updates of %s (%s; call force_sync_all_chunks() to keep them)",
                            self.updates, path, "the with block raised" if discard else "auto_sync is off")
            self.store.rollback()  # the store closes below: the Parameter is left as it is
            self.synced()
        if not others:
            self.store.close()
            _forget(self)
        self.tables.remove(table)
        table.closed = True

    def release_unreachable(self, table) -> None:
        """The finalizer's release of a garbage-collected manager (registry lock held): logs what it did."""
        if table.closed or table not in self.tables:
            return
        self.tables.remove(table)
        table.closed = True
        if self.tables:  # the others go on: no store call here, the next sync or the last close does the rest
            if table.auto_sync:
                if table.param is not None and not any(t.param is table.param for t in self.tables):
                    self.orphans.append(table)  # its Parameter writes: reconciled at the next sync
                self.commit_at_close = self.commit_at_close or table.updates_since_sync > 0 or table in self.orphans
            log.debug("a TrainableEmbeddingManager on %s was garbage-collected; %d other(s) still use the store",
                      self.store.path, len(self.tables))
            return
        _forget(self)
        self.tables.append(table)  # for the commit's reconcile
        try:
            self._close_unreachable(table)
        finally:
            self.tables.clear()
            self.orphans.clear()

    def _close_unreachable(self, table) -> None:
        path, pending = self.store.path, self.updates
        try:
            if self.deleted():
                self.drop_deleted()
            elif table.auto_sync or self.commit_at_close:
                self._commit_unreachable(path, pending)
            else:
                if pending:
                    log.warning("discarding %d uncommitted updates of %s (auto_sync is off; call "
                                "force_sync_all_chunks() to keep them)", pending, path)
                self.store.rollback()
        except Exception:
            log.exception("%s: the pending updates of a TrainableEmbeddingManager that was not closed could be neither "
                          "committed nor rolled back; what was not committed is lost", path)
        try:
            self.store.close()
        except Exception:
            log.exception("%s: the store of a TrainableEmbeddingManager that was not closed could not be closed", path)

    def drop_deleted(self) -> None:
        """The last manager of a deleted store ends: what was pending went with the files (upstream had written it)."""
        if self.updates or self.dirty:
            log.info("%s was deleted while a TrainableEmbeddingManager had it open: its %d uncommitted update(s) "
                     "went with it", self.store.path, self.updates)
        self.store.rollback()
        self.synced()
        self.orphans.clear()
        self.commit_at_close = False

    def _commit_unreachable(self, path: str, pending: int) -> None:
        written = 0
        for owner in self.param_owners(with_orphans=True):
            try:
                written += owner.reconcile_rows()
            except InvalidInputError:
                log.warning("%s: manager.embeddings of a TrainableEmbeddingManager that was not closed holds NaN or "
                            "inf values, so none of the rows written straight into it were saved", path)
        commit = self.store.commit_count
        try:
            self.store.commit()
        except Exception as exc:
            log.error("%s: could not commit the %d pending updates of a TrainableEmbeddingManager that was not "
                      "closed (%s); they are lost, the store keeps commit %d", path, pending, exc, commit)
            self.store.rollback()
            return
        if pending or written:
            extra = f" and {written} rows written into manager.embeddings" if written else ""
            log.info("committed %d pending updates%s of a TrainableEmbeddingManager that was not closed (%s)",
                     pending, extra, path)


# ------------------------------------------------------------------- registry
def _key(directory) -> str:
    return os.path.realpath(store_path_in(directory))


def _current(key: str) -> SharedStore | None:
    """The shared store of ``key`` in this process, unless its files were deleted since (then: forgotten)."""
    share = _shares.get(key)
    if share is None or share.pid != os.getpid():
        return None
    if share.deleted():
        log.info("%s was deleted while %d TrainableEmbeddingManager(s) had it open: a new manager there starts "
                 "anew (the old ones keep the deleted store until they close)", share.store.path, len(share.tables))
        _forget(share)
        return None
    return share


def _forget(share: SharedStore) -> None:
    """Take ``share`` out of the registry (not a newer store registered for the same directory since)."""
    if _shares.get(share.key) is share:
        del _shares[share.key]


def _unlock() -> None:
    """Release the registry lock, first doing the releases finalizers queued while it was held."""
    while True:
        try:
            while _deferred:
                table = _deferred.popleft()
                table.share.release_unreachable(table)
        finally:
            _lock.release()
        if not _deferred or not _lock.acquire(blocking=False):
            return  # (a finalizer that queued after the loop finds the lock free, or its holder drains it)


def open_managed(directory, found: str | None, args, seed: int, build):
    """The table ``build(share)`` makes on the shared store of ``directory``, opened (or created) if needed."""
    _lock.acquire()
    try:
        key = _key(directory)
        share = _current(key)
        fresh = share is None
        if fresh:
            store, options = open_table(directory, found, args, seed)
            share = SharedStore(key, store, options)
        else:
            _join(share, args)
        try:
            table = build(share)
        except BaseException:
            if fresh:
                share.store.rollback()
                share.store.close()
            raise
        share.tables.append(table)
        _shares[key] = share
        if not fresh:
            log.info("%s is already open in this process: this manager shares its store with %d other(s)",
                     share.store.path, len(share.tables) - 1)
        return table
    finally:
        _unlock()


def _join(share: SharedStore, args) -> None:
    """A manager opened on a directory whose store is already open here: add the sample IDs it lacks."""
    store = share.store
    check_dim(store.path, store.dim, args.embedding_dim)
    missing = args.ids[~store.contains(args.ids)]
    if len(missing):
        store.add(missing)
        share.updates += 1
        share.pending_rows += len(missing)
        log.info("adding %d sample ids that %s did not hold yet (committed at the next sync)", len(missing),
                 store.path)


def release(table, discard: bool = False) -> None:
    """``close()``: commit (auto_sync) or leave/discard the table's updates; the last manager closes the store."""
    _lock.acquire()
    try:
        if not table.closed:
            table.share.release(table, discard)
    finally:
        _unlock()


def release_unreachable(table) -> None:
    """The manager's ``weakref.finalize`` callback: never waits for the registry lock (see the module docstring)."""
    if table.closed:
        return
    if not _lock.acquire(blocking=False):
        _deferred.append(table)
        return
    try:
        table.share.release_unreachable(table)
    finally:
        _unlock()


def move(table, target: str) -> None:
    """``save_final_embeddings(dir)``: ``table`` continues on the store at ``target`` (nothing is pending)."""
    _lock.acquire()
    try:
        old = table.share
        key = _key(target)
        new = SharedStore(key, EmbeddingStore.open(target, **old.cache_options), old.cache_options)
        if old.tables == [table]:
            try:
                old.store.close()
            except BaseException:
                new.store.close()
                raise
            _forget(old)
        elif table.param is not None and any(t.param is table.param for t in old.tables if t is not table):
            table.own_param()  # the managers staying on the old store keep the shared Parameter
        old.tables.remove(table)
        table.share = new
        new.tables.append(table)
        _shares[key] = new
    finally:
        _unlock()


def _drain_at_exit() -> None:
    """Releases still queued at interpreter exit (after the finalizers ran)."""
    if _deferred and _lock.acquire(blocking=False):
        _unlock()


def _after_fork_in_child() -> None:
    """A forked child owns none of its parent's stores: forget them (the lock may have been held at the fork)."""
    global _lock
    _lock = threading.Lock()
    _shares.clear()
    _deferred.clear()


atexit.register(_drain_at_exit)
os.register_at_fork(after_in_child=_after_fork_in_child)
