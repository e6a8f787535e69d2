"""The writer's session: the pending write transaction, the one place a commit begins, ends or fails.

``put``/``add`` only change the table's caches. A write transaction is opened when a dirty
chunk has to leave the cache (it is *spilled* into the transaction) or at ``commit``,
which writes every dirty chunk of every column, the new ID chunks and the ``state`` record
in ONE transaction with one synced LMDB commit. Map growth happens only between
transactions (LMDB cannot resize under an open one), so room is reserved up front and a
``MapFullError`` is retried once with a bigger map. A failed commit raises
``CommitError``, keeps the previous commit on disk, and keeps the handle's changes for a
retry unless some had been spilled into the failed transaction.

With ``writemap`` (the default) LMDB writes pages straight into its shared map of the data
file; every byte a transaction may write is reserved on disk first
(``processes.data_file``), so a full disk fails cleanly before anything is written (and a
commit refused for space keeps even its spilled chunks: the same ``commit()`` can be retried).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import lmdb
import numpy as np

from ..errors import CommitError, ReadOnlyError
from ..format.chunks import ChunkEncoder, chunk_key
from ..format.layout import ColumnSpec
from ..format.records import IDS_DB, META_DB, column_db_name, pack_record
from ..fsutil import free_bytes
from ..options import StoreOptions
from ..processes import environment
from ..processes.writer_lock import WriterLock
from .cache import CacheStats
from .directory import ChunkDirectory
from .session import Session
from .undo import STATE_KEY, UndoLog

log = logging.getLogger(__name__)


class WriterSession(Session):
    """The session of the one writable handle of a store (it holds the store's writer lock)."""

    readonly = False

    def __init__(self, path: str, env: environment.SharedEnv, lock: WriterLock, options: StoreOptions,
                 stats: CacheStats):
        self.lock = lock
        self._pending: lmdb.Transaction | None = None
        self._dbs_in_pending: list[bytes] = []
        self._since_commit = 0
        self._txn_start = 0  # LMDB's committed end when the pending transaction began
        self._txn_bytes = 0  # bytes written into the pending transaction so far
        self._reserved_ahead = 0  # of which the disk holds this many (writemap)
        self._encoder = ChunkEncoder()
        self._undo = UndoLog(env) if options.undo_log else None  # keeps what each commit overwrites
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
        return call()

    def refresh(self) -> None:
        pass

    def load(self, spec: ColumnSpec, chunks: list, directory: ChunkDirectory) -> Iterator[tuple]:
        """Chunks as this writer last wrote them: from the pending transaction if one is open."""
        if self._pending is not None:
            yield from self.decode_chunks(self._pending, spec, chunks, directory, committed=False)
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
    def spill(self, spec: ColumnSpec, chunk: int, rows: np.ndarray) -> None:
        """Write an evicted dirty chunk into the pending write transaction."""
        if self._pending is None:
            # The map cannot grow while this transaction is open, and the caller may keep
            # adding rows (and spilling) before it commits: reserve room for all the disk
            # can hold, so the map is never the limit (the mapping is virtual, not disk).
            self.env.ensure_headroom(free_bytes(self.path) // 2)
        value = self._encoder.encode(rows, chunk, self.table.commit + 1)
        # reserve well ahead: one fallocate serves many spills (and the pre-image the undo log keeps)
        stored = self._pages(len(value), 2 if self._undo is not None else 1)
        self._reserve(stored, ahead=max(8 << 20, self.table.row_bytes * self.table.rows // 16))
        txn = self._pending_txn()
        db = self._ensure_db(spec, txn)
        try:
            if self._undo is not None:
                self._undo.capture(txn, column_db_name(spec.name), db, chunk_key(chunk))
            txn.put(chunk_key(chunk), value, db=db)
        except lmdb.Error as exc:  # LMDB gives up on a transaction that failed a put: it is gone
            self._abort_pending()
            raise CommitError(f"spilling changes from the cache into {self.path} failed ({exc})") from None
        self._txn_bytes += stored
        self.spilled += 1

    @property
    def lost_spills(self) -> bool:
        """True once the pending transaction was lost with spilled changes in it (roll back)."""
        return self.spilled > 0 and self._pending is None

    def _ensure_db(self, spec: ColumnSpec, txn: lmdb.Transaction):
        """The column's database, created inside the pending transaction if new."""
        db = self.db_of(spec)
        if db is None:
            name = column_db_name(spec.name)
            db = self.env.create_db(name, txn)
            self._dbs_in_pending.append(name)
        return db

    def _pending_txn(self) -> lmdb.Transaction:
        if self._pending is None:
            rows = max(self.table.rows, 1)
            self.env.ensure_headroom(self.table.row_bytes * rows + 16 * rows + (8 << 20))
            self._txn_start, self._txn_bytes, self._reserved_ahead = self.env.used_bytes(), 0, 0
            self.env.clear_stale_readers()  # a killed reader's slot would pin its snapshot's pages for good
            self._pending = self.env.env.begin(write=True, buffers=True)
            self.env.write_owner = threading.get_ident()  # only this thread can end it (see processes/fork.py)
            if self._undo is not None:
                self._undo.start(self._pending, self._dbs_in_pending)
        return self._pending

    def _pages(self, value_bytes: int, count: int = 1) -> int:
        """Disk ``count`` values take as LMDB overflow pages (a run of whole pages after a header each)."""
        psize = self.env.data_file.page_size
        return count * (-(-(value_bytes + 64) // psize) * psize)

    def _reserve(self, more: int, ahead: int = 0) -> None:
        """Before the pending transaction stores ``more`` bytes: make sure the disk has the blocks.

        LMDB takes free pages inside the file first and appends the rest, so the file never
        grows past its committed end plus what this transaction wrote. ``ahead`` reserves more
        than needed now, so that a stream of spills costs one ``fallocate`` in many.
        """
        if not self.env.writemap:
            return
        need = self._txn_bytes + more
        if need <= self._reserved_ahead:
            return
        start = self._txn_start if self._pending is not None else self.env.used_bytes()
        reserved = need + ahead
        try:
            self.env.data_file.reserve(start + reserved + reserved // 32 + (2 << 20))  # + B-tree, free-list pages
        except OSError as exc:
            what = "commit" if not ahead else "spilling changes that no longer fit in the cache"
            reason = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
            error = CommitError(
                f"{what} to {self.path} failed ({reason}: {need:,} bytes of disk needed); nothing was written, the "
                f"store keeps commit {self.table.commit} and this handle keeps its uncommitted changes: free space "
                "and call commit() again")
            error.reason = f"{reason}: {need:,} bytes of disk needed"  # for a caller that says more (store.py)
            raise error from None
        self._reserved_ahead = reserved

    def _abort_pending(self) -> None:
        if self._pending is not None:
            try:
                self._pending.abort()
            except lmdb.Error:
                pass
            self._pending = None
            self.env.write_owner = None
        for db_name in self._dbs_in_pending:  # handles opened in an aborted txn are invalid
            self.env.forget_db(db_name)
        self._dbs_in_pending = []

    # -- commit and rollback -------------------------------------------------------------
    def has_changes(self) -> bool:
        return self.spilled > 0 or self.table.has_changes()

    def note_update(self) -> bool:
        """Count a put/add call; True when ``commit_every`` says a commit is due now."""
        self._since_commit += 1
        every = self.options.commit_every
        return every is not None and self._since_commit >= every

    def commit(self) -> None:
        """Make every change durable in one transaction (see the module docstring)."""
        self._since_commit = 0
        if not self.has_changes():
            return
        for attempt in (0, 1):
            try:
                self._write_commit()
                return
            except lmdb.MapFullError:
                if self.spilled or attempt:
                    self._fail_commit("the LMDB map is full")
                self._abort_pending()
                self.env.ensure_headroom(4 * self._dirty_bytes())
            except lmdb.Error as exc:
                self._fail_commit(str(exc))

    def _dirty_bytes(self) -> int:
        return self.table.dirty_bytes() * (2 if self._undo is not None else 1) + (1 << 20)  # + pre-images

    def _commit_bytes(self) -> int:
        """Disk a commit may take for its dirty chunks, its new ID chunks and its records."""
        table, cr = self.table, self.table.chunk_rows
        new_id_chunks = max(0, -(-table.rows // cr) - table.committed_rows // cr)
        chunks = sum(self._pages(c.cache.chunk_bytes, c.cache.n_dirty) for c in table.columns.values())
        ids = self._pages(8 * cr, new_id_chunks)
        copies = 2 if self._undo is not None else 1  # the undo log keeps a pre-image of each value written
        return copies * (chunks + ids) + (1 << 20)

    def _write_commit(self) -> None:
        table = self.table
        version = table.commit + 1
        if self._pending is None:
            self.env.ensure_headroom(self._dirty_bytes() + 16 * max(table.rows, 1))
        self._reserve(self._commit_bytes())  # CommitError if the disk is full: nothing written, all kept
        txn = self._pending_txn()
        written = 0
        for column in table.columns.values():
            dirty = column.cache.dirty_chunks()
            db = self._ensure_db(column.spec, txn)  # declared columns get their (maybe empty) DB
            if not dirty:
                continue
            with txn.cursor(db=db) as cursor:
                for chunk, rows in dirty:
                    if self._undo is not None:  # before the encoder's buffer is filled for this chunk
                        self._undo.capture(txn, column.db_name, db, chunk_key(chunk))
                    value = self._encoder.encode(rows, chunk, version)
                    cursor.put(chunk_key(chunk), value)
                    written += len(value)
        for chunk, ids in table.new_id_chunks():
            if self._undo is not None:
                self._undo.capture(txn, IDS_DB, self.ids_db, chunk_key(chunk))
            value = self._encoder.encode(ids, chunk, version)
            txn.put(chunk_key(chunk), value, db=self.ids_db)
            written += len(value)
        now = time.time()
        if self._undo is not None:
            self._undo.capture(txn, META_DB, self.meta_db, STATE_KEY)
        txn.put(STATE_KEY, pack_record(table.state_record(version, now)), db=self.meta_db)
        if self._undo is not None:
            self._undo.mark(txn, undoes=version, restores=table.commit)
        self._pending = None
        meta = self.env.data_file.save_meta() if self.env.writemap else None
        try:
            txn.commit()  # one synced commit (sync=True); raises on disk full / I/O error
        except BaseException:
            self._pending = txn  # so _fail_commit forgets databases created in it
            if meta is not None and self.env.data_file.restore_meta(meta):
                log.warning("%s: the failed commit had written its meta page; the previous one was put back",
                            self.path)
            raise
        self.env.write_owner = None
        self._dbs_in_pending = []
        table.mark_committed(version, now)
        self.spilled = 0
        self.commits += 1
        self.bytes_committed += written

    def _fail_commit(self, reason: str) -> None:
        self._abort_pending()
        self.env.reopen_if_panicked()  # a failed meta-page write leaves the env unusable until reopened
        commit = self.table.commit
        if self.spilled:
            lost = self.spilled
            self.rollback()
            raise CommitError(
                f"commit to {self.path} failed ({reason}); the store keeps commit {commit}. "
                f"{lost} changed chunk(s) had been spilled from the cache into the failed transaction, "
                "so this handle was rolled back to the last commit")
        raise CommitError(
            f"commit to {self.path} failed ({reason}); the store keeps commit {commit} and this "
            "handle keeps its uncommitted changes: free space (or fix the error) and call commit() again")

    def rollback(self) -> None:
        """Discard every change since the last commit."""
        self._abort_pending()
        self.spilled = 0
        self._since_commit = 0
        self.table.rollback()

    def release(self) -> None:
        self._abort_pending()
        super().release()
        self.lock.release()
