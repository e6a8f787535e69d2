"""What a table is, independent of where it lives: columns, chunking, rows and metadata.

The snapshot reader, the dump file, the npy directory and the store builder all speak in
terms of :class:`TableLayout`, so a table moves between them without any of them knowing
about the others. ``columns[0]`` is always the embeddings; the others are auxiliary
(optimizer state) columns with the same rows and chunking.
"""

from __future__ import annotations

import datetime
import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..errors import CorruptionError, EmbeddingStoreError
from ..inputs import as_dtype
from . import init
from .chunks import ID_DTYPE, MAX_HEADER_BYTES
from .records import MAIN, MAX_COMMIT

__all__ = ["ColumnSpec", "TableLayout", "TableSource", "TableSink", "copy_table", "chunk_size_problem", "ID_DTYPE",
           "MAX_CHUNK_BYTES", "MAX_ROWS", "check_reverts", "parse_state", "CHUNK_TARGET_BYTES", "choose_chunk_rows"]

#: A chunk is one LMDB value and is decoded (and initialised) whole: beyond this it cannot be a unit of I/O.
MAX_CHUNK_BYTES = 1 << 30
#: Row counts above this are damage: row slots and positions stay far inside int64 arithmetic.
MAX_ROWS = 2**62


#: The chunk value size ``chunk_rows=None`` aims at: large enough that a reader renews few chunk
#: locations after a commit and a commit writes few values, small enough that a chunk a writer loads
#: to change one row, and the cache's minimum of two chunks, stay small (docs/FORMAT.md).
CHUNK_TARGET_BYTES = 256 << 10
_OVERFLOW_PAGE_HEADER = 16  # LMDB's page header in front of every overflow value


