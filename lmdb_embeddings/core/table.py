"""The table a handle has open: its IDs, row count, last commit, attrs, and columns with their caches.

It knows nothing of LMDB: the session that owns it reads and writes the environment and
hands each column's cache a :class:`~lmdb_embeddings.core.cache.ChunkIO`. What changed since
the last commit (dirty chunks, added rows, new columns, attrs) is all here, so a commit or
a rollback is the session asking the table what to write or to forget.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from ..errors import CorruptionError, EmbeddingStoreError
from ..format import init
from ..format.layout import ColumnSpec, TableLayout, parse_state
from ..format.records import MAIN, column_db_name, state_record
from ..inputs import as_dtype
from ..options import MIN_WRITER_CHUNKS, StoreOptions
from .cache import CacheStats, ChunkIO, ColumnCache
from .ids import IdIndex
from .undo import rows_kept_after


@dataclass
class Column:
    """One chunked column: the embeddings, or an auxiliary (optimizer state) column."""

    spec: ColumnSpec
    cache: ColumnCache

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def db_name(self) -> bytes:
        return column_db_name(self.spec.name)


class Table:
    """The in-memory state of one open table (see the module docstring)."""

    def __init__(self, layout: TableLayout, index: IdIndex, stats: CacheStats,
                 io_for: Callable[[ColumnSpec], ChunkIO], options: StoreOptions, readonly: bool, path: str,
                 reverts: list | None = None):
        self.dim, self.dtype, self.chunk_rows = layout.dim, layout.dtype, layout.chunk_rows
        try:
            self.init_spec = dict(layout.config["init"])
            self.seed = int(layout.config["seed"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptionError(f"{path}: the store configuration is damaged ({exc!r})") from None
        self.index = index
        self.rows = self.committed_rows = layout.rows
        self.commit, self.committed_at = layout.commit, layout.committed_at
        self.attrs, self._committed_attrs = dict(layout.attrs), dict(layout.attrs)
        self.reverts = list(reverts or [])  # the state record's history of undone commits (core.undo)
        self.validate_against: int | None = layout.commit if readonly else None
        self._stats, self._io_for, self._options, self._readonly = stats, io_for, options, readonly
        self._path = path
        self.columns: dict[str, Column] = {}
        self.new_columns: list[str] = []  # declared since the last commit
        self.attrs_changed = False
        self.check_cache_room(layout.row_bytes, "open")
        for spec in layout.columns:
            self._register(spec)
        self.split_budget()

    # -- columns -------------------------------------------------------------------------
    def _register(self, spec: ColumnSpec) -> Column:
        cache = ColumnCache(spec.width, spec.dtype, self.chunk_rows, spec.fill, self._stats, self._io_for(spec), self)
        column = self.columns[spec.name] = Column(spec, cache)
        return column

    def declare_column(self, spec: ColumnSpec) -> None:
        """A new auxiliary column, committed with the next commit (rows start at ``spec.fill``)."""
        self.check_cache_room(self.row_bytes + spec.row_bytes, "ensure_column")
        self._register(spec)
        self.new_columns.append(spec.name)
        self.split_budget()

    def adopt_columns(self, described: dict) -> None:
        """Reader: register columns a commit declared (name -> {width, dtype, fill})."""
        added = False
        for name, desc in described.items():
            if name not in self.columns:
                self._register(ColumnSpec(name, int(desc["width"]), as_dtype(desc["dtype"]),
                                          float(desc.get("fill", 0.0))))
                added = True
        if added:
            self.split_budget()

    def describe_columns(self) -> dict:
        return {n: c.spec.describe() for n, c in self.columns.items()}

    @property
    def row_bytes(self) -> int:
        return sum(c.spec.row_bytes for c in self.columns.values())

    # -- cache budget --------------------------------------------------------------------
    def tier_bytes(self, row_bytes: int | None = None) -> tuple[int, int]:
        """This handle's (L1, L2) byte budgets (for rows of ``row_bytes``: all columns), the default sized from the
        table now and never below a writer's minimum chunks."""
        row_bytes = row_bytes or self.row_bytes
        floor = 0 if self._readonly else MIN_WRITER_CHUNKS * self.chunk_rows * row_bytes
        cache_mb = self._options.resolved_cache_mb(row_bytes * self.rows, self._readonly, floor)
        in_chunks = -(-self.rows // self.chunk_rows) * self.chunk_rows * row_bytes  # whole chunks of every column
        return self._options.tier_bytes(cache_mb, in_chunks)

    def check_cache_room(self, row_bytes: int, call: str) -> None:
        """Refuse a writer whose cache budget cannot hold its minimum chunks (``StoreOptions.writer_cache_problem``)."""
        if not self._readonly:
            self._options.check_writer_cache(self.chunk_rows, row_bytes, self.rows, call)

    def split_budget(self) -> None:
        """Share the L1/L2 budgets between columns in proportion to their row bytes."""
        self._rows_at_budget = self.rows
        l1, l2 = self.tier_bytes()
        total = self.row_bytes
        min_chunks = 0 if self._readonly else MIN_WRITER_CHUNKS  # a reader reads a table larger than L1 in place
        for column in self.columns.values():
            share = column.spec.row_bytes / total
            column.cache.set_budget(int(l1 * share), int(l2 * share), min_chunks, self._options.write_buffer)

    # -- rows --------------------------------------------------------------------------
    def prefetch(self, slots: np.ndarray) -> None:
        """Bring the rows of ``slots`` closer in every column (``store.prefetch``)."""
        for column in self.columns.values():
            column.cache.prefetch(slots)

    def scatter(self, name: str, slots: np.ndarray, values: np.ndarray) -> None:
        self.columns[name].cache.scatter(slots, values)

    def append(self, new_ids: np.ndarray, values: np.ndarray) -> None:
        """New IDs (checked absent) with their rows, readable at once, persisted at commit."""
        if len(new_ids):
            start = self.rows
            self.index.append(new_ids)
            self.rows += len(new_ids)
            self.scatter(MAIN, np.arange(start, self.rows, dtype=np.int64), values)

    def forget_rows_from(self, start: int) -> None:
        """Undo appends from row slot ``start`` on (an ``add`` whose rows could not all be written)."""
        self.index.truncate(start)
        self.rows = start
        for column in self.columns.values():
            column.cache.forget_rows_from(start)

    def init_values(self, start: int, count: int) -> np.ndarray:
        """Initial rows of slots ``start:start+count``, exactly as ``create`` would have made them."""
        cr, out = self.chunk_rows, np.empty((count, self.dim), self.dtype)
        slot = start
        while slot < start + count:
            chunk, off = divmod(slot, cr)
            stop = min(cr, off + (start + count - slot))
            out[slot - start : slot - start + stop - off] = init.chunk_values(
                self.init_spec, self.seed, chunk, cr, self.dim, off, stop, self.dtype)
            slot += stop - off
        return out

    def set_attr(self, key: str, value) -> None:
        self.attrs[key] = value
        self.attrs_changed = True

    # -- commits -----------------------------------------------------------------------
    def has_changes(self) -> bool:
        return (self.rows != self.committed_rows or bool(self.new_columns) or self.attrs_changed
                or any(c.cache.has_changes for c in self.columns.values()))

    def merge_buffers(self) -> None:
        """Write every column's buffered rows into their chunks in the pending transaction (before a commit)."""
        for column in self.columns.values():
            column.cache.merge_buffer()

    def dirty_bytes(self) -> int:
        return sum(c.cache.n_dirty * c.cache.chunk_bytes for c in self.columns.values())

    def state_record(self, version: int, now: float) -> dict:
        return state_record(version, self.rows, now, self.attrs, self.describe_columns(), self.reverts)

    def new_id_chunks(self):
        """(chunk, (n, 1) int64 IDs) of every ID chunk that rows added since the last commit changed."""
        cr = self.chunk_rows
        for chunk in range(self.committed_rows // cr, -(-self.rows // cr)):
            yield chunk, self.index.slice(chunk * cr, (chunk + 1) * cr).reshape(-1, 1)

    def mark_committed(self, version: int, now: float) -> None:
        for column in self.columns.values():
            column.cache.mark_clean(version)
        self.commit, self.committed_rows, self.committed_at = version, self.rows, now
        self._committed_attrs = dict(self.attrs)
        self.new_columns, self.attrs_changed = [], False
        if self._options.cache_mb is None and self.rows != self._rows_at_budget:
            self.split_budget()  # the default budget follows the table's size

    def rollback(self) -> None:
        """Forget everything since the last commit: dirty chunks, added rows, new columns, attrs."""
        first_new_chunk = self.committed_rows // self.chunk_rows
        for column in self.columns.values():
            column.cache.drop_dirty()
            if self.rows != self.committed_rows:
                column.cache.drop_from(first_new_chunk)
        for name in self.new_columns:
            self.columns.pop(name).cache.clear()
        self.index.truncate(self.committed_rows)
        self.rows = self.committed_rows
        self.attrs = dict(self._committed_attrs)
        self.new_columns, self.attrs_changed = [], False
        self.split_budget()

    def catch_up(self, state: dict, read_ids: Callable[[int, int], Iterable[np.ndarray]]) -> None:
        """Reader: adopt a newer commit's state record (new IDs, chunk by chunk, from ``read_ids(start, stop)``)."""
        rows, commit, columns, attrs = parse_state(state, self._path)
        reverts = list(state.get("reverts") or [])
        kept = rows_kept_after(reverts, self.commit)
        if kept is not None and kept < self.rows:  # a commit was undone since: its rows are gone
            self._forget_rows_from(kept)
        if rows < self.rows:
            raise EmbeddingStoreError(f"the store went from {self.rows} to {rows} rows; it was replaced by "
                                      "another table: open it again")
        if rows > self.rows:
            keep = (self.rows // self.chunk_rows) * self.chunk_rows
            self.index.truncate(keep)
            for part in read_ids(keep, rows):
                self.index.append(part)
        self.rows = self.committed_rows = rows
        self.attrs = self._committed_attrs = attrs
        self.adopt_columns(columns)
        self.commit, self.committed_at = commit, state.get("committed_at")
        self.reverts = reverts
        self.validate_against = commit

    def _forget_rows_from(self, rows: int) -> None:
        """Reader: forget IDs and cached chunks from row slot ``rows`` on (an undone commit had added them)."""
        self.index.truncate(rows)
        for column in self.columns.values():
            column.cache.drop_from(rows // self.chunk_rows)
        self.rows = self.committed_rows = rows

    def clear_caches(self) -> None:
        for column in self.columns.values():
            column.cache.clear()
