"""EmbeddingStore: a chunked, cached, transactional embedding table in one LMDB environment.

How the pieces fit (docs/ARCHITECTURE.md has the long form):

* rows live in chunks of ``chunk_rows`` row slots; chunk ``c`` of a column is one LMDB
  value (``chunk_codec``) in that column's named database;
* sample IDs map to row slots through ``IdIndex``; the IDs themselves are stored in
  chunks too, so ``add`` rewrites only the last chunks;
* every column has a ``ColumnCache`` (L1 slab + L2 victim cache); ``put`` writes into
  L1 and marks chunks dirty; ``commit`` writes all dirty chunks, the new IDs and the
  state record in ONE write transaction with one fsync;
* besides the embeddings, a store can hold auxiliary columns (optimizer state) with the
  same chunking, committed atomically with the rows.

Concurrency: one writable handle per store (``WriterLock``); any number of read-only
handles in any process, each ``get`` running in one short read transaction, so it sees
exactly one commit and never pins old pages.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import lmdb
import msgpack
import numpy as np
import xxhash

from . import chunk_codec, environment, initializers
from .column_cache import CacheStats, ColumnCache
from .errors import (
    ClosedError,
    CommitError,
    CorruptionError,
    EmbeddingStoreError,
    FormatVersionError,
    InvalidInputError,
    NotAStoreError,
    ReadOnlyError,
    StoreExistsError,
    StoreNotFoundError,
    WriterLockedError,
)
from .fsutil import free_bytes, remove_stale_temps, sibling_temp
from .id_index import IdIndex
from .inputs import as_dtype, as_ids, as_positive_int, as_values, check_unique
from .options import StoreOptions
from .writer_lock import WriterLock, holder_pid, replace_store

log = logging.getLogger(__name__)

MAGIC = "lmdb_embeddings"
FORMAT_VERSION = 1
META_DB = b"meta"
IDS_DB = b"ids"
MAIN = "embeddings"
_RECORD_CHECKSUM = "xxh3"
UNDO_DB = b"undo"  # pre-images of what the last commit overwrote (open option undo_log=True)
_UNDO_MARK = b"m"  # the undo log's own record: which commit it undoes
_UNDO_ENTRY = b"k"  # prefix of an entry: b"k" + u16 len(db name) + db name + key
_UNDO_ABSENT, _UNDO_VALUE = b"\x00", b"\x01"  # first byte of an entry's value


def column_db_name(name: str) -> bytes:
    return b"col:" + name.encode()


class _Column:
    """One chunked column: the embeddings, or an auxiliary (optimizer state) column."""

    def __init__(self, name: str, width: int, dtype: np.dtype, cache: ColumnCache, fill: float = 0.0):
        self.name, self.width, self.dtype, self.cache, self.fill = name, width, dtype, cache, fill
        self.db_name = column_db_name(name)

    def describe(self) -> dict:
        return {"width": self.width, "dtype": self.dtype.name, "fill": self.fill}


class EmbeddingStore:
    """A per-sample trainable embedding table stored in LMDB.

    Create one with :meth:`create`, open an existing one with :meth:`open`. A writable
    handle is exclusive across processes; read-only handles are unlimited and see the
    latest committed state. Handles pickle as (path, options) and reopen read-only in the
    receiving process; after ``fork`` a handle reopens too and never touches its parent's
    LMDB environment. One handle may be shared by threads (calls are serialized).

    Example:
        >>> store = EmbeddingStore.create("/tmp/emb", 1000, 64)
        >>> rows = store.get([3, 1, 4])
        >>> store.put([3], rows[:1] + 0.1)
        >>> store.commit()
        >>> store.close()
    """

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, path, ids, dim, *, dtype="float32", chunk_rows=1024, init="normal", seed=0,
               overwrite=False, **open_options) -> EmbeddingStore:
        """Build a new store at ``path`` and return a writable handle on it.

        The store is built in a hidden sibling directory and renamed into place only when
        complete, so a crash during ``create`` never leaves a half store at ``path``.

        Args:
            path: directory of the store (created).
            ids: ``int`` N for IDs 0..N-1, or a 1-D sequence/array/tensor of unique int64 IDs.
            dim: row width. dtype: ``"float32"``, ``"float16"`` or ``"float64"``.
            chunk_rows: row slots per chunk (one LMDB value each).
            init: ``"normal"``, ``"zeros"``, ``"uniform"``, ``"xavier"``, ``"kaiming"`` or an
                array of shape (len(ids), dim). seed: same seed, same table.
            overwrite: replace an existing store (refused while a writer holds it).
        Raises:
            FileExistsError: a store (or other files) exist at ``path`` and not ``overwrite``.
            ValueError: bad ids, dim, dtype, chunk_rows or init.
        """
        options = StoreOptions.from_kwargs(open_options)
        id_array, dim, dt, chunk_rows, spec, seed, values = check_create_args(ids, dim, dtype, chunk_rows, init, seed)
        path = os.path.abspath(os.fspath(path))
        check_replace_target(path, overwrite, "pass overwrite=True")

        remove_stale_temps(path, "creating")  # left by a create that was killed
        tmp = sibling_temp(path, "creating")
        try:
            _build_store(tmp, id_array, dim, dt, chunk_rows, spec, int(seed), values)
            replace_store(tmp, path)
        finally:
            if os.path.exists(tmp):
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        return cls.open(path, **options.as_kwargs())

    @classmethod
    def open(cls, path, *, readonly=False, **open_options) -> EmbeddingStore:
        """Open an existing store.

        Raises:
            FileNotFoundError: no store at ``path``.
            EmbeddingStoreError: a writer already holds it (naming its pid), the directory
                is not a store, or it was written by a newer format version.
        """
        options = StoreOptions.from_kwargs(open_options)
        store = cls.__new__(cls)
        store._setup(os.path.abspath(os.fspath(path)), bool(readonly), options)
        store._attach()
        return store

    def _setup(self, path: str, readonly: bool, options: StoreOptions) -> None:
        self._path, self._readonly, self._options = path, readonly, options
        self._mutex = threading.RLock()
        self._pid = os.getpid()
        self._env: environment.SharedEnv | None = None
        self._lock: WriterLock | None = None
        self._closed = False
        self._attached = False
        self._stats = CacheStats()
        self._columns: dict[str, _Column] = {}
        self._pending: lmdb.Transaction | None = None
        self._spilled = 0
        self._commits = 0
        self._bytes_committed = 0
        self._since_commit = 0
        self._attrs: dict = {}
        self._columns_changed = False
        self._attrs_changed = False
        self._dbs_in_pending: list[str] = []

    def _attach(self) -> None:
        """Open the environment and load the metadata (in the current process)."""
        path = self._path
        if not os.path.isdir(path) or not os.path.exists(os.path.join(path, environment.DATA_FILE)):
            if os.path.isdir(path) and os.listdir(path):
                raise NotAStoreError(f"{path} is not an lmdb_embeddings store (no {environment.DATA_FILE})")
            raise StoreNotFoundError(f"no store at {path}; create one with EmbeddingStore.create")
        if not self._readonly:
            self._lock = WriterLock(path)
            self._lock.acquire()
        try:
            if not self._readonly and not os.access(path, os.W_OK):
                raise ReadOnlyError(f"{path} is not writable by this user; open it with readonly=True")
            self._env = environment.acquire(path, write=not self._readonly, readahead=self._options.readahead)
            self._load_metadata()
        except BaseException:
            self._detach()
            raise
        self._attached = True
        self._pid = os.getpid()

    def _load_metadata(self) -> None:
        env = self._env
        try:
            if env.cached_db(META_DB) is None or env.cached_db(IDS_DB) is None:
                raise NotAStoreError(f"{self._path} is an LMDB environment but not an lmdb_embeddings store")
            with env.reading() as txn:
                config, state = read_metadata(txn, self._meta_db, self._path)
        except lmdb.Error as exc:
            raise CorruptionError(f"{self._path}: cannot read the metadata: {exc}") from exc
        try:
            self._dim = int(config["dim"])
            self._dtype = as_dtype(config["dtype"])
            self._chunk_rows = int(config["chunk_rows"])
            self._init = dict(config["init"])
            self._seed = int(config["seed"])
        except (KeyError, TypeError, ValueError, EmbeddingStoreError) as exc:
            raise CorruptionError(f"{self._path}: the store configuration is damaged ({exc})") from None
        try:
            self._commit = int(state["commit"])
            self._rows = self._committed_rows = int(state["rows"])
            self._committed_at = state.get("committed_at")
            self._attrs = dict(state.get("attrs", {}))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptionError(f"{self._path}: the store state record is damaged ({exc!r})") from None
        self._index = IdIndex(self._read_ids(0, self._rows))
        self._columns = {}
        self._register_column(MAIN, self._dim, self._dtype, 0.0)
        for name, desc in state.get("columns", {}).items():
            if name != MAIN:
                self._register_column(name, int(desc["width"]), as_dtype(desc["dtype"]), float(desc.get("fill", 0.0)))

    def _register_column(self, name: str, width: int, dtype: np.dtype, fill: float) -> _Column:
        cache = ColumnCache(width, dtype, self._chunk_rows, 0, 0, self._stats)
        # a weak reference: a strong one (store -> cache -> spill -> store) would keep a dropped
        # handle, and so the writer lock it holds, alive until the garbage collector runs
        cache.spill = functools.partial(_spill_into, weakref.ref(self), name)
        column = self._columns[name] = _Column(name, width, dtype, cache, fill)
        self._split_cache_budget()
        return column

    def _cache_tiers(self) -> tuple[int, int]:
        """This handle's (L1, L2) byte budgets, the default sized from the table now."""
        row_bytes = sum(c.width * c.dtype.itemsize for c in self._columns.values())
        cache_mb = self._options.resolved_cache_mb(row_bytes * self._rows, self.readonly)
        return self._options.tier_bytes(cache_mb)

    def _split_cache_budget(self) -> None:
        """Share the L1/L2 budgets between columns in proportion to their row bytes."""
        self._rows_at_budget = self._rows
        l1, l2 = self._cache_tiers()
        total = sum(c.width * c.dtype.itemsize for c in self._columns.values())
        for column in self._columns.values():
            share = column.width * column.dtype.itemsize / total
            cache = column.cache
            cache.capacity = max(2, int(l1 * share) // cache.chunk_bytes)
            cache.l2_budget = int(l2 * share)

    @property
    def _meta_db(self):
        return self._env.cached_db(META_DB)

    @property
    def _ids_db(self):
        return self._env.cached_db(IDS_DB)

    def _column_db(self, column: _Column):
        """The column's database, or None while it has never been committed."""
        return self._env.cached_db(column.db_name)

    @contextmanager
    def _snapshot(self):
        """Reader: one read transaction on the latest commit, with its state caught up.

        A commit may have declared columns whose databases this process has not opened;
        they can only be opened between transactions, so the snapshot is retaken then.
        """
        while True:
            with self._env.reading() as txn:
                missing = self._refresh(txn)
                if not missing:
                    yield txn
                    return
            self._env.open_dbs(missing)

    def _read_ids(self, start_row: int, stop_row: int) -> np.ndarray:
        """IDs of row slots ``start_row:stop_row`` as committed."""
        if stop_row <= start_row:
            return np.empty(0, np.int64)
        with self._env.reading() as txn:
            return self._read_ids_in(txn, start_row, stop_row)

    # --------------------------------------------------------------- process safety
    def _ready(self) -> None:
        """Called by every public method: reopen after fork/unpickle, refuse if closed."""
        if self._closed:
            raise ClosedError(f"the handle on {self._path} is closed; open the store again")
        if self._pid != os.getpid():
            self._become_child_reader()
        if not self._attached:
            self._attach()

    def _become_child_reader(self) -> None:
        """In a forked child: forget the parent's env, lock and cache; reopen read-only."""
        self._env = None  # environment's fork hook closed the inherited one
        self._lock = None  # writer_lock's fork hook closed our copy of the descriptor
        self._pending = None
        self._attached = False
        self._readonly = True
        self._stats = CacheStats()
        self._columns = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {"path": self._path, "options": self._options.as_kwargs()}

    def __setstate__(self, state: dict) -> None:
        self._setup(state["path"], True, StoreOptions.from_kwargs(state["options"]))

    # ----------------------------------------------------------------- properties
    @property
    def path(self) -> str:
        return self._path

    @property
    def dim(self) -> int:
        self._ready()
        return self._dim

    @property
    def dtype(self) -> np.dtype:
        self._ready()
        return self._dtype

    @property
    def chunk_rows(self) -> int:
        self._ready()
        return self._chunk_rows

    @property
    def readonly(self) -> bool:
        return self._readonly or self._pid != os.getpid()

    @property
    def ids(self) -> np.ndarray:
        """The sample IDs in row order (a copy)."""
        with self._mutex:
            self._ready()
            self._refresh_if_reader()
            return self._index.ids.copy()

    def __len__(self) -> int:
        with self._mutex:
            self._ready()
            self._refresh_if_reader()
            return self._rows

    def __contains__(self, sample_id) -> bool:
        with self._mutex:
            self._ready()
            self._refresh_if_reader()
            try:
                ids = as_ids(sample_id)
            except EmbeddingStoreError:
                return False
            return len(ids) == 1 and bool(self._index.contains(ids)[0])

    def contains(self, ids) -> np.ndarray:
        """A bool array: which of ``ids`` are in the store (this handle's view, uncommitted adds included)."""
        ids = as_ids(ids)
        with self._mutex:
            self._ready()
            self._refresh_if_reader()
            return self._index.contains(ids)

    @property
    def commit_count(self) -> int:
        """Number of commits the store has received since it was created."""
        with self._mutex:
            self._ready()
            self._refresh_if_reader()
            return self._commit

    def __repr__(self) -> str:
        mode = "closed" if self._closed else ("read-only" if self._readonly else "writable")
        return f"EmbeddingStore({self._path!r}, {mode})"

    # --------------------------------------------------------------------- reading
    def get(self, ids) -> np.ndarray:
        """Rows of ``ids`` in order, as a fresh ``(len(ids), dim)`` array of the store dtype.

        Duplicates are allowed. A writable handle sees its own uncommitted puts; a
        read-only handle sees the latest commit, and one call never mixes two commits.

        Raises:
            KeyError: some IDs are not in the store (the message names some of them).
        """
        ids = as_ids(ids)
        with self._mutex:
            self._ready()
            if self._readonly:
                with self._snapshot() as txn:
                    return self._gather(MAIN, self._index.slots(ids), txn)
            return self._gather(MAIN, self._index.slots(ids))

    def get_tensor(self, ids, device=None):
        """Like :meth:`get`, as a ``torch.Tensor`` on ``device`` (CUDA copies go through pinned memory)."""
        import torch

        tensor = torch.from_numpy(self.get(ids))
        if device is None:
            return tensor
        device = torch.device(device)
        if device.type == "cuda":
            return tensor.pin_memory().to(device, non_blocking=True)
        return tensor.to(device)

    def _gather(self, name: str, slots: np.ndarray, txn=None) -> np.ndarray:
        column = self._columns[name]
        out = np.empty((len(slots), column.width), column.dtype)
        for positions, cache_rows, _ in self._locate(column, slots, txn):
            out[positions] = column.cache.slab[cache_rows]
        return out

    def _locate(self, column: _Column, slots: np.ndarray, txn) -> Iterator[tuple]:
        """Yield (positions in ``slots``, rows in the column's slab, cache slots of the chunks).

        All chunks of a call are made resident at once when they fit in L1 (the common
        case: one fancy index); otherwise in groups that fit, one group at a time.
        """
        if len(slots) == 0:
            return
        cr = self._chunk_rows
        chunk_of = slots // cr
        offset = slots - chunk_of * cr
        hot = self._hot_slots(column.cache, chunk_of, offset)
        if hot is not None:
            yield slice(None), hot * cr + offset, hot
            return
        unique, inverse = _unique_inverse(chunk_of)
        capacity = column.cache.capacity
        if len(unique) <= capacity:
            cache_slots = self._resident(column, unique, txn)
            yield slice(None), cache_slots[inverse] * cr + offset, cache_slots
            return
        group = max(1, capacity // 2)
        for start in range(0, len(unique), group):
            part = unique[start : start + group]
            cache_slots = self._resident(column, part, txn)
            positions = np.flatnonzero((inverse >= start) & (inverse < start + len(part)))
            yield positions, cache_slots[inverse[positions] - start] * cr + offset[positions], cache_slots

    def _hot_slots(self, cache: ColumnCache, chunk_of: np.ndarray, offset: np.ndarray):
        """Slab slot of every row's chunk if all are resident and usable as they are, else None.

        The steady state of training: no unique/inverse and no per-chunk work, so a small
        batch costs a handful of numpy calls. Any miss, a row added since its chunk was
        loaded, or (reader) a chunk not yet checked against the latest commit takes the
        general path.
        """
        if int(chunk_of.max()) >= len(cache.chunk_slot):
            return None
        hot = cache.chunk_slot[chunk_of]
        if hot.min() < 0 or not (offset < cache.slot_rows[hot]).all():
            return None
        if self._readonly and (cache.slot_validated[hot] < self._commit).any():
            return None
        cache.touch(hot)
        return hot

    def _resident(self, column: _Column, chunks: np.ndarray, txn) -> np.ndarray:
        cache = column.cache
        if self._readonly:
            self._drop_stale(column, chunks, txn)
        cache.chunk_limit = max(1, (self._rows + self._chunk_rows - 1) // self._chunk_rows)
        slots = cache.ensure(chunks, lambda missing: self._load_chunks(column, missing, txn))
        if self._readonly:
            cache.slot_validated[slots] = self._commit
        held = cache.slot_rows[slots]
        if held.min() >= self._chunk_rows:  # every chunk full: none can lack rows
            return slots
        expected = np.minimum(self._rows - chunks * self._chunk_rows, self._chunk_rows)
        short = np.flatnonzero(held < expected)
        for i in short.tolist():  # chunks grown by add since they were loaded: pad with fill
            slot = int(slots[i])
            base = slot * self._chunk_rows
            cache.slab[base + int(cache.slot_rows[slot]) : base + int(expected[i])] = column.fill
            cache.slot_rows[slot] = expected[i]
        return slots

    def _drop_stale(self, column: _Column, chunks: np.ndarray, txn) -> None:
        """Reader: forget cached chunks rewritten by commits made since they were checked."""
        cache = column.cache
        slots = cache.slots_of(chunks)
        resident = slots >= 0
        check = np.zeros(len(chunks), bool)
        check[resident] = cache.slot_validated[slots[resident]] < self._commit
        in_l2 = [c for c in chunks[~resident].tolist() if c in cache.l2 and cache.l2[c][2] < self._commit]
        if not check.any() and not in_l2:
            return
        db = self._column_db(column)

        def committed_version(chunk: int) -> int:
            value = txn.get(chunk_codec.chunk_key(chunk), db=db) if db is not None else None
            return chunk_codec.read_header(value, chunk).version if value is not None else 0

        stale = []
        for chunk, slot in zip(chunks[check].tolist(), slots[check].tolist(), strict=True):
            if committed_version(chunk) != cache.slot_version[slot]:
                stale.append(chunk)
            else:
                cache.slot_validated[slot] = self._commit
        for chunk in in_l2:
            rows, version, _ = cache.l2[chunk]
            if committed_version(chunk) != version:
                stale.append(chunk)
            else:
                cache.l2[chunk] = (rows, version, self._commit)
        cache.drop(stale)

    def _load_chunks(self, column: _Column, chunks: list, txn) -> Iterator[tuple]:
        """Decoded chunks from LMDB (or fresh fill for chunks never written)."""
        if txn is None:
            if self._pending is not None:
                yield from self._decode_chunks(column, chunks, self._pending)
                return
            with self._env.reading() as read_txn:
                yield from self._decode_chunks(column, chunks, read_txn)
            return
        yield from self._decode_chunks(column, chunks, txn)

    def _decode_chunks(self, column: _Column, chunks: list, txn) -> Iterator[tuple]:
        where = "" if column.name == MAIN else f" of column {column.name!r}"
        db = self._column_db(column)
        for chunk in chunks:
            value = txn.get(chunk_codec.chunk_key(chunk), db=db) if db is not None else None
            if value is None:
                if column.name == MAIN and chunk * self._chunk_rows < self._committed_rows:
                    raise CorruptionError(f"{self._path}: chunk {chunk} is missing from the store")
                yield chunk, np.empty((0, column.width), column.dtype), 0
                continue
            header, rows = chunk_codec.decode_chunk(value, chunk, column.width, column.dtype, where)
            yield chunk, rows, header.version

    def _refresh_if_reader(self) -> None:
        if self._readonly:
            with self._snapshot():
                pass

    def _refresh(self, txn) -> list:
        """Reader: catch up with the commits made since the last call (new IDs, columns).

        Returns the databases of committed columns this process has not opened yet (the
        caller opens them outside the transaction and calls again).
        """
        state = _read_record(txn, b"state", self._meta_db, self._path)
        if state["commit"] == self._commit:
            return []
        missing = [column_db_name(n) for n in state.get("columns", {})
                   if self._env.cached_db(column_db_name(n)) is None]
        if missing:
            return missing
        rows = int(state["rows"])
        if rows < self._rows:  # revert_last_commit removed rows added by the commit it undid
            self._index.truncate(rows)
            for column in self._columns.values():
                column.cache.drop_from(rows // self._chunk_rows)
        if rows > self._rows:
            keep = (self._rows // self._chunk_rows) * self._chunk_rows
            self._index.truncate(keep)
            self._index.append(self._read_ids_in(txn, keep, rows))
        self._rows = self._committed_rows = rows
        self._attrs = dict(state.get("attrs", {}))
        for name, desc in state.get("columns", {}).items():
            if name not in self._columns:
                self._register_column(name, int(desc["width"]), as_dtype(desc["dtype"]), float(desc.get("fill", 0.0)))
        self._commit = int(state["commit"])
        self._committed_at = state.get("committed_at")
        return []

    def _read_ids_in(self, txn, start_row: int, stop_row: int) -> np.ndarray:
        """IDs of row slots ``start_row:stop_row`` as committed in ``txn`` (the chunks covering them)."""
        cr = self._chunk_rows
        first = start_row // cr
        parts = []
        for chunk in range(first, (stop_row - 1) // cr + 1):
            value = txn.get(chunk_codec.chunk_key(chunk), db=self._ids_db)
            if value is None:
                raise CorruptionError(f"{self._path}: id chunk {chunk} is missing")
            parts.append(chunk_codec.decode_chunk(value, chunk, 1, np.dtype("<i8"), " (ids)")[1][:, 0].copy())
        return np.concatenate(parts)[start_row - first * cr : stop_row - first * cr]

    # --------------------------------------------------------------------- writing
    def _check_writable(self, call: str) -> None:
        if self.readonly:
            raise ReadOnlyError(f"{call}: this handle on {self._path} is read-only; open it with readonly=False")

    def put(self, ids, values) -> None:
        """Overwrite the rows of existing ``ids``; durable at the next :meth:`commit`.

        ``values``: numpy array or torch tensor (any device) of shape (len(ids), dim),
        cast to the store dtype. A rejected call changes nothing.

        Raises:
            ValueError: wrong shape, duplicate ids, non-finite values.
            KeyError: unknown ids. PermissionError: read-only handle.
        """
        with self._mutex:
            self._ready()
            self._check_writable("put")
            ids = as_ids(ids)
            check_unique(ids, "put")
            vals = as_values(values, len(ids), self._dim, self._dtype, "put")
            slots = self._index.slots(ids)
            self._scatter(MAIN, slots, vals)
            self._count_update()

    def _scatter(self, name: str, slots: np.ndarray, values: np.ndarray) -> None:
        column = self._columns[name]
        for positions, cache_rows, cache_slots in self._locate(column, slots, None):
            column.cache.slab[cache_rows] = values[positions]
            column.cache.mark_dirty(cache_slots)  # every located chunk receives rows

    def add(self, ids, values=None) -> None:
        """Append NEW ids (readable at once, durable at commit); values default to the init.

        Raises:
            ValueError: an id already exists, duplicates, bad values. PermissionError: read-only.
        """
        with self._mutex:
            self._ready()
            self._check_writable("add")
            new_ids = as_ids(ids)
            self._index.check_new(new_ids)
            if values is None:
                vals = self._init_values(self._rows, len(new_ids))
            else:
                vals = as_values(values, len(new_ids), self._dim, self._dtype, "add")
            if len(new_ids):
                start = self._rows
                self._index.append(new_ids)
                self._rows += len(new_ids)
                self._scatter(MAIN, np.arange(start, self._rows, dtype=np.int64), vals)
            self._count_update()

    def _init_values(self, start: int, count: int) -> np.ndarray:
        cr, out = self._chunk_rows, np.empty((count, self._dim), self._dtype)
        slot = start
        while slot < start + count:
            chunk, off = divmod(slot, cr)
            stop = min(cr, off + (start + count - slot))
            out[slot - start : slot - start + stop - off] = initializers.chunk_values(
                self._init, self._seed, chunk, cr, self._dim, off, stop, self._dtype)
            slot += stop - off
        return out

    def _count_update(self) -> None:
        self._since_commit += 1
        every = self._options.commit_every
        if every is not None and self._since_commit >= every:
            self.commit()

    # ------------------------------------------------------- auxiliary columns (state)
    def ensure_column(self, name: str, width: int, dtype="float32", fill: float = 0.0) -> None:
        """Declare an auxiliary per-row column (e.g. optimizer moments); rows start at ``fill``.

        The column shares the store's IDs and chunking, is committed atomically with the
        embeddings, and is carried by dump/restore. Declaring it again is a no-op.
        """
        with self._mutex:
            self._ready()
            if not name or name == MAIN or "/" in name:
                raise InvalidInputError(f"column name {name!r} is reserved or invalid")
            width = as_positive_int(width, "width")
            dt = as_dtype(dtype)
            existing = self._columns.get(name)
            if existing is not None:
                if (existing.width, existing.dtype) != (width, dt):
                    raise InvalidInputError(
                        f"column {name!r} exists with width {existing.width} and dtype {existing.dtype}, "
                        f"not {width} and {dt}")
                return
            self._check_writable("ensure_column")
            self._register_column(name, width, dt, float(fill))
            self._columns_changed = True

    @property
    def columns(self) -> dict:
        """Auxiliary columns: name -> {width, dtype, fill}."""
        with self._mutex:
            self._ready()
            self._refresh_if_reader()
            return {n: c.describe() for n, c in self._columns.items() if n != MAIN}

    def get_column(self, name: str, ids) -> np.ndarray:
        """Rows of an auxiliary column for ``ids`` (same rules as :meth:`get`)."""
        ids = as_ids(ids)
        with self._mutex:
            self._ready()
            column = self._column(name)
            if self._readonly:
                with self._snapshot() as txn:
                    return self._gather(column.name, self._index.slots(ids), txn)
            return self._gather(column.name, self._index.slots(ids))

    def put_column(self, name: str, ids, values) -> None:
        """Overwrite rows of an auxiliary column (same rules as :meth:`put`, no auto-commit count)."""
        with self._mutex:
            self._ready()
            self._check_writable("put_column")
            column = self._column(name)
            ids = as_ids(ids)
            check_unique(ids, "put_column")
            vals = as_values(values, len(ids), column.width, column.dtype, "put_column")
            self._scatter(name, self._index.slots(ids), vals)

    def _column(self, name: str) -> _Column:
        column = self._columns.get(name)
        if column is None:
            self._refresh_if_reader()
            column = self._columns.get(name)
        if column is None:
            raise InvalidInputError(f"no column {name!r}; declare it with ensure_column first")
        return column

    @property
    def attrs(self) -> dict:
        """Small user metadata (msgpack-able), committed with the rows (e.g. optimizer step)."""
        with self._mutex:
            self._ready()
            self._refresh_if_reader()
            return dict(self._attrs)

    def set_attr(self, key: str, value) -> None:
        with self._mutex:
            self._ready()
            self._check_writable("set_attr")
            try:
                msgpack.packb(value)
            except (TypeError, ValueError) as exc:
                raise InvalidInputError(f"attr {key!r}: value is not msgpack-serializable ({exc})") from None
            self._attrs[str(key)] = value
            self._attrs_changed = True

    # ------------------------------------------------------------------ transactions
    def _spill(self, name: str, chunk: int, rows: np.ndarray) -> None:
        """Write an evicted dirty chunk into the pending write transaction."""
        if self._pending is None:
            # The map cannot grow while this transaction is open, and the caller may keep
            # adding rows (and spilling) before it commits: reserve room for all the disk
            # can hold, so the map is never the limit (the mapping is virtual, not disk).
            self._env.ensure_headroom(free_bytes(self._path) // 2)
        txn = self._pending_txn()
        column = self._columns[name]
        db = self._ensure_db(column, txn)
        key = chunk_codec.chunk_key(chunk)
        self._log_pre_image(txn, column.db_name, db, key)
        txn.put(key, chunk_codec.encode_chunk(rows, chunk, self._commit + 1), db=db)
        self._spilled += 1

    def _ensure_db(self, column: _Column, txn: lmdb.Transaction):
        """The column's database, created inside the pending transaction if new."""
        db = self._column_db(column)
        if db is None:
            db = self._env.create_db(column.db_name, txn)
            self._dbs_in_pending.append(column.db_name)
        return db

    def _pending_txn(self) -> lmdb.Transaction:
        if self._pending is None:
            table = sum(c.width * c.dtype.itemsize for c in self._columns.values()) * max(self._rows, 1)
            self._env.ensure_headroom(table + 16 * max(self._rows, 1) + (8 << 20))
            self._pending = self._env.env.begin(write=True, buffers=True)
            if self._options.undo_log:
                self._start_undo_log(self._pending)
        return self._pending

    # ------------------------------------------------------------------ undo log
    def _start_undo_log(self, txn: lmdb.Transaction) -> None:
        """A new pending transaction: empty the undo log (it described the previous commit)."""
        db = self._env.cached_db(UNDO_DB)
        if db is None:
            self._env.create_db(UNDO_DB, txn)
            self._dbs_in_pending.append(UNDO_DB)
        else:
            txn.drop(db, delete=False)

    def _log_pre_image(self, txn: lmdb.Transaction, db_name: bytes, db, key: bytes) -> None:
        """Before the pending transaction first writes ``key``: keep its committed value (or its absence).

        Only the first write of a key in a transaction is logged, so a chunk spilled and then
        written again at commit keeps the value of the previous commit, not the spilled one.
        """
        if not self._options.undo_log:
            return
        undo_db = self._env.cached_db(UNDO_DB)
        entry = _undo_key(db_name, key)
        if txn.get(entry, db=undo_db) is not None:
            return
        old = txn.get(key, db=db)
        txn.put(entry, _UNDO_ABSENT if old is None else _UNDO_VALUE + bytes(old), db=undo_db)

    def _has_changes(self) -> bool:
        return (self._spilled > 0 or self._rows != self._committed_rows
                or any(c.cache.n_dirty for c in self._columns.values())
                or self._columns_changed or self._attrs_changed)

    def commit(self) -> None:
        """Make every put/add so far durable, atomically (one transaction, one fsync).

        After it returns, a crash of the process or the OS leaves exactly this state. If
        the disk is full or another I/O error occurs, ``CommitError`` (an ``OSError``) is
        raised, the store keeps its previous commit, and this handle keeps its changes so
        the same ``commit()`` can be retried (unless changes had been spilled to the
        failed transaction, which the message then says: the handle is rolled back).
        """
        with self._mutex:
            self._ready()
            self._check_writable("commit")
            self._since_commit = 0
            if not self._has_changes():
                return
            for attempt in (0, 1):
                try:
                    self._write_commit()
                    return
                except lmdb.MapFullError:
                    if self._spilled or attempt:
                        self._fail_commit("the LMDB map is full")
                    self._abort_pending()
                    self._env.ensure_headroom(4 * self._dirty_bytes())
                except lmdb.Error as exc:
                    self._fail_commit(str(exc))

    def _dirty_bytes(self) -> int:
        dirty = sum(c.cache.n_dirty * c.cache.chunk_bytes for c in self._columns.values())
        return dirty * (2 if self._options.undo_log else 1) + (1 << 20)  # the undo log holds the pre-images

    def _write_commit(self) -> None:
        version = self._commit + 1
        if self._pending is None:
            self._env.ensure_headroom(self._dirty_bytes() + 16 * max(self._rows, 1))
        txn = self._pending_txn()
        written = 0
        for column in self._columns.values():
            dirty = column.cache.dirty_chunks()
            db = self._ensure_db(column, txn)  # declared columns get their (maybe empty) DB
            if not dirty:
                continue
            with txn.cursor(db=db) as cursor:
                for chunk, rows in dirty:
                    key, value = chunk_codec.chunk_key(chunk), chunk_codec.encode_chunk(rows, chunk, version)
                    self._log_pre_image(txn, column.db_name, db, key)
                    cursor.put(key, value)
                    written += len(value)
        cr = self._chunk_rows
        ids = self._index.ids
        for chunk in range(self._committed_rows // cr, (self._rows + cr - 1) // cr):
            part = ids[chunk * cr : (chunk + 1) * cr].reshape(-1, 1)
            key, value = chunk_codec.chunk_key(chunk), chunk_codec.encode_chunk(part, chunk, version)
            self._log_pre_image(txn, IDS_DB, self._ids_db, key)
            txn.put(key, value, db=self._ids_db)
            written += len(value)
        now = time.time()
        state = {"commit": version, "rows": self._rows, "committed_at": now, "attrs": self._attrs,
                 "columns": {n: c.describe() for n, c in self._columns.items()}}
        self._log_pre_image(txn, META_DB, self._meta_db, b"state")
        txn.put(b"state", pack_record(state), db=self._meta_db)
        if self._options.undo_log:
            mark = {"undoes": version, "restores": self._commit}
            txn.put(_UNDO_MARK, pack_record(mark), db=self._env.cached_db(UNDO_DB))
        self._pending = None
        try:
            txn.commit()  # one fsync (sync=True); raises on disk full / I/O error
        except BaseException:
            self._pending = txn  # so _fail_commit forgets databases created in it
            raise
        self._dbs_in_pending = []
        for column in self._columns.values():
            column.cache.mark_clean(version)
        self._commit, self._committed_rows, self._committed_at = version, self._rows, now
        self._spilled = 0
        self._commits += 1
        self._bytes_committed += written
        self._columns_changed = self._attrs_changed = False
        if self._options.cache_mb is None and self._rows != self._rows_at_budget:
            self._split_cache_budget()  # the default budget follows the table's size

    def _fail_commit(self, reason: str) -> None:
        self._abort_pending()
        self._env.reopen_if_panicked()  # a failed meta-page write leaves the env unusable until reopened
        if self._spilled:
            lost = self._spilled
            self.rollback()
            raise CommitError(
                f"commit to {self._path} failed ({reason}); the store keeps commit {self._commit}. "
                f"{lost} changed chunk(s) had been spilled from the cache into the failed transaction, "
                "so this handle was rolled back to the last commit"
            )
        raise CommitError(
            f"commit to {self._path} failed ({reason}); the store keeps commit {self._commit} and this "
            "handle keeps its uncommitted changes: free space (or fix the error) and call commit() again"
        )

    def _abort_pending(self) -> None:
        if self._pending is not None:
            try:
                self._pending.abort()
            except lmdb.Error:
                pass
            self._pending = None
        for db_name in self._dbs_in_pending:  # handles opened in an aborted txn are invalid
            self._env.forget_db(db_name)
        self._dbs_in_pending = []

    def rollback(self) -> None:
        """Discard every put/add since the last commit."""
        with self._mutex:
            self._ready()
            self._check_writable("rollback")
            self._abort_pending()
            self._spilled = 0
            for column in self._columns.values():
                column.cache.drop_dirty()
                if self._rows != self._committed_rows:
                    column.cache.drop_from(self._committed_rows // self._chunk_rows)
            self._index.truncate(self._committed_rows)
            self._rows = self._committed_rows
            self._since_commit = 0
            if self._columns_changed or self._attrs_changed:
                self._detach_env_only()
                self._attach_env_only()

    def _detach_env_only(self) -> None:
        environment.release(self._env)
        self._env = None

    def _attach_env_only(self) -> None:
        self._env = environment.acquire(self._path, write=not self._readonly, readahead=self._options.readahead)
        self._load_metadata()
        self._columns_changed = self._attrs_changed = False

    # ------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Commit pending changes (writable handle), then release the handle. Idempotent."""
        with self._mutex:
            if self._closed:
                return
            if self._attached and self._pid == os.getpid() and not self._readonly and self._has_changes():
                self.commit()  # if this raises (disk full), the handle stays open to retry
            self._detach()
            self._closed = True

    def _detach(self) -> None:
        if self._pid == os.getpid():
            self._abort_pending()
            if self._env is not None:
                environment.release(self._env)
            if self._lock is not None:
                self._lock.release()
        self._env = None
        self._lock = None
        self._attached = False
        for column in self._columns.values():
            column.cache.clear()

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self._closed and not self.readonly and self._attached:
            self.rollback()
        self.close()

    def __del__(self) -> None:  # release the lock and env without committing
        try:
            if not getattr(self, "_closed", True) and getattr(self, "_pid", None) == os.getpid():
                if self._attached and not self._readonly and self._has_changes():
                    log.warning("%s: handle garbage-collected with uncommitted changes (discarded); "
                                "call close() or commit()", self._path)
                self._detach()
                self._closed = True
        except Exception:
            pass

    # ----------------------------------------------------------------------- stats
    def stats(self) -> dict:
        """Cache and commit counters of this handle."""
        with self._mutex:
            self._ready()
            caches = [c.cache for c in self._columns.values()]
            out = self._stats.as_dict()
            l1, l2 = self._cache_tiers()
            out.update(
                commits=self._commits,
                bytes_committed=self._bytes_committed,
                dirty_chunks=sum(c.n_dirty for c in caches),
                spilled_chunks=self._spilled,
                cache_bytes=sum(c.bytes for c in caches),
                cache_budget_bytes=l1 + l2,
                l1_chunks=sum(int((c.slot_chunk >= 0).sum()) for c in caches),
                l2_chunks=sum(len(c.l2) for c in caches),
                rows=self._rows,
                store_commit=self._commit,
                last_commit_time=self._committed_at,
            )
            return out


# ----------------------------------------------------------------------- helpers
def _spill_into(store_ref: weakref.ref, name: str, chunk: int, rows: np.ndarray) -> None:
    store = store_ref()
    if store is None:
        raise EmbeddingStoreError("a dirty chunk was evicted from the cache of a closed handle")
    store._spill(name, chunk, rows)


def pack_record(record: dict) -> bytes:
    """msgpack a metadata record with an xxh3-64 checksum of its other fields.

    LMDB has no checksums; without this a flipped byte in the state or config record
    (row count, chunk_rows ...) could open as a different, wrong table.
    """
    body = {k: v for k, v in record.items() if k != _RECORD_CHECKSUM}
    return msgpack.packb({**body, _RECORD_CHECKSUM: xxhash.xxh3_64_intdigest(msgpack.packb(body))})


def _unique_inverse(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)`` without a sort when the span is small.

    A batch's chunk numbers usually lie in a narrow range (sequential passes, or a
    table of few chunks): a presence bitmap over the range is then O(n) instead of a sort.
    """
    lo, hi = int(values.min()), int(values.max())
    if lo == hi:  # one chunk (small tables, sequential batches within a chunk)
        return np.array([lo], values.dtype), np.zeros(len(values), np.intp)
    span = hi - lo + 1
    if span > 4 * len(values) + 64:
        return np.unique(values, return_inverse=True)
    present = np.zeros(span, bool)
    shifted = values - lo
    present[shifted] = True
    unique = np.flatnonzero(present)
    rank = np.cumsum(present) - 1
    return unique + lo, rank[shifted]


def _read_record(txn, key: bytes, db, path: str, verify: bool = True) -> dict:
    raw = txn.get(key, db=db)
    if raw is None:
        raise NotAStoreError(f"{path} is not an lmdb_embeddings store (no {key.decode()!r} metadata record)")
    try:
        return unpack_record(raw, key, verify)
    except CorruptionError as exc:
        raise CorruptionError(f"{path}: {exc}") from None


def read_metadata(txn, meta_db, path: str) -> tuple[dict, dict]:
    """The checked (config, state) records of the store at ``path``, as of ``txn``.

    The format record's magic and version come first, before its checksum: a newer format
    may checksum its records differently. Shared by ``open`` and the CLI's snapshot reader.
    """
    fmt = _read_record(txn, b"format", meta_db, path, verify=False)
    if not isinstance(fmt, dict) or fmt.get("magic") != MAGIC:
        raise NotAStoreError(f"{path} is not an lmdb_embeddings store (bad magic)")
    version = fmt.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FormatVersionError(f"{path} was written in format version {version}; this library reads up to "
                                 f"version {FORMAT_VERSION}: upgrade lmdb_embeddings")
    _read_record(txn, b"format", meta_db, path)  # a format we read: now its checksum too
    return _read_record(txn, b"config", meta_db, path), _read_record(txn, b"state", meta_db, path)


def unpack_record(raw, key: bytes, verify: bool = True) -> dict:
    """Decode a metadata record written by :func:`pack_record` and check its checksum.

    Records written without a checksum (older stores) are accepted as they are.
    """
    try:
        record = msgpack.unpackb(bytes(raw))
    except Exception as exc:
        raise CorruptionError(f"the store metadata record {key.decode()!r} is damaged ({exc})") from None
    if not isinstance(record, dict):
        raise CorruptionError(f"the store metadata record {key.decode()!r} is damaged (not a map)")
    if _RECORD_CHECKSUM in record:
        stored = record.pop(_RECORD_CHECKSUM)
        if verify and stored != xxhash.xxh3_64_intdigest(msgpack.packb(record)):
            raise CorruptionError(f"the store metadata record {key.decode()!r} is damaged (checksum mismatch)")
    return record


def check_create_args(ids, dim, dtype, chunk_rows, init, seed) -> tuple:
    """``create``'s arguments checked: (ids array, dim, dtype, chunk_rows, init spec, seed, init values or None).

    Shared with ``ShardedEmbeddingStore.create``, which must accept exactly what ``create`` accepts.
    """
    dim = as_positive_int(dim, "dim")
    chunk_rows = as_positive_int(chunk_rows, "chunk_rows")
    dt = as_dtype(dtype)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidInputError(f"seed must be a non-negative int, got {seed!r}")
    if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
        if ids < 0:
            raise InvalidInputError(f"ids: a row count must be >= 0, got {ids}")
        id_array = np.arange(int(ids), dtype=np.int64)
    else:
        id_array = as_ids(ids, "ids")
        check_unique(id_array, "create")
    values = None
    if isinstance(init, str):
        spec = initializers.init_spec(init, len(id_array), dim)
    else:
        values = as_values(init, len(id_array), dim, dt, "create(init=array)")
        spec = {"kind": "normal", "std": initializers.NORMAL_STD, "name": "array"}
    return id_array, dim, dt, chunk_rows, spec, int(seed), values


def _undo_key(db_name: bytes, key: bytes) -> bytes:
    return _UNDO_ENTRY + struct.pack("<H", len(db_name)) + db_name + bytes(key)


def _split_undo_key(entry: bytes) -> tuple[bytes, bytes]:
    (length,) = struct.unpack_from("<H", entry, 1)
    return entry[3 : 3 + length], entry[3 + length :]


def revert_last_commit(path) -> dict:
    """Undo the store's last commit from the undo log it kept (it was made with ``undo_log=True``).

    One write transaction puts back every value that commit overwrote, deletes every key
    it created and restores its state record (row count, columns, attrs) under a NEW,
    higher commit number, so readers in other processes notice the change; then the undo
    log is emptied: a store can be reverted by one commit only. No writable handle may be
    open on the store (the writer lock is taken).

    Returns ``{"undone": c, "restored": c_prev, "commit": new}``: commit ``c`` was undone, the
    store now holds the contents of commit ``c_prev`` as commit number ``new``.

    Raises:
        EmbeddingStoreError: no undo log, or it does not describe the last commit (the store
            was committed without ``undo_log`` since); nothing is changed then.
        WriterLockedError: a writer holds the store.
    """
    path = os.path.abspath(os.fspath(path))
    if not is_store(path):
        raise StoreNotFoundError(f"no store at {path}")
    lock = WriterLock(path)
    lock.acquire()
    try:
        shared = environment.acquire(path, write=True)
        try:
            return _apply_undo_log(shared, path)
        finally:
            environment.release(shared)
    finally:
        lock.release()


def _apply_undo_log(shared: environment.SharedEnv, path: str) -> dict:
    undo_db, meta_db = shared.cached_db(UNDO_DB), shared.cached_db(META_DB)
    if undo_db is None or meta_db is None:
        raise EmbeddingStoreError(f"{path} has no undo log: its last commit was not made with undo_log=True")
    with shared.reading() as txn:
        stat = txn.stat(undo_db)
    shared.ensure_headroom((stat["leaf_pages"] + stat["overflow_pages"] + 16) * stat["psize"])
    with shared.lock:
        txn = shared.env.begin(write=True, buffers=True)
        try:
            raw_mark = txn.get(_UNDO_MARK, db=undo_db)
            state = _read_record(txn, b"state", meta_db, path)
            if raw_mark is None:
                raise EmbeddingStoreError(f"{path} has no undo log to apply (it was applied already, or the "
                                          "last commit was not made with undo_log=True); nothing was changed")
            mark = unpack_record(raw_mark, _UNDO_MARK)
            if mark.get("undoes") != state["commit"]:
                raise EmbeddingStoreError(
                    f"{path}: the undo log belongs to commit {mark.get('undoes')}, but the store is at commit "
                    f"{state['commit']} (committed without undo_log since); nothing was changed")
            new_commit = int(state["commit"]) + 1
            with txn.cursor(db=undo_db) as cursor:
                for raw_entry, raw_value in cursor:  # copied at once: a write may move the pages
                    entry, value = bytes(raw_entry), bytes(raw_value)
                    if entry == _UNDO_MARK:
                        continue
                    db_name, key = _split_undo_key(entry)
                    db = shared.cached_db(db_name)
                    if db is None:
                        raise CorruptionError(f"{path}: the undo log names a database {db_name!r} that is missing")
                    if (db_name, key) == (META_DB, b"state"):
                        previous = unpack_record(value[1:], b"state")
                        value = _UNDO_VALUE + pack_record({**previous, "commit": new_commit})
                    if value[:1] == _UNDO_ABSENT:
                        txn.delete(key, db=db)
                    else:
                        txn.put(key, value[1:], db=db)
            txn.drop(undo_db, delete=False)
            txn.commit()
        except BaseException:
            txn.abort()
            raise
    log.info("%s: commit %s undone; the store holds commit %s's contents as commit %s",
             path, mark["undoes"], mark.get("restores"), new_commit)
    return {"undone": int(mark["undoes"]), "restored": int(mark.get("restores", -1)), "commit": new_commit}


def is_store(path: str) -> bool:
    return os.path.isfile(os.path.join(path, environment.DATA_FILE))


def check_replace_target(path: str, replace: bool, how: str) -> bool:
    """Raise unless a new store may be put at ``path``; True if an old store will be replaced.

    ``replace``: the caller's overwrite/--force; ``how``: how the user asks for it (for the
    message). Never touches a directory that is not a store, nor one a writer holds.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise StoreExistsError(f"{path} exists and is not a directory")
    if not os.path.isdir(path) or not os.listdir(path):
        return False
    if not is_store(path):
        raise StoreExistsError(
            f"{path} is a non-empty directory that is not a store; refusing to write there "
            "(choose another path or empty it)")
    if not replace:
        raise StoreExistsError(f"a store already exists at {path}; {how} to replace it")
    if environment.is_open_here(path):
        raise WriterLockedError(f"{path} is open in this process; close its handles before replacing it")
    holder = holder_pid(path)
    if holder is not None:
        raise WriterLockedError(f"{path} is open for writing by pid {holder}; close it before replacing it")
    return True


def _build_store(tmp: str, ids: np.ndarray, dim: int, dtype: np.dtype, chunk_rows: int, spec: dict,
                 seed: int, values: np.ndarray | None) -> None:
    """Write a complete new store into directory ``tmp`` (not yet visible at its path).

    Goes through the same ``StoreBuilder`` as restore and import, chunk by chunk, so the
    initial values are generated one chunk at a time and memory stays bounded.
    """
    from .store_builder import StoreBuilder
    from .table_layout import ColumnSpec, TableLayout

    n = len(ids)
    layout = TableLayout(chunk_rows=chunk_rows, rows=n, columns=(ColumnSpec(MAIN, dim, dtype),),
                         config={"init": spec, "seed": seed})
    os.makedirs(tmp)
    builder = StoreBuilder(tmp, layout)
    try:
        for chunk in range(layout.n_chunks):
            lo, hi = chunk * chunk_rows, min(n, (chunk + 1) * chunk_rows)
            if values is None:
                rows = initializers.chunk_values(spec, seed, chunk, chunk_rows, dim, 0, hi - lo, dtype)
            else:
                rows = values[lo:hi]
            builder.add_ids(chunk, ids[lo:hi])
            builder.add_chunk(chunk, [rows])
        builder.finish()
    except BaseException:
        builder.close()
        raise

