"""What a table is, independent of where it lives: columns, chunking, rows and metadata.

The snapshot reader, the dump file, the npy directory and the store builder all speak in
terms of :class:`TableLayout`, so a table moves between them without any of them knowing
about the others. ``columns[0]`` is always the embeddings; the others are auxiliary
(optimizer state) columns with the same rows and chunking.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..core.inputs import as_dtype
from ..errors import CorruptionError, EmbeddingStoreError
from .chunks import ID_DTYPE
from .records import MAIN

__all__ = ["ColumnSpec", "TableLayout", "TableSource", "TableSink", "copy_table", "chunk_size_problem", "ID_DTYPE",
           "MAX_CHUNK_BYTES"]

#: A chunk is one LMDB value and is decoded (and initialised) whole: beyond this it cannot be a unit of I/O.
MAX_CHUNK_BYTES = 1 << 30


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
        """The layout a store's ``config`` and ``state`` records describe (``CorruptionError`` if damaged)."""
        try:
            columns = {MAIN: {"width": config["dim"], "dtype": config["dtype"], "fill": 0.0}}
            columns.update({n: d for n, d in dict(state.get("columns", {})).items() if n != MAIN})
            record = {"chunk_rows": config["chunk_rows"], "rows": state["rows"], "config": config,
                      "columns": [{"name": n, **d} for n, d in columns.items()],
                      "attrs": state.get("attrs", {}), "commit": state["commit"],
                      "committed_at": state.get("committed_at")}
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise CorruptionError(f"{path}: the store configuration (config/state records) is damaged "
                                  f"(missing {exc})") from None
        return cls.from_record(record, CorruptionError, path)

    @classmethod
    def from_record(cls, record, error: type[EmbeddingStoreError], what: str) -> TableLayout:
        """Parse and check a record; anything wrong raises ``error`` naming ``what``."""
        try:
            columns = tuple(
                ColumnSpec(str(c["name"]), int(c["width"]), as_dtype(c["dtype"]), float(c.get("fill", 0.0)))
                for c in record["columns"])
            layout = cls(chunk_rows=int(record["chunk_rows"]), rows=int(record["rows"]), columns=columns,
                         config=dict(record.get("config") or {}), attrs=dict(record.get("attrs") or {}),
                         commit=int(record.get("commit", 0)), committed_at=record.get("committed_at"))
        except (KeyError, TypeError, ValueError, AttributeError, EmbeddingStoreError) as exc:
            raise error(f"{what}: the table description is damaged ({type(exc).__name__}: {exc})") from None
        layout.check(error, what)
        return layout

    def check(self, error: type[EmbeddingStoreError], what: str) -> None:
        names = [c.name for c in self.columns]
        problems = []
        if not self.columns or names[0] != MAIN:
            problems.append(f"the first column must be {MAIN!r}")
        if len(set(names)) != len(names):
            problems.append("duplicate column names")
        if self.chunk_rows < 1 or self.rows < 0 or self.commit < 0:
            problems.append(f"chunk_rows={self.chunk_rows}, rows={self.rows}, commit={self.commit}")
        if any(c.width < 1 for c in self.columns):
            problems.append("a column has width < 1")
        elif self.columns and self.chunk_rows >= 1 and (too_big := chunk_size_problem(self.chunk_rows, self.row_bytes)):
            problems.append(too_big)
        if problems:
            raise error(f"{what}: the table description is invalid ({'; '.join(problems)})")


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
