"""The writer's session: what a commit writes, and what the handle keeps when a write or commit fails.

``put``/``add`` only change the table's caches. A write transaction
(``processes/transaction.WriteTransaction``, the one object that begins, writes, commits and
aborts) is opened when a dirty chunk has to leave the cache (it is *spilled* into the
transaction) or at ``commit``, which writes every dirty chunk of every column, the new ID
chunks and the ``state`` record in ONE transaction with one synced LMDB commit.

Whether a commit happened is decided by LMDB (the transaction object reads it: the return code,
then the meta page), never by whether Python raised afterwards: after a signal inside
``commit()`` the handle knows it committed (:meth:`WriterSession.settle` applies the outcome, at
the latest at the next call). A commit that LMDB did not make raises ``CommitError`` and keeps
the previous commit on disk; the handle keeps its changes for the same ``commit()`` to retry,
unless LMDB lost a transaction holding spilled chunks: then the handle is rolled back and the
error says so (``CommitError.rolled_back``). Every byte a transaction may write is reserved on
disk first (``writemap``), so a full disk fails cleanly before anything is written.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import lmdb
import numpy as np

from ..errors import CommitError, EmbeddingStoreError, ReadOnlyError, ReservationError
from ..format.chunks import ChunkEncoder, chunk_key
from ..format.layout import ColumnSpec
from ..format.records import IDS_DB, META_DB, column_db_name, pack_record
from ..fsutil import free_bytes
from ..options import StoreOptions
from ..processes import environment
from ..processes.transaction import Outcome, WriteTransaction
from ..processes.writer_lock import WriterLock
from .cache import CacheStats
from .directory import ChunkDirectory
from .session import Session
from .table import Column
from .undo import STATE_KEY, UndoLog

log = logging.getLogger(__name__)


class WriterSession(Session):
    """The session of the one writable handle of a store (it holds the store's writer lock)."""

    readonly = False

    def __init__(self, path: str, env: environment.SharedEnv, lock: WriterLock, options: StoreOptions,
                 stats: CacheStats):
        self.lock = lock
        self._pending: WriteTransaction | None = None
        self._committing: tuple | None = None  # (version, time, bytes) of the commit in self._pending
        self._lost = False  # LMDB gave up on a transaction holding spilled chunks: roll back at the call's end
        self._since_commit = 0
        self._spills = 0  # puts into the pending transaction so far (a value read in place is valid until the next)
        self._encoder = ChunkEncoder()
        self._undo = UndoLog() if options.undo_log else None  # keeps what each commit overwrites
        super().__init__(path, env, options, stats)

    @classmethod
    def open(cls, path: str, options: StoreOptions, stats: CacheStats, lock: WriterLock | None = None) -> WriterSession:
        """Take the writer lock (unless given, held), then the environment; give both back if anything fails."""
        if lock is None:
            lock = WriterLock(path)
            lock.acquire()
        env = None
        try:
            if not os.access(path, os.W_OK):
                raise ReadOnlyError(f"{path} is not writable by this user; open it with readonly=True")
            env = environment.acquire(path, write=True, readahead=options.readahead, writemap=options.writemap)
            return cls(path, env, lock, options, stats)
        except BaseException:
            if env is not None:
                environment.release(env)
            lock.release()
            raise

    # -- reads: the handle's own state, no snapshot needed --------------------------------
    def read(self, call):
        """Run one call (it may spill); if LMDB lost spilled changes meanwhile, the handle is rolled back."""
        try:
            return call()
        finally:
            if self._lost:
                self.rollback()

    def refresh(self) -> None:
        pass

    def load(self, spec: ColumnSpec, chunks: list, directory: ChunkDirectory, column=None) -> Iterator[tuple]:
        """Chunks as this writer last wrote them: from the pending transaction if one is open (what this writer
        spilled into it is not hashed again)."""
        pending = self._pending
        if pending is not None and pending.is_open:
            own = column.pending_directory(pending) if column is not None else None
            yield from self.decode_chunks(pending.txn, spec, chunks, directory, committed=False, own=own)
            return
        with self.env.reading() as txn:
            yield from self.decode_chunks(txn, spec, chunks, directory)

    @contextmanager
    def committed_snapshot(self):
        """A short read transaction of its own: the cache asks the map only for clean chunks, which are committed."""
        with self.env.reading() as txn:
            yield txn, txn.id()

    def versions(self, spec: ColumnSpec, chunks: list) -> list[int]:
        with self.env.reading() as txn:
            return self.committed_versions(txn, spec, chunks)

    # -- the pending transaction ---------------------------------------------------------
    def _transaction(self, headroom: int) -> WriteTransaction:
        """The open pending transaction, begun now (after making ``headroom`` bytes of map room) if none is."""
        self.settle()  # a committed one is applied before a new one replaces it
        pending = self._pending
        if pending is None or pending.outcome is not Outcome.OPEN:
            if pending is None or pending.outcome is not Outcome.NEW:
                pending = self._pending = WriteTransaction(self.env, self._undo)
            pending.begin(headroom)
        return pending

    # -- put and add: all or nothing -----------------------------------------------------------
    def put_rows(self, column: Column, slots: np.ndarray, values: np.ndarray, call: str) -> None:
        """``put``/``put_column`` of checked rows, all or nothing.

        A call over more chunks than L1 holds is served in groups (``core/cache.py``). Such a call
        first reads (and checksums) every chunk it will overwrite, so a damaged chunk fails it
        before anything is written; if a later group still fails (a spill refused for disk space),
        the rows the earlier groups overwrote are put back. It costs one extra gather, only for
        calls larger than the cache.
        """
        cache = column.cache

        def scatter() -> None:
            if cache.fits_at_once(slots):
                cache.scatter(slots, values)  # one group: every chunk is made resident before any row is written
                return
            before = cache.gather(slots)
            try:
                cache.scatter(slots, values)
            except BaseException as exc:
                if self._lost:  # the handle is rolled back at the end of the call (read)
                    raise
                try:
                    cache.scatter(slots, before)
                except BaseException:
                    raise self._rolled_back(call, exc) from None
                raise

        self.read(scatter)

    def append_rows(self, new_ids: np.ndarray, values: np.ndarray) -> None:
        """``add``: the new IDs and rows, or (if writing them fails) none of them."""
        table, spilled, start = self.table, self.spilled, self.table.rows

        def append() -> None:
            try:
                table.append(new_ids, values)
            except BaseException as exc:
                if self._lost:  # the handle is rolled back at the end of the call (read)
                    raise
                if self.spilled != spilled:  # rows of this call are in the pending transaction: only a rollback
                    raise self._rolled_back("add", exc) from None
                table.forget_rows_from(start)
                raise

        self.read(append)

    def _rolled_back(self, call: str, exc: BaseException) -> CommitError:
        """The failed call cannot be undone alone (its rows reached the pending transaction): roll back."""
        commit = self.table.commit
        self.rollback()
        reason = getattr(exc, "reason", None) or " ".join((str(exc) or type(exc).__name__).split())
        return CommitError(f"{call} failed ({reason}) after changed chunks had been spilled from the cache into the "
                           f"pending transaction, so this handle was rolled back to the last commit ({commit})",
                           reason=reason, rolled_back=True)

    # -- the pending transaction (continued) --------------------------------------------------
    def spilled_rows(self, column, slots: np.ndarray) -> np.ndarray:
        """Rows of ``slots`` (chunks spilled into the pending transaction) copied out of it, in place: the
        column's pending directory (``core/directory.py``), renewed after every spill (a write may move values)."""
        pending = self._pending
        if pending is None or not pending.is_open:
            raise EmbeddingStoreError(f"{self.path}: chunks marked spilled but no pending transaction is open")
        directory = column.pending_directory(pending)
        directory.follow((pending.txn_id, self._spills), self.env.map_epoch, self.table.rows)
        return directory.rows(pending.txn, pending.db(column.db_name), slots)

    def staging(self, spec: ColumnSpec, n_rows: int) -> np.ndarray:
        """Where a merge assembles a chunk of ``spec``'s column: the encoder's payload place (no copy at the spill)."""
        return self._encoder.staging(n_rows, spec.width, spec.dtype)

    def spill(self, spec: ColumnSpec, chunk: int, rows: np.ndarray) -> None:
        """Write an evicted dirty chunk (or a chunk merged with the write buffer) into the pending transaction."""
        budget, table = self.env.budget, self.table
        table_bytes = table.row_bytes * table.rows
        pending = self._pending
        if pending is None or pending.committing or not pending.is_open:  # the disk's free space: only to begin one
            pending = self._transaction(budget.pending_headroom(table_bytes, table.rows, free_bytes(self.path)))
        value = self._encoder.encode(rows, chunk, table.commit + 1)
        self._spills += 1  # values read in place from the pending transaction must be looked up again
        try:
            pending.put(column_db_name(spec.name), chunk_key(chunk), value, ahead=budget.ahead(table_bytes))
        except ReservationError as exc:
            raise self._kept_error("spilling changes that no longer fit in the cache", exc.reason) from None
        except lmdb.Error as exc:  # LMDB gave up on the transaction: what was spilled into it is gone
            self._lost = self.spilled > 0
            reason = f"spilling changes from the cache into {self.path} failed ({exc})"
            if self._lost:
                raise CommitError(f"{reason}; changed chunks spilled earlier were lost with the transaction, so this "
                                  "handle is rolled back to the last commit", reason=str(exc), rolled_back=True) \
                    from None
            raise CommitError(f"{reason}; nothing was lost: this handle keeps its uncommitted changes",
                              reason=str(exc)) from None
        self.spilled += 1

    def note_spilled(self, column, chunk: int) -> None:
        """Its own bytes: reads and loads of the chunk from the pending transaction need not hash them."""
        pending = self._pending
        if pending is not None and pending.is_open:
            column.pending_directory(pending).note_verified(chunk, self.table.commit + 1)

    # -- commit and rollback -------------------------------------------------------------
    def has_changes(self) -> bool:
        return self.spilled > 0 or self.table.has_changes()

    def note_update(self) -> bool:
        """Count a put/add call; True when ``commit_every`` says a commit is due now."""
        self._since_commit += 1
        every = self.options.commit_every
        return every is not None and self._since_commit >= every

    def settle(self) -> None:
        """Apply what LMDB decided about a commit that Python was interrupted around (idempotent).

        Called by the commit itself and at the start of every call of the handle, so a signal
        that cut the commit's bookkeeping short never leaves the handle believing the old state.
        """
        pending = self._pending
        if pending is None:
            return
        pending.settle()
        if pending.outcome is Outcome.COMMITTED:
            version, now, written = self._committing
            self.table.mark_committed(version, now)  # idempotent: marks the written chunks clean
            self.spilled = 0
            if self._pending is pending:
                self.commits += 1
                self.bytes_committed += written
            self._pending = self._committing = None
        elif pending.outcome is Outcome.ABORTED:
            self._pending = self._committing = None

    def commit(self) -> None:
        """Make every change durable in one transaction (see the module docstring)."""
        self._since_commit = 0
        self.settle()
        if not self.has_changes():
            return
        self.read(self.table.merge_buffers)  # buffered rows into their chunks in the pending transaction first
        for attempt in (0, 1):
            try:
                self._write_commit(map_was_full=attempt == 1)
                return
            except lmdb.MapFullError:  # the transaction is gone (LMDB gives up on one that failed a put)
                if self.spilled or attempt:
                    raise self._failed_commit("the LMDB map is full") from None
            except lmdb.Error as exc:
                raise self._failed_commit(str(exc)) from None
            except ReservationError as exc:
                raise self._kept_error("commit", exc.reason) from None
            except OSError as exc:  # before LMDB's commit (the meta pages could not be saved): nothing changed
                raise self._kept_error("commit", exc.strerror or str(exc)) from None

    def _write_commit(self, map_was_full: bool) -> None:
        table, budget = self.table, self.env.budget
        version, now = table.commit + 1, time.time()
        dirty = [(column, column.cache.dirty_chunks()) for column in table.columns.values()]
        id_chunks = list(table.new_id_chunks())
        state = pack_record(table.state_record(version, now))
        pending = self._pending if self._pending is not None and self._pending.outcome is not Outcome.ABORTED \
            else WriteTransaction(self.env, self._undo)
        self._pending = pending
        writes = [(column.db_name, chunk_key(chunk), rows.nbytes) for column, chunks in dirty for chunk, rows in chunks]
        writes += [(IDS_DB, chunk_key(chunk), ids.nbytes) for chunk, ids in id_chunks]
        writes.append((META_DB, STATE_KEY, len(state)))
        # every block it may write, the state record (attrs) included: a full disk fails here, nothing written
        pending.reserve(pending.disk_needed(writes) + budget.STATE_SLACK)
        self._transaction(budget.commit_headroom(table.dirty_bytes() + len(state), table.rows,
                                                 2 if self._undo is not None else 1, map_was_full))
        written = 0
        for column, chunks in dirty:
            cursor = pending.cursor(column.db_name)  # declared columns get their (maybe empty) DB
            with cursor:
                for chunk, rows in chunks:
                    value = self._encoder.encode(rows, chunk, version)
                    pending.put(column.db_name, chunk_key(chunk), value, cursor=cursor)
                    written += len(value)
        for chunk, ids in id_chunks:
            value = self._encoder.encode(ids, chunk, version)
            pending.put(IDS_DB, chunk_key(chunk), value)
            written += len(value)
        pending.put(META_DB, STATE_KEY, state)
        if self._undo is not None:
            self._undo.mark(pending, undoes=version, restores=table.commit)
        self._committing = (version, now, written)
        try:
            pending.commit()  # LMDB decides; settle() applies its decision, whatever Python raised
        finally:
            self.settle()

    def _kept_error(self, what: str, reason: str) -> CommitError:
        """Nothing was written: the store keeps its commit, the handle its changes (retry)."""
        hint = "free space and call commit() again" if reason.startswith("the disk is full") else \
            "fix that and call commit() again"
        return CommitError(f"{what} to {self.path} failed ({reason}); nothing was written, the store keeps commit "
                           f"{self.table.commit} and this handle keeps its uncommitted changes: {hint}", reason=reason)

    def _failed_commit(self, reason: str) -> CommitError:
        """LMDB refused the commit (or gave up on its transaction): the error to raise, the handle set right."""
        if self._pending is not None:
            self._pending.abort()
        self.settle()
        self.env.reopen_if_panicked()  # a failed meta-page write leaves the env unusable until reopened
        commit = self.table.commit
        if self.spilled:
            lost = self.spilled
            self.rollback()
            return CommitError(
                f"commit to {self.path} failed ({reason}); the store keeps commit {commit}. "
                f"{lost} changed chunk(s) had been spilled from the cache into the failed transaction, "
                "so this handle was rolled back to the last commit", reason=reason, rolled_back=True)
        return CommitError(
            f"commit to {self.path} failed ({reason}); the store keeps commit {commit} and this "
            "handle keeps its uncommitted changes: free space (or fix the error) and call commit() again",
            reason=reason)

    def rollback(self) -> None:
        """Discard every change since the last commit."""
        self.settle()
        if self._pending is not None:
            self._pending.abort()
            self._pending = self._committing = None
        self._lost = False
        self.spilled = 0
        self._since_commit = 0
        self.table.rollback()

    def release(self) -> None:
        self.settle()
        if self._pending is not None:
            self._pending.abort()
            self._pending = None
        super().release()
        self.lock.release()
