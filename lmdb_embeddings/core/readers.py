"""The reader's session: every call in one short read transaction, caught up with the latest commit.

A read-only handle never holds a transaction between calls (a long one would pin old
pages and make the writer's file grow). Each call begins one, reads the ``state`` record,
adopts a newer commit (new IDs, new columns, attrs), and lets the caches re-check the
chunks they hold against it before serving: so one call never mixes two commits.

A reader follows the store at its path. ``compact``, ``restore --force`` and
``create(overwrite=True)`` swap another directory in; the environment this handle has open
then belongs to the old, deleted one. The reader compares the data file at the path with
the one its environment opened (one ``stat``) whenever LMDB's transaction id changed since
the last look (a new commit, or the ``replaced`` record a swap commits into the old store)
and at least every ``IDENTITY_CHECK_S`` (a store deleted and re-created by hand). A call
that finds the table unchanged and the clock within that interval makes no system call
for this. After a swap: the same table (its ``config`` record is identical, as after a
compact) is opened again at the path, with fresh caches, and the call goes on; a different
table raises a one-line ``EmbeddingStoreError`` (open it again), at every later call too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from ..errors import EmbeddingStoreError
from ..format.layout import ColumnSpec, parse_state
from ..format.records import column_db_name, read_metadata, read_record
from ..options import StoreOptions
from ..processes import environment
from .cache import CacheStats
from .directory import ChunkDirectory
from .session import Session


class ReaderSession(Session):
    """The session of a read-only handle (any number of them, in any process)."""

    readonly = True

    def __init__(self, path: str, env: environment.SharedEnv, options: StoreOptions, stats: CacheStats):
        self._txn = None
        self._seen_txnid = -1  # LMDB's transaction id of the snapshot the table last caught up with
        self._looked_txnid = -1  # LMDB's transaction id at the last look at the path
        self._look_again_at = 0.0  # time.monotonic() after which the path is looked at anyway
        self._moved = False  # the data file at the path is not this environment's: follow it
        self._replaced: str | None = None  # the message, once another table was found at the path
        super().__init__(path, env, options, stats)

    @classmethod
    def open(cls, path: str, options: StoreOptions, stats: CacheStats) -> ReaderSession:
        env = environment.acquire(path, write=False, readahead=options.readahead)
        try:
            return cls(path, env, options, stats)
        except BaseException:
            environment.release(env)
            raise

    def read(self, call):
        """Run ``call`` in one read transaction on the latest commit, the table caught up with it.

        A commit may have declared columns whose databases this process has not opened;
        they can only be opened between transactions, so the snapshot is retaken then.
        When nothing was committed since the last call (LMDB's transaction id is the one the
        table caught up with), no record is read: the call costs a transaction begin and end.
        """
        env = self.env
        while True:
            if self._moved or env.retired:
                self._follow()  # raises while the table at the path is another one
                env = self.env
            with env.lock:
                if env.retired:  # retired by another handle's open meanwhile
                    continue
                txn = env.begin_read()
                try:
                    txnid = txn.id()
                    if (txnid != self._looked_txnid or time.monotonic() >= self._look_again_at) and \
                            self._store_moved(txnid):
                        continue  # swapped: follow the store at the path first
                    missing = [] if txnid == self._seen_txnid else self._catch_up(txn)
                    if not missing:
                        self._seen_txnid = txnid
                        self._txn = txn
                        return call()
                finally:
                    self._txn = None
                    txn.abort()
            env.open_dbs(missing)

    def _store_moved(self, txnid: int) -> bool:
        """True if the store at the path is no longer this environment's (one ``stat``)."""
        self._looked_txnid, self._look_again_at = txnid, time.monotonic() + environment.IDENTITY_CHECK_S
        self._moved = not self.env.is_current()
        return self._moved

    def _follow(self) -> None:
        """Open the store now at the path: the same table goes on (fresh caches), another one is refused."""
        if self._replaced is not None:
            raise EmbeddingStoreError(self._replaced)
        try:
            new = environment.acquire(self.path, write=False, readahead=self.options.readahead)
        except EmbeddingStoreError as exc:
            raise EmbeddingStoreError(f"{self.path}: the store this read-only handle had open was replaced or removed, "
                                      f"and the one at the path cannot be opened now ({exc})") from None
        old, self.env = self.env, new
        environment.release(old)
        with new.reading() as txn:
            config, _ = read_metadata(txn, self.meta_db, self.path)
        if config != self.config:  # _moved stays set: every later call comes here and raises too
            self._replaced = (f"{self.path} was replaced by another table (restore, or delete and create) while this "
                              "read-only handle was open; open it again")
            raise EmbeddingStoreError(self._replaced)
        self.table = self._load_table()  # e.g. after a compact: same table, same commit, fresh caches
        self._moved, self._seen_txnid, self._looked_txnid = False, -1, -1

    def _catch_up(self, txn) -> list[bytes]:
        """Adopt the commit ``txn`` sees; returns databases to open first (then call again)."""
        state = read_record(txn, b"state", self.meta_db, self.path)
        if state.get("commit") == self.table.commit:
            return []
        _, _, columns, _ = parse_state(state, self.path)  # a damaged record: CorruptionError, nothing adopted
        missing = [column_db_name(n) for n in columns if self.env.cached_db(column_db_name(n)) is None]
        if missing:
            return missing
        self.table.catch_up(state, lambda start, stop: self.id_chunks(txn, start, stop))
        return []

    def load(self, spec: ColumnSpec, chunks: list, directory: ChunkDirectory, column=None) -> Iterator[tuple]:
        return self.decode_chunks(self._txn, spec, chunks, directory)

    @contextmanager
    def committed_snapshot(self):
        """The call's own read transaction (map reads see the commit the call reads)."""
        yield self._txn, self._seen_txnid

    def map_rows(self, column, slots: np.ndarray) -> np.ndarray:
        """The hot path of a reader of a large table: the call's own transaction, no context to enter."""
        directory = column.directory
        directory.follow(self._seen_txnid, self.env.map_epoch, self.table.committed_rows)
        return directory.rows(self._txn, self._committed_db(column), slots)

    def versions(self, spec: ColumnSpec, chunks: list) -> list[int]:
        return self.committed_versions(self._txn, spec, chunks)
