"""What both kinds of session do: open the table from the metadata, and read chunks for its caches.

A handle holds exactly one session on its LMDB environment: a :class:`WriterSession`
(``writes.py``: the pending write transaction, commits, rollbacks) or a
:class:`ReaderSession` (``readers.py``: one read transaction per call, caught up with the
latest commit). The store picks one at open; nothing else branches on the mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import lmdb
import numpy as np

from ..errors import CorruptionError, EmbeddingStoreError, NotAStoreError
from ..format.chunks import chunk_key, read_chunk, read_header, read_id_chunk
from ..format.layout import ColumnSpec, TableLayout
from ..format.records import IDS_DB, MAIN, META_DB, column_db_name, read_metadata
from ..options import StoreOptions
from ..processes import environment
from .cache import CacheStats
from .directory import ChunkDirectory
from .ids import IdIndex
from .table import Table

T = TypeVar("T")


class Session:
    """Base of the writer and reader sessions (see the module docstring)."""

    readonly: bool

    def __init__(self, path: str, env: environment.SharedEnv, options: StoreOptions, stats: CacheStats):
        self.path, self.env, self.options, self.stats = path, env, options, stats
        self.commits = self.bytes_committed = self.spilled = 0
        self.table = self._load_table()

    # -- opening -----------------------------------------------------------------------
    def _load_table(self) -> Table:
        env = self.env
        try:
            if env.cached_db(META_DB) is None or env.cached_db(IDS_DB) is None:
                raise NotAStoreError(f"{self.path} is an LMDB environment but not an lmdb_embeddings store")
            with env.reading() as txn:
                config, state = read_metadata(txn, self.meta_db, self.path)
                self.config = config  # written once at creation: a reader tells tables apart by it
                layout = TableLayout.from_metadata(config, state, self.path)
                index = IdIndex.from_chunks(self.id_chunks(txn, 0, layout.rows, layout.chunk_rows))
        except lmdb.Error as exc:
            raise CorruptionError(f"{self.path}: cannot read the metadata: {exc}") from exc
        return Table(layout, index, self.stats, self._column_io, self.options, self.readonly, self.path,
                     state.get("reverts"))

    def _column_io(self, spec: ColumnSpec) -> _ColumnIO:
        return _ColumnIO(self, spec)

    @property
    def meta_db(self):
        return self.env.cached_db(META_DB)

    @property
    def ids_db(self):
        return self.env.cached_db(IDS_DB)

    def db_of(self, spec: ColumnSpec):
        """The column's database, or None while it has never been committed."""
        return self.env.cached_db(column_db_name(spec.name))

    # -- reading chunks ------------------------------------------------------------------
    def id_chunks(self, txn, start_row: int, stop_row: int, chunk_rows: int | None = None) -> Iterator[np.ndarray]:
        """IDs of row slots ``start_row:stop_row`` as committed in ``txn``, a chunk at a time (copies)."""
        if stop_row <= start_row:
            return
        cr = chunk_rows or self.table.chunk_rows
        for c in range(start_row // cr, (stop_row - 1) // cr + 1):
            ids = read_id_chunk(txn, self.ids_db, c, min(cr, stop_row - c * cr), self.path)
            yield ids[max(0, start_row - c * cr) :].copy()

    def decode_chunks(self, txn, spec: ColumnSpec, chunks: list, directory: ChunkDirectory,
                      committed: bool = True, own: ChunkDirectory | None = None) -> Iterator[tuple]:
        """(chunk, row view, version) of each chunk as of ``txn``; fresh (empty) for chunks never written.

        A version the directory verified is not hashed again; a checksum checked here in a committed
        snapshot (``committed``; not the writer's pending transaction) is noted as verified. ``own``: the
        pending transaction's chunks this writer spilled into it (their bytes are its own: not hashed).
        """
        where = _where(spec)
        db = self.db_of(spec)
        for chunk in chunks:
            trusted = own.trusted_version(chunk) if own is not None else None
            if trusted is None:
                trusted = directory.trusted_version(chunk)
            found = read_chunk(txn, db, chunk, spec.width, spec.dtype, where, trusted)
            if found is None:
                if spec.name == MAIN and chunk * self.table.chunk_rows < self.table.committed_rows:
                    raise CorruptionError(f"{self.path}: chunk {chunk} is missing from the store")
                yield chunk, np.empty((0, spec.width), spec.dtype), 0
                continue
            header, rows = found
            if committed:
                directory.note_verified(chunk, header.version)
            yield chunk, rows, header.version


    def committed_versions(self, txn, spec: ColumnSpec, chunks: list) -> list[int]:
        """The version in each chunk's header as of ``txn`` (0: never written); no payload decoded."""
        db = self.db_of(spec)
        out = []
        for chunk in chunks:
            value = txn.get(chunk_key(chunk), db=db) if db is not None else None
            out.append(read_header(value, chunk).version if value is not None else 0)
        return out

    # -- what the modes define ---------------------------------------------------------
    def read(self, call: Callable[[], T]) -> T:
        """Run one call's reads (a reader: inside ONE read transaction on the latest commit)."""
        raise NotImplementedError

    def refresh(self) -> None:
        """Catch up with the latest commit (a reader), so properties answer for it."""
        self.read(lambda: None)

    def load(self, spec: ColumnSpec, chunks: list, directory: ChunkDirectory,
             column: _ColumnIO | None = None) -> Iterator[tuple]:
        raise NotImplementedError

    def committed_snapshot(self):
        """A context giving ``(txn, LMDB txn id)`` of a read transaction on the latest commit (the call's own, in a
        reader) for reads straight out of the map."""
        raise NotImplementedError

    def map_rows(self, column: _ColumnIO, slots: np.ndarray) -> np.ndarray:
        """Committed rows of ``slots`` (clean chunks) copied out of LMDB's map (``core/directory.py``)."""
        with self.committed_snapshot() as (txn, txnid):
            return self._map_rows(column, txn, txnid, slots)

    def _map_rows(self, column: _ColumnIO, txn, txnid: int, slots: np.ndarray) -> np.ndarray:
        directory = column.directory
        directory.follow(txnid, self.env.map_epoch, self.table.committed_rows)
        return directory.rows(txn, self._committed_db(column), slots)

    def map_warm(self, column: _ColumnIO, slots: np.ndarray) -> None:
        """Look up the chunks of ``slots`` in the map and ask the kernel to read their rows ahead (prefetch)."""
        with self.committed_snapshot() as (txn, txnid):
            column.directory.follow(txnid, self.env.map_epoch, self.table.committed_rows)
            column.directory.warm(txn, self._committed_db(column), slots)

    def _committed_db(self, column: _ColumnIO):
        """The column's database as committed (None for a column declared since the last commit: all fill)."""
        return None if self.table.new_columns and column.spec.name in self.table.new_columns else \
            self.env.cached_db(column.db_name)

    def versions(self, spec: ColumnSpec, chunks: list) -> list[int]:
        raise NotImplementedError

    def spill(self, spec: ColumnSpec, chunk: int, rows: np.ndarray) -> None:
        raise EmbeddingStoreError(f"{self.path}: a read-only handle has no changes to spill")

    def note_spilled(self, column: _ColumnIO, chunk: int) -> None:
        """A chunk of ``column`` was just spilled (a writer trusts its own bytes in the pending transaction)."""

    def spilled_rows(self, column: _ColumnIO, slots: np.ndarray) -> np.ndarray:
        raise EmbeddingStoreError(f"{self.path}: a read-only handle has no pending transaction to read")

    def has_changes(self) -> bool:
        return False

    def prefetch(self, ids: np.ndarray) -> None:
        """Bring the rows of the known ones of ``ids`` closer (``store.prefetch``; unknown IDs are ignored)."""
        table = self.table
        self.read(lambda: table.prefetch(table.index.slots(ids[table.index.contains(ids)])))

    def counters(self) -> dict[str, Any]:
        """``store.stats()``: the caches' counters, the commits', the caches' sizes and the table's."""
        table = self.table
        caches = [c.cache for c in table.columns.values()]
        out = self.stats.as_dict()
        l1, l2 = table.tier_bytes()
        out.update(commits=self.commits, bytes_committed=self.bytes_committed,
                   dirty_chunks=sum(c.n_dirty for c in caches), spilled_chunks=self.spilled,
                   buffered_rows=sum(len(c.buffer) for c in caches),
                   cache_bytes=sum(c.bytes for c in caches), cache_budget_bytes=l1 + l2,
                   l1_chunks=sum(c.resident_chunks for c in caches), l2_chunks=sum(len(c.l2) for c in caches),
                   rows=table.rows, store_commit=table.commit, last_commit_time=table.committed_at)
        return out

    def settle(self) -> None:
        """Apply what LMDB decided about an interrupted commit (a writer); nothing to do for a reader."""

    def release(self) -> None:
        """Give the environment (and a writer's lock) back; the session is unusable afterwards."""
        self.table.clear_caches()
        if self.env is not None:
            environment.release(self.env)
            self.env = None


class _ColumnIO:
    """One column's :class:`~lmdb_embeddings.core.cache.ChunkIO`: its cache's way to the session, with the
    column's chunk directory (where its committed chunks lie in LMDB's map, and which versions are verified)."""

    def __init__(self, session: Session, spec: ColumnSpec):
        self.session, self.spec = session, spec
        self.db_name = column_db_name(spec.name)
        self._directory: ChunkDirectory | None = None
        self._pending_of = None  # the WriteTransaction that ``_pending`` describes
        self._pending: ChunkDirectory | None = None

    @property
    def directory(self) -> ChunkDirectory:
        if self._directory is None:  # made on first use: the table (its chunking) exists by then
            self._directory = self._new_directory()
        return self._directory

    def _new_directory(self) -> ChunkDirectory:
        spec = self.spec
        return ChunkDirectory(self.session.table.chunk_rows, spec.width, spec.dtype, spec.fill, _where(spec),
                              required=spec.name == MAIN)

    def pending_directory(self, transaction) -> ChunkDirectory:
        """Where this column's spilled chunks lie in the writer's pending ``transaction`` (a ``WriteTransaction``),
        a new directory for every transaction: the versions it trusts are the ones this writer spilled into it."""
        if self._pending_of is not transaction or self._pending is None:
            self._pending, self._pending_of = self._new_directory(), transaction
        return self._pending

    def read_spilled_rows(self, slots: np.ndarray) -> np.ndarray:
        return self.session.spilled_rows(self, slots)

    def load(self, chunks: list) -> Iterator[tuple]:
        return self.session.load(self.spec, chunks, self.directory, self)

    def read_rows(self, slots: np.ndarray) -> np.ndarray:
        return self.session.map_rows(self, slots)

    def warm(self, slots: np.ndarray) -> None:
        self.session.map_warm(self, slots)

    def versions(self, chunks: list) -> list[int]:
        return self.session.versions(self.spec, chunks)

    def spill(self, chunk: int, rows: np.ndarray) -> None:
        self.session.spill(self.spec, chunk, rows)
        self.session.note_spilled(self, chunk)

    def staging(self, n_rows: int) -> np.ndarray:
        return self.session.staging(self.spec, n_rows)


def _where(spec: ColumnSpec) -> str:
    """How error messages name a column's chunks ("chunk 3" of the embeddings, "chunk 3 of column 'x'")."""
    return "" if spec.name == MAIN else f" of column {spec.name!r}"
