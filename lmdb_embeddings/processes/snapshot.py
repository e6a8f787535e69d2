"""A consistent read-only view of a store's committed state, read chunk by chunk.

Everything is read inside ONE LMDB read transaction, so a writer committing in another
process meanwhile changes nothing we see (LMDB keeps the snapshot's pages alive until the
transaction ends). Rows come as zero-copy views into LMDB's memory map; after a chunk has
been consumed, :meth:`Snapshot.release` drops its pages from this process's resident set
so reading a table larger than RAM keeps the memory bounded.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from contextlib import ExitStack

import lmdb
import numpy as np

from ..errors import CorruptionError, NotAStoreError
from ..format.chunks import read_chunk, read_id_chunk
from ..format.layout import ColumnSpec, TableLayout
from ..format.records import DATA_FILE, IDS_DB, MAIN, META_DB, check_store_dir, column_db_name, read_metadata
from . import environment

_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE
_RELEASE_EVERY = 16 << 20
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _madvise = _libc.madvise
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
except (OSError, AttributeError):  # pragma: no cover - non-Linux
    _madvise = None


def read_layout(txn, meta_db, path: str) -> TableLayout:
    """The table's layout from the metadata records, checked as ``EmbeddingStore.open`` checks them."""
    return TableLayout.from_metadata(*read_metadata(txn, meta_db, path), path)


def _mappings_of(path: str) -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of ``path``."""
    real = os.path.realpath(path)
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n") == real:
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        pass
    return ranges


class Snapshot:
    """Context manager over one read transaction of the store at ``path``."""

    def __init__(self, path: str):
        self.path = os.path.abspath(os.fspath(path))
        check_store_dir(self.path)
        self._shared = environment.acquire(self.path, write=False)
        self._txn = None
        self._dbs: dict[str, object] = {}
        self._lease = ExitStack()  # the environment's snapshot lease, held until close()
        self._read_bytes = 0  # read from the map since the last release_pages()
        try:
            self._begin()
        except BaseException:
            self.close()
            raise

    def _begin(self) -> None:
        shared = self._shared
        # Leased from before the first LMDB call: a fork while this thread is inside one must
        # leave the environment alone in the child (py-lmdb's close there would wait for the call).
        self._lease.enter_context(shared.snapshot_lease())
        try:
            self._meta_db, self._ids_db = shared.cached_db(META_DB), shared.cached_db(IDS_DB)
            if self._meta_db is None or self._ids_db is None:
                raise NotAStoreError(f"{self.path} is an LMDB environment but not an lmdb_embeddings store")
            for _attempt in range(100):  # a column created by a concurrent commit: open it, start over
                self._txn = shared.begin_read()
                self.layout = read_layout(self._txn, self._meta_db, self.path)
                missing = [column_db_name(c.name) for c in self.layout.columns
                           if shared.cached_db(column_db_name(c.name)) is None
                           and self._txn.get(column_db_name(c.name)) is not None]
                if not missing:
                    self._dbs = {c.name: shared.cached_db(column_db_name(c.name)) for c in self.layout.columns}
                    return
                self._txn.abort()
                self._txn = None
                shared.open_dbs(missing)  # database handles are opened outside transactions
            raise CorruptionError(f"{self.path}: the column list keeps changing; try again")  # pragma: no cover
        except lmdb.Error as exc:
            raise CorruptionError(f"{self.path}: cannot read the LMDB environment ({exc})") from None

    @property
    def txn(self):
        return self._txn

    def db_of(self, column: ColumnSpec):
        """The column's LMDB database, or None if it never received a chunk (all ``fill``)."""
        return self._dbs.get(column.name)

    @property
    def ids_db(self):
        return self._ids_db

    @property
    def meta_db(self):
        return self._meta_db

    @property
    def shared_env(self) -> environment.SharedEnv:
        return self._shared

    def read(self, db, chunk: int, width: int, dtype: np.dtype, where: str = ""):
        """The checked ``(header, row view)`` of chunk ``chunk`` in ``db``, or None if never written."""
        found = read_chunk(self._txn, db, chunk, width, dtype, where)
        if found is not None:
            self._read_bytes += found[0].payload_len + (1 << 20)  # + the fault-around of each lookup
        return found

    def ids_chunk(self, chunk: int) -> np.ndarray:
        """IDs of chunk ``chunk`` (a view into the map; valid while the snapshot is open)."""
        n = self.layout.chunk_len(chunk)
        self._read_bytes += 8 * n + (1 << 20)
        return read_id_chunk(self._txn, self._ids_db, chunk, n, self.path)

    def column_chunk(self, chunk: int, column: ColumnSpec) -> np.ndarray:
        """Rows of ``column`` in chunk ``chunk``, as a reader of the store would see them.

        Chunks never written (auxiliary columns) or written before rows were added are
        completed with the column's ``fill``, exactly as ``EmbeddingStore`` reads them.
        """
        n = self.layout.chunk_len(chunk)
        where = "" if column.name == MAIN else f" of column {column.name!r}"
        found = self.read(self._dbs.get(column.name), chunk, column.width, column.dtype, where)
        if found is None:
            if column.name == MAIN:
                raise CorruptionError(f"{self.path}: chunk {chunk} is missing from the store")
            return np.full((n, column.width), column.fill, column.dtype)
        rows = found[1]
        if len(rows) > n:
            raise CorruptionError(f"{self.path}: chunk {chunk}{where} holds {len(rows)} rows, expected {n}")
        if len(rows) < n:
            full = np.full((n, column.width), column.fill, column.dtype)
            full[: len(rows)] = rows
            return full
        return rows

    def id_chunks(self):
        """(chunk, IDs) of every chunk, in order (a :class:`~lmdb_embeddings.format.layout.TableSource`)."""
        for chunk in range(self.layout.n_chunks):
            yield chunk, self.ids_chunk(chunk)
            self.release_pages()

    def chunks(self, columns: tuple[ColumnSpec, ...] | None = None):
        """(chunk, one array per column) of every chunk, in order, as a reader of the store sees them.

        ``columns``: only those (default: all of the layout's).
        """
        for chunk in range(self.layout.n_chunks):
            yield chunk, [self.column_chunk(chunk, c) for c in columns or self.layout.columns]
            self.release_pages()

    def release_pages(self, force: bool = False) -> None:
        """Drop the data file's mapped pages from our resident set, once enough was read.

        LMDB maps the file read-only and shared (no ``writemap``), so ``MADV_DONTNEED``
        only unmaps pages: the data stays in the file and the page cache, and any later
        access (even through a view still held) faults it back in unchanged. The whole
        mapping is released, not just the values read, because the kernel maps
        neighbouring pages on each fault (fault-around). The range comes from
        /proc/self/maps, so nothing but the data file's mapping is ever touched.
        """
        if _madvise is None or (self._read_bytes < _RELEASE_EVERY and not force):
            return
        self._read_bytes = 0
        # looked up each time: the map moves if this process's environment was resized
        for lo, hi in _mappings_of(os.path.join(self._shared.path, DATA_FILE)):
            _madvise(lo, hi - lo, _MADV_DONTNEED)

    def close(self) -> None:
        if self._txn is not None:
            self._txn.abort()
            self._txn = None
        self._lease.close()
        if self._shared is not None:
            environment.release(self._shared)
            self._shared = None

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