def choose_chunk_rows(row_bytes: int, page_size: int = mmap.PAGESIZE) -> int:
    """The rows per chunk ``create(chunk_rows=None)`` picks for rows of ``row_bytes`` bytes.

    A chunk value larger than half a page lives on LMDB overflow pages: a run of whole pages
    holding a 16-byte page header and the value. A value just over a page multiple would
    waste almost a page, so the rows are counted to fill a run of ``CHUNK_TARGET_BYTES`` (the
    longest chunk header included) and no more. A row larger than the target is a chunk alone.
    """
    pages = max(1, CHUNK_TARGET_BYTES // page_size)
    room = pages * page_size - _OVERFLOW_PAGE_HEADER - MAX_HEADER_BYTES
    return max(1, room // max(1, row_bytes))


def chunk_size_problem(chunk_rows: int, row_bytes: int) -> str | None:
    """Why chunks of ``chunk_rows`` rows of ``row_bytes`` bytes are too large, or None if they are not."""
    if chunk_rows * row_bytes <= MAX_CHUNK_BYTES:
        return None
    if row_bytes > MAX_CHUNK_BYTES:
        return (f"one row takes {row_bytes:,} bytes, more than the largest chunk ({MAX_CHUNK_BYTES >> 20} MiB): "
                "lower dim")
    return (f"a chunk of {chunk_rows:,} rows x {row_bytes:,} bytes exceeds the largest chunk "
            f"({MAX_CHUNK_BYTES >> 20} MiB): lower chunk_rows to at most {MAX_CHUNK_BYTES // row_bytes:,}")


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    width: int
    dtype: np.dtype
    fill: float = 0.0

    @property
    def row_bytes(self) -> int:
        return self.width * self.dtype.itemsize

    def describe(self) -> dict:
        """The column as the store's state record describes it."""
        return {"width": self.width, "dtype": self.dtype.name, "fill": self.fill}


@dataclass(frozen=True)
class TableLayout:
    chunk_rows: int
    rows: int
    columns: tuple[ColumnSpec, ...]
    config: dict = field(default_factory=dict)  # the store's config record (init, seed, ...)
    attrs: dict = field(default_factory=dict)  # user metadata committed with the rows
    commit: int = 0
    committed_at: float | None = None

    @property
    def dim(self) -> int:
        return self.columns[0].width

    @property
    def dtype(self) -> np.dtype:
        return self.columns[0].dtype

    @property
    def n_chunks(self) -> int:
        return -(-self.rows // self.chunk_rows)

    @property
    def row_bytes(self) -> int:
        """Bytes of one row across all columns."""
        return sum(c.row_bytes for c in self.columns)

    def chunk_len(self, chunk: int) -> int:
        return min(self.chunk_rows, self.rows - chunk * self.chunk_rows)

    def chunk_slices(self) -> Iterator[tuple[int, slice]]:
        """``(chunk, its row slots)`` for every chunk, in order."""
        for chunk in range(self.n_chunks):
            lo = chunk * self.chunk_rows
            yield chunk, slice(lo, lo + self.chunk_len(chunk))

    def aux_columns(self) -> tuple[ColumnSpec, ...]:
        return self.columns[1:]

    # -- records (msgpack/JSON-able dicts) ---------------------------------------------
    def to_record(self) -> dict:
        return {
            "chunk_rows": self.chunk_rows, "rows": self.rows,
            "columns": [{"name": c.name, **c.describe()} for c in self.columns],
            "config": self.config, "attrs": self.attrs, "commit": self.commit, "committed_at": self.committed_at,
        }

    @classmethod
    def from_metadata(cls, config: dict, state: dict, path: str) -> TableLayout:
        """The layout a store's ``config`` and ``state`` records describe (``CorruptionError`` if damaged).

        Everything a handle later relies on is checked here, once: a store that opens works.
        """
        try:
            columns = {MAIN: {"width": config["dim"], "dtype": config["dtype"], "fill": 0.0}}
            columns.update({n: d for n, d in dict(state.get("columns", {})).items() if n != MAIN})
            record = {"chunk_rows": config["chunk_rows"], "rows": state["rows"], "config": config,
                      "columns": [{"name": n, **d} for n, d in columns.items()],
                      "attrs": state.get("attrs", {}), "commit": state["commit"],
                      "committed_at": state.get("committed_at")}
            for key in ("init", "seed"):
                if key not in config:
                    raise KeyError(key)
            check_reverts(state.get("reverts"))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise CorruptionError(f"{path}: the store configuration (config/state records) is damaged "
                                  f"({_why(exc)})") from None
        return cls.from_record(record, CorruptionError, path)

    @classmethod
    def from_record(cls, record, error: type[EmbeddingStoreError], what: str) -> TableLayout:
        """Parse and check a record; anything wrong raises ``error`` naming ``what``.

        Fields must have their exact types (an int is not a string or a bool) and ranges, so a
        record that passes describes a table every part of the library can hold.
        """
        try:
            columns = tuple(
                ColumnSpec(_text(c["name"], "a column name"), _int(c["width"], "a column width", 1),
                           as_dtype(c["dtype"]), _real(c.get("fill", 0.0), "a column fill"))
                for c in _list(record["columns"], "columns"))
            committed_at = record.get("committed_at")
            layout = cls(chunk_rows=_int(record["chunk_rows"], "chunk_rows", 1),
                         rows=_int(record["rows"], "rows", 0, MAX_ROWS), columns=columns,
                         config=_map(record.get("config"), "config"),
                         attrs=_map(record.get("attrs"), "attrs"),
                         commit=_int(record.get("commit", 0), "commit", 0, MAX_COMMIT),
                         committed_at=None if committed_at is None else _timestamp(committed_at))
        except (KeyError, TypeError, ValueError, AttributeError, EmbeddingStoreError) as exc:
            raise error(f"{what}: the table description is damaged ({_why(exc)})") from None
        layout.check(error, what)
        return layout

    def check(self, error: type[EmbeddingStoreError], what: str) -> None:
        names = [c.name for c in self.columns]
        problems = []
        if not self.columns or names[0] != MAIN:
            problems.append(f"the first column must be {MAIN!r}")
        if len(set(names)) != len(names):
            problems.append("duplicate column names")
        if self.chunk_rows < 1 or not 0 <= self.rows <= MAX_ROWS or not 0 <= self.commit <= MAX_COMMIT:
            problems.append(f"chunk_rows={self.chunk_rows}, rows={self.rows}, commit={self.commit}")
        if any(c.width < 1 for c in self.columns):
            problems.append("a column has width < 1")
        elif self.columns and self.chunk_rows >= 1 and (too_big := chunk_size_problem(self.chunk_rows, self.row_bytes)):
            problems.append(too_big)
        problems += [f"column {c.name!r}: fill {c.fill!r} is not a finite {c.dtype.name}" for c in self.columns
                     if not _fits(c.fill, c.dtype)]
        if "init" in self.config and self.columns and (bad := init.spec_problem(self.config["init"], self.dtype)):
            problems.append(bad)
        seed = self.config.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            problems.append(f"seed {seed!r} is not an int in [0, 2**64)")
        if any(not isinstance(k, str) for k in self.attrs):
            problems.append("attrs have keys that are not strings")
        if problems:
            raise error(f"{what}: the table description is invalid ({'; '.join(problems)})")


def parse_state(state, what: str) -> tuple[int, int, dict, dict]:
    """``(rows, commit, columns, attrs)`` of a store's ``state`` record, checked as an open checks it.

    A reader catching up with a newer commit reads the record alone (the config is already known).
    """
    try:
        record = _map(state, "the state record")
        rows, commit = _int(record["rows"], "rows", 0, MAX_ROWS), _int(record["commit"], "commit", 0, MAX_COMMIT)
        columns, attrs = _map(record.get("columns"), "columns"), _map(record.get("attrs"), "attrs")
        for name, column in columns.items():
            column = _map(column, f"column {name!r}")
            ColumnSpec(_text(name, "a column name"), _int(column["width"], "a column width", 1),
                       as_dtype(column["dtype"]), _real(column.get("fill", 0.0), "a column fill"))
        if record.get("committed_at") is not None:
            _timestamp(record["committed_at"])
        check_reverts(record.get("reverts"))
    except (KeyError, TypeError, ValueError, AttributeError, EmbeddingStoreError) as exc:
        raise CorruptionError(f"{what}: the store state record is damaged ({_why(exc)})") from None
    return rows, commit, columns, attrs


def check_reverts(reverts) -> None:
    """A state record's ``reverts`` history (core.undo): absent, or ``[[commit, rows], ...]`` of ints."""
    if reverts is None:
        return
    for entry in _list(reverts, "reverts"):
        pair = _list(entry, "a reverts entry")
        if len(pair) != 2:
            raise ValueError(f"a reverts entry is {entry!r}, not [commit, rows]")
        _int(pair[0], "a reverted commit", 0, MAX_COMMIT)
        _int(pair[1], "reverted rows", 0, MAX_ROWS)


# -- strict field parsers: a record's fields have exactly these types -------------------
def _why(exc: BaseException) -> str:
    return f"missing {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"


def _int(value, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} is {value!r}, not an int")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} {value} is out of range [{low}, {high if high is not None else 'inf'}]")
    return value


def _real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} is {value!r}, not a number")
    return float(value)


def _text(value, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} is {value!r}, not a non-empty string")
    return value


def _map(value, name: str) -> dict:
    if value is None:  # absent
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{name} is {type(value).__name__}, not a map")
    return dict(value)


def _list(value, name: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} is {type(value).__name__}, not a list")
    return list(value)


def _timestamp(value) -> float:
    """A commit time (Unix seconds) that ``datetime`` can show."""
    when = _real(value, "committed_at")
    try:
        datetime.datetime.fromtimestamp(when, datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"committed_at {value!r} is not a time") from None
    return value


def _fits(value: float, dtype: np.dtype) -> bool:
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.asarray(value, dtype)))


