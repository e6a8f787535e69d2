"""The reader's session: every call in one short read transaction, caught up with the latest commit.

A read-only handle never holds a transaction between calls (a long one would pin old
pages and make the writer's file grow). Each call begins one, reads the ``state`` record,
adopts a newer commit (new IDs, new columns, attrs), and lets the caches re-check the
chunks they hold against it before serving: so one call never mixes two commits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..format.layout import ColumnSpec
from ..format.records import column_db_name, read_record
from ..options import StoreOptions
from ..processes import environment
from .cache import CacheStats
from .session import Session


class ReaderSession(Session):
    """The session of a read-only handle (any number of them, in any process)."""

    readonly = True

    def __init__(self, path: str, env: environment.SharedEnv, options: StoreOptions, stats: CacheStats):
        self._txn = None
        super().__init__(path, env, options, stats)

    @classmethod
    def open(cls, path: str, options: StoreOptions, stats: CacheStats) -> ReaderSession:
        env = environment.acquire(path, write=False, readahead=options.readahead)
        try:
            return cls(path, env, options, stats)
        except BaseException:
            environment.release(env)
            raise

    @contextmanager
    def reading(self):
        """One read transaction on the latest commit, with the table caught up with it.

        A commit may have declared columns whose databases this process has not opened;
        they can only be opened between transactions, so the snapshot is retaken then.
        """
        while True:
            with self.env.reading() as txn:
                missing = self._catch_up(txn)
                if not missing:
                    self._txn = txn
                    try:
                        yield
                    finally:
                        self._txn = None
                    return
            self.env.open_dbs(missing)

    def _catch_up(self, txn) -> list[bytes]:
        """Adopt the commit ``txn`` sees; returns databases to open first (then call again)."""
        state = read_record(txn, b"state", self.meta_db, self.path)
        if state.get("commit") == self.table.commit:
            return []
        missing = [column_db_name(n) for n in state.get("columns", {})
                   if self.env.cached_db(column_db_name(n)) is None]
        if missing:
            return missing
        self.table.catch_up(state, lambda start, stop: self.read_ids(txn, start, stop))
        return []

    def load(self, spec: ColumnSpec, chunks: list) -> Iterator[tuple]:
        return self.decode_chunks(self._txn, spec, chunks)

    def versions(self, spec: ColumnSpec, chunks: list) -> list[int]:
        return self.committed_versions(self._txn, spec, chunks)
