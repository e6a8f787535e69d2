"""The table source/sink contract as a reusable pytest suite: subclass :class:`TableContract`.

Every :class:`~lmdb_embeddings.format.layout.TableSink` must write a table that its matching
:class:`~lmdb_embeddings.format.layout.TableSource` reads back bit-exact: layout, IDs, every
column's rows. The suite runs each pair (``KINDS``) over tables that stress the corners:
several dtypes, auxiliary columns with a fill, a partial last chunk, IDs far from 0 and
negative, a single row, and an empty table. A new file format adds its pair to ``KINDS``,
saying what of a table its files keep (:class:`Kind`): the upstream CoSiR files hold the
main column only, and the memmap files hold it as float32; what they keep comes back bit-exact.
The ``.pt`` chunk files need torch: without it their pair is skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable

import numpy as np
import pytest

from ..format import dump_file, memmap_dir, npy_dir
from ..format.layout import ColumnSpec, TableLayout
from ..format.records import MAIN
from ..processes.builder import StoreBuilder
from ..processes.snapshot import Snapshot


def _layout(rows: int, chunk_rows: int, dtype: str, aux: bool) -> TableLayout:
    columns = [ColumnSpec(MAIN, 8, np.dtype(dtype))]
    if aux:
        columns += [ColumnSpec("opt.exp_avg", 8, np.dtype("float32"), 0.0),
                    ColumnSpec("opt.sum", 3, np.dtype("float64"), 0.5)]
    return TableLayout(chunk_rows=chunk_rows, rows=rows, columns=tuple(columns),
                       config={"init": {"kind": "zeros"}, "seed": 0}, attrs={"opt.step": 12, "note": "x"}, commit=5)


TABLES = {
    "float32": _layout(1000, 64, "float32", aux=False),
    "float16+aux": _layout(333, 50, "float16", aux=True),
    "float64+aux": _layout(130, 64, "float64", aux=True),
    "one-row": _layout(1, 64, "float32", aux=False),
    "empty": _layout(0, 64, "float32", aux=True),
}


def _content(layout: TableLayout, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(layout.rows, dtype=np.int64) * 7919 - 10**12)
    if layout.rows:
        ids[0] = np.iinfo(np.int64).max
    rows = [rng.standard_normal((layout.rows, c.width)).astype(c.dtype) for c in layout.columns]
    return ids, rows


def _write(sink, layout: TableLayout, ids: np.ndarray, rows: list[np.ndarray]) -> None:
    try:
        for chunk in range(layout.n_chunks):
            lo, hi = chunk * layout.chunk_rows, chunk * layout.chunk_rows + layout.chunk_len(chunk)
            sink.add_ids(chunk, ids[lo:hi])
        for chunk in range(layout.n_chunks):
            lo, hi = chunk * layout.chunk_rows, chunk * layout.chunk_rows + layout.chunk_len(chunk)
            sink.add_chunk(chunk, [r[lo:hi] for r in rows])
        sink.finish()
    finally:
        sink.close()


@contextlib.contextmanager
def _store(tmp, layout, ids, rows):
    os.mkdir(tmp)
    _write(StoreBuilder(tmp, layout), layout, ids, rows)
    with Snapshot(tmp) as source:
        yield source


@contextlib.contextmanager
def _dump(tmp, layout, ids, rows):
    with open(tmp, "wb") as f:
        _write(dump_file.DumpWriter(f, layout, {"test": True}), layout, ids, rows)
    with dump_file.DumpReader(tmp) as source:
        yield source


@contextlib.contextmanager
def _npy(tmp, layout, ids, rows):
    _write(npy_dir.NpyTableWriter(tmp, layout, {"test": True}), layout, ids, rows)
    read_layout, checksums = npy_dir.read_layout(tmp, None)
    source = npy_dir.NpyTableReader(tmp, read_layout, checksums)
    try:
        yield source
    finally:
        source.close()


@contextlib.contextmanager
def _memmap(tmp, layout, ids, rows):
    os.mkdir(tmp)
    _write(memmap_dir.MemmapDirWriter(tmp, layout), layout, ids, rows)
    with memmap_dir.MemmapDirReader(tmp, layout.chunk_rows) as source:
        yield source


@contextlib.contextmanager
def _cosir(tmp, layout, ids, rows):
    chunk_files = pytest.importorskip("lmdb_embeddings.compat.files.cosir_chunks", reason="the .pt files need torch")
    os.mkdir(tmp)
    _write(chunk_files.CosirChunkWriter(tmp, layout), layout, ids, rows)
    files = chunk_files.find_chunk_files(tmp)
    with chunk_files.CosirChunkReader(files, spill_dir=tmp, chunk_rows=layout.chunk_rows) as source:
        yield source


@dataclasses.dataclass(frozen=True)
class Kind:
    """A sink/source pair, and what of a table its files keep."""

    roundtrip: Callable  # (path, layout, ids, rows) -> a context manager yielding the source
    metadata: bool = True  # auxiliary columns, attrs, commit (False: the main column only)
    dtype: str | None = None  # the one dtype the files hold (None: the table's)
    empty: bool = True  # an empty table comes back (False: the files cannot tell its dim)

    def kept(self, layout: TableLayout, rows: list[np.ndarray]) -> tuple[TableLayout, list[np.ndarray]]:
        """The table that comes back from ``layout`` and ``rows``."""
        if not self.metadata:
            layout = dataclasses.replace(layout, columns=layout.columns[:1], attrs={}, commit=0)
            rows = rows[:1]
        if self.dtype is not None:
            main = dataclasses.replace(layout.columns[0], dtype=np.dtype(self.dtype))
            layout = dataclasses.replace(layout, columns=(main, *layout.columns[1:]))
            rows = [rows[0].astype(self.dtype), *rows[1:]]
        return layout, rows


KINDS = {"store": Kind(_store), "dump": Kind(_dump), "npy": Kind(_npy),
         "memmap": Kind(_memmap, metadata=False, dtype="float32"),
         "cosir": Kind(_cosir, metadata=False, empty=False)}


class TableContract:
    """Write with a sink, read with its source, compare with what the kind keeps (see the module docstring)."""

    @pytest.fixture(params=list(TABLES))
    def table(self, request):
        layout = TABLES[request.param]
        return (layout, *_content(layout))

    @pytest.fixture(params=list(KINDS))
    def kind(self, request) -> Kind:
        return KINDS[request.param]

    @pytest.fixture
    def kept(self, kind, table):
        layout, ids, rows = table
        if layout.rows == 0 and not kind.empty:
            pytest.skip("these files cannot hold an empty table (they do not tell its dim)")
        return (*kind.kept(layout, rows), ids)

    @pytest.fixture
    def roundtrip(self, tmp_path, kind, table, kept):
        layout, ids, rows = table
        with kind.roundtrip(str(tmp_path / "table"), layout, ids, rows) as source:
            got_ids = [c.copy() for _, c in source.id_chunks()]
            got_chunks = [[p.copy() for p in parts] for _, parts in source.chunks()]
            yield source.layout, got_ids, got_chunks

    def test_layout_comes_back(self, kept, roundtrip):
        layout = kept[0]
        got, _, _ = roundtrip
        assert (got.chunk_rows, got.rows, got.n_chunks) == (layout.chunk_rows, layout.rows, layout.n_chunks)
        assert [(c.name, c.width, c.dtype, c.fill) for c in got.columns] == \
               [(c.name, c.width, c.dtype, c.fill) for c in layout.columns]
        assert got.attrs == layout.attrs and got.commit == layout.commit

    def test_ids_come_back_in_row_order(self, kept, roundtrip):
        ids = kept[2]
        _, got_ids, _ = roundtrip
        joined = np.concatenate(got_ids) if got_ids else np.empty(0, np.int64)
        assert joined.dtype == np.int64 and np.array_equal(joined, ids)

    def test_every_column_comes_back_bit_exact(self, kept, roundtrip):
        layout, rows, _ = kept
        _, _, got_chunks = roundtrip
        assert len(got_chunks) == layout.n_chunks
        for i, column in enumerate(layout.columns):
            parts = [parts[i] for parts in got_chunks]
            joined = np.concatenate(parts) if parts else np.empty((0, column.width), column.dtype)
            assert joined.dtype == column.dtype
            assert joined.tobytes() == rows[i].tobytes(), column.name
