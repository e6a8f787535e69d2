"""Building a complete store from a stream of chunks (create, restore, imports).

The store is written into a directory that is not yet visible at its final path (the
caller swaps it in with ``processes.staging`` once it is complete and verified). Chunks
arrive in order and are appended in write transactions of bounded size, so memory stays
bounded whatever the table size; the metadata records go last, so a directory without
them is never mistaken for a store.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import lmdb
import numpy as np

from ..errors import EmbeddingStoreError, StorageError
from ..format import init
from ..format.chunks import ID_DTYPE, ChunkEncoder, chunk_key
from ..format.layout import ColumnSpec, TableLayout
from ..format.records import IDS_DB, MAIN, META_DB, column_db_name, format_record, pack_record
from ..fsutil import fsync_dir
from ..version import __version__
from . import environment
from .memory import return_free_heap
from .space import SpaceBudget
from .transaction import WriteTransaction

_TXN_BYTES = 64 << 20
_FIRST_MAP_MAX = 1 << 30  # the map starts at most this large and grows with what is written


class StoreBuilder:
    def __init__(self, directory: str, layout: TableLayout):
        self.directory, self.layout = directory, layout
        table_bytes = layout.rows * (layout.row_bytes + ID_DTYPE.itemsize)
        environment.preallocate_lock_file(directory)  # a sparse one is SIGBUS on a full disk
        # Not synced per transaction: nothing here is visible until finish() has synced the
        # whole environment and the caller has swapped the directory in; the kernel writes
        # back in the background while we encode, instead of one fsync per transaction.
        # The layout's row count is a claim (a dump read from a pipe cannot be sized up front): the
        # map starts from it, bounded, and each transaction makes room for what it will write (_put).
        first_map = min(SpaceBudget.build_map_size(table_bytes), _FIRST_MAP_MAX)
        env = lmdb.open(directory, subdir=True, map_size=first_map,
                        max_dbs=environment.MAX_DBS, max_readers=environment.MAX_READERS, sync=False,
                        metasync=False, writemap=False, meminit=False, max_spare_txns=0)
        # not in the registry: this process's only handle on a directory nobody else sees yet
        self._env = environment.SharedEnv(directory, env, writable=True, readahead=True, writemap=False)
        self._column_dbs = [column_db_name(c.name) for c in layout.columns]
        self._pending: WriteTransaction | None = None
        self._txn_bytes = 0
        self._room = 0  # map bytes the pending transaction was given and has not used yet
        self._next_ids = self._next_chunk = 0
        self._encoder = ChunkEncoder()

    def _transaction(self, need: int = 0) -> WriteTransaction:
        """The pending transaction, with map room for ``need`` more bytes (else the next one, given room)."""
        if self._pending is not None and need > self._room:
            self._commit_pending()
        if self._pending is None:
            self._room = max(need, 2 * _TXN_BYTES)
            self._pending = WriteTransaction(self._env).begin(headroom=self._room)
        self._room -= need
        return self._pending

    def _commit_pending(self) -> None:
        pending, self._pending, self._txn_bytes = self._pending, None, 0
        pending.commit()

    def _put(self, db_name: bytes, chunk: int, rows: np.ndarray) -> None:
        value = self._encoder.encode(rows, chunk, 0)
        need = 2 * len(value) + self._env.budget.page_size + SpaceBudget.VALUE_HEADER  # leaf node or overflow pages
        self._transaction(need).put(db_name, chunk_key(chunk), value, append=True)
        self._txn_bytes += len(value)
        if self._txn_bytes >= _TXN_BYTES:
            self._commit_pending()

    def add_ids(self, chunk: int, ids: np.ndarray) -> None:
        """The IDs of chunk ``chunk`` (chunks in order)."""
        if chunk != self._next_ids or len(ids) != self.layout.chunk_len(chunk):
            raise EmbeddingStoreError(f"store builder: id chunk {chunk} out of order or of the wrong length")
        self._put(IDS_DB, chunk, np.ascontiguousarray(ids, ID_DTYPE).reshape(-1, 1))
        self._next_ids += 1

    def add_chunk(self, chunk: int, parts: list[np.ndarray]) -> None:
        """The rows of chunk ``chunk``: one array per column, in the layout's order (chunks in order)."""
        n = self.layout.chunk_len(chunk)
        if chunk != self._next_chunk:
            raise EmbeddingStoreError(f"store builder: chunk {chunk} out of order")
        for column, db, part in zip(self.layout.columns, self._column_dbs, parts, strict=True):
            if part.shape != (n, column.width):
                raise EmbeddingStoreError(f"store builder: chunk {chunk} of column {column.name!r} has shape "
                                          f"{part.shape}, expected ({n}, {column.width})")
            self._put(db, chunk, np.ascontiguousarray(part, column.dtype))
        self._next_chunk += 1

    def finish(self) -> None:
        """Write the metadata, flush everything to disk and close the environment."""
        layout = self.layout
        if (self._next_ids, self._next_chunk) != (layout.n_chunks, layout.n_chunks):
            raise EmbeddingStoreError(f"store builder: only {self._next_chunk} of {layout.n_chunks} chunks given")
        config = dict(layout.config)
        config.update(dim=layout.dim, dtype=layout.dtype.name, chunk_rows=layout.chunk_rows)
        config.setdefault("init", {"kind": "normal", "std": init.NORMAL_STD, "name": "array"})
        config.setdefault("seed", 0)
        config.setdefault("library_version", __version__)
        config.setdefault("created_at", time.time())
        # a new store is a new table, even when restored from a dump of another: readers that had
        # the store replaced at this path open tell the two apart by it (compact copies it as it is)
        config["store_uuid"] = uuid.uuid4().hex
        state = {"commit": layout.commit, "rows": layout.rows,
                 "committed_at": layout.committed_at if layout.committed_at is not None else time.time(),
                 "attrs": layout.attrs, "columns": {c.name: c.describe() for c in layout.columns}}
        pending, self._pending = self._transaction(), None
        for name in (IDS_DB, *self._column_dbs):
            pending.db(name)  # every database exists, even those of an empty table
        for key, record in ((b"format", format_record()), (b"config", config), (b"state", state)):
            pending.put(META_DB, key, pack_record(record))
        pending.commit()
        self._env.env.sync(True)
        self.close()
        fsync_dir(self.directory)

    def close(self) -> None:
        """Abandon (if not finished) and close; the caller removes the directory."""
        if self._pending is not None:
            self._pending.abort()
            self._pending = None
        if self._env is not None:
            self._env.close()
            self._env = None
            return_free_heap()