class TableSource(Protocol):
    """A table read chunk by chunk, in order: a store snapshot, a dump file, an npy directory."""

    layout: TableLayout

    def id_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(chunk, IDs) for every chunk; arrays may be reused: copy what you keep."""

    def chunks(self) -> Iterator[tuple[int, list[np.ndarray]]]:
        """(chunk, one (rows, width) array per column in layout order) for every chunk."""


class TableSink(Protocol):
    """A table written chunk by chunk, in order: a new store, a dump file, an npy directory."""

    def add_ids(self, chunk: int, ids: np.ndarray) -> None: ...

    def add_chunk(self, chunk: int, parts: list[np.ndarray]) -> None: ...

    def finish(self) -> None:
        """Make the written table complete and durable."""

    def close(self) -> None:
        """Release resources; an unfinished sink leaves nothing behind."""


def copy_table(source: TableSource, sink: TableSink, on_chunk=None) -> None:
    """Stream every ID chunk, then every row chunk, from ``source`` into ``sink``, and finish it.

    ``on_chunk(rows)`` is called after each row chunk (progress bars). Memory: one chunk.
    """
    for chunk, ids in source.id_chunks():
        sink.add_ids(chunk, ids)
    for chunk, parts in source.chunks():
        sink.add_chunk(chunk, parts)
        if on_chunk is not None:
            on_chunk(len(parts[0]))
    sink.finish()