def build_new_table(directory: str, ids: np.ndarray | int, dim: int, dtype: np.dtype, chunk_rows: int, spec: dict,
                    seed: int, values: np.ndarray | None, on_chunk: Callable[[int], None] | None = None) -> None:
    """Write ``create``'s new store into the (empty) ``directory``, one chunk at a time.

    ``ids``: the IDs in row order, or an int N for 0..N-1 (made a chunk at a time). The
    initial values come from ``spec``/``seed`` chunk by chunk (``format.init``), or from
    ``values`` (row i of ``ids[i]``), so memory stays bounded whatever the table size.
    ``on_chunk(rows)`` is called after each chunk of rows is written (progress bars).
    """
    n = ids if isinstance(ids, int) else len(ids)
    layout = TableLayout(chunk_rows=chunk_rows, rows=n, columns=(ColumnSpec(MAIN, dim, dtype),),
                         config={"init": spec, "seed": seed})
    try:
        _build(directory, layout, ids, dim, dtype, chunk_rows, spec, seed, values, on_chunk or (lambda rows: None))
    except lmdb.Error as exc:  # e.g. the disk filled up: the caller removes the directory
        raise StorageError(f"writing the new store in {directory} failed ({exc}); nothing was changed at the "
                           "target") from None


def _build(directory, layout, ids, dim, dtype, chunk_rows, spec, seed, values, on_chunk) -> None:
    n = layout.rows
    builder = StoreBuilder(directory, layout)
    try:
        for chunk in range(layout.n_chunks):
            lo, hi = chunk * chunk_rows, min(n, (chunk + 1) * chunk_rows)
            builder.add_ids(chunk, np.arange(lo, hi, dtype=np.int64) if isinstance(ids, int) else ids[lo:hi])
        for chunk in range(layout.n_chunks):
            lo, hi = chunk * chunk_rows, min(n, (chunk + 1) * chunk_rows)
            if values is None:
                rows = init.chunk_values(spec, seed, chunk, chunk_rows, dim, 0, hi - lo, dtype)
            else:
                rows = values[lo:hi]
            builder.add_chunk(chunk, [rows])
            on_chunk(hi - lo)
        builder.finish()
    finally:
        builder.close()
