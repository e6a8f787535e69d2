"""EmbeddingStore: a chunked, cached, transactional embedding table in one LMDB environment.

This module is the public facade: it checks arguments and hands each call to the handle's
session (``core.writes.WriterSession`` or ``core.readers.ReaderSession``), whose table
(``core.table``) serves rows from its chunk caches (``core.cache``). docs/ARCHITECTURE.md
has the whole picture; docs/FORMAT.md the bytes on disk.

Concurrency: one writable handle per store (``processes.writer_lock``); any number of
read-only handles in any process, each call running in one short read transaction, so it
sees exactly one commit and never pins old pages. One handle may be shared by threads
(calls are serialized); after ``fork`` or unpickling it reopens read-only.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any, cast

import msgpack
import numpy as np

from .core.cache import CacheStats
from .core.init import NORMAL_STD, init_spec
from .core.inputs import IdsLike, ValuesLike, as_dtype, as_ids, as_positive_int, as_values, check_unique
from .core.prefetch import Prefetcher
from .core.readers import ReaderSession
from .core.session import Session
from .core.table import Column, Table
from .core.writes import WriterSession
from .errors import ClosedError, EmbeddingStoreError, InvalidInputError, InvalidTypeError, ReadOnlyError
from .format.builder import build_new_table
from .format.layout import ColumnSpec, choose_chunk_rows, chunk_size_problem
from .format.records import MAIN, check_store_dir
from .ops.progress import bar
from .optional import import_needing
from .options import StoreOptions
from .processes import fork
from .processes.memory import rss_anon_bytes
from .processes.staging import StagedStore, check_replace_target
from .processes.writer_lock import WriterLock
from .results import StoreStats

if TYPE_CHECKING:  # the tensor API's types; torch itself is imported only when get_tensor is called
    import torch

log = logging.getLogger(__name__)


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
    def create(cls, path: str | os.PathLike[str], ids: IdsLike, dim: int, *, dtype: str | np.dtype = "float32",
               chunk_rows: int | None = None, init: str | ValuesLike = "normal", seed: int = 0,
               overwrite: bool = False, progress: bool = False, **open_options: Any) -> EmbeddingStore:
        """Build a new store at ``path`` and return a writable handle on it.

        The store is built in a hidden sibling directory and renamed into place only when
        complete, so a crash during ``create`` never leaves a half store at ``path``.

        Args:
            path: directory of the store (created).
            ids: ``int`` N for IDs 0..N-1, or a 1-D sequence/array/tensor of unique int64 IDs.
            dim: row width. dtype: ``"float32"``, ``"float16"`` or ``"float64"``.
            chunk_rows: row slots per chunk (one LMDB value each), for good; None: chosen from ``dim`` and
                ``dtype`` (``format.layout.choose_chunk_rows``), ``store.chunk_rows`` tells which.
            init: ``"normal"``, ``"zeros"``, ``"uniform"``, ``"xavier"``, ``"kaiming"`` or an
                array of shape (len(ids), dim). seed: same seed, same table.
            overwrite: replace an existing store (refused while a writer holds it). progress: a tqdm bar.
            open_options: see :class:`~lmdb_embeddings.StoreOptions`.
        Raises:
            FileExistsError: a store (or other files) exist at ``path`` and not ``overwrite``.
            ValueError: bad ids, dim, dtype, chunk_rows or init.
        """
        options = StoreOptions.from_kwargs(open_options)
        id_array, dim, dt, chunk_rows, spec, seed, values = check_create_args(ids, dim, dtype, chunk_rows, init, seed)
        n = id_array if isinstance(id_array, int) else len(id_array)
        options.check_writer_cache(chunk_rows, dim * dt.itemsize, n, "create")  # before anything is built
        path = _as_path(path)
        check_replace_target(path, overwrite, "pass overwrite=True")
        with StagedStore(path, "creating") as stage, bar(n, "create", progress, unit="rows") as pbar:
            build_new_table(stage.tmp, id_array, dim, dt, chunk_rows, spec, seed, values, pbar.update)
            lock = stage.lock_new()  # held from before the swap into the open: the handle gets THIS table
            stage.swap_in(replace=bool(overwrite))
        store = cls.__new__(cls)
        store._setup(path, False, options)
        store._session = store._open_session(lock)
        return store

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, readonly: bool = False, **open_options: Any) -> EmbeddingStore:
        """Open an existing store.

        Raises:
            FileNotFoundError: no store at ``path``.
            EmbeddingStoreError: a writer already holds it (``WriterLockedError``, naming its
                pid), the directory is not a store, or it was written by a newer format version.
        """
        options = StoreOptions.from_kwargs(open_options)
        store = cls.__new__(cls)
        store._setup(_as_path(path), bool(readonly), options)
        store._session = store._open_session()
        return store

    def _setup(self, path: str, readonly: bool, options: StoreOptions) -> None:
        self._path, self._readonly, self._options = path, readonly, options
        self._mutex = threading.RLock()
        self._pid = os.getpid()
        self._session: Session | None = None
        self._closed = False
        self._stats = CacheStats()
        self._prefetcher = Prefetcher(self._warm)  # its thread starts at the first hint
        fork.track(self)

    def _open_session(self, lock: WriterLock | None = None) -> Session:
        """Open the environment and the table in the current process (the lock too, for a writer,
        unless ``create`` hands over the one it took)."""
        if self._readonly:
            check_store_dir(self._path)
            return ReaderSession.open(self._path, self._options, self._stats)
        try:
            check_store_dir(self._path)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return WriterSession.open(self._path, self._options, self._stats, lock)

    # --------------------------------------------------------------- process safety
    def _active(self) -> Session:
        """The session for this call: reopened after fork/unpickle; refused if closed."""
        if self._closed:
            raise ClosedError(f"the handle on {self._path} is closed; open the store again")
        if self._pid != os.getpid():  # a forked child: the fork guard closed the parent's env and lock
            self._session, self._readonly, self._stats = None, True, CacheStats()
            self._pid = os.getpid()
        if self._session is None:
            self._session = self._open_session()
        self._session.settle()  # a commit Python was interrupted around: the handle learns what LMDB did
        return self._session

    def _writer(self, call: str) -> WriterSession:
        session = self._active()
        if session.readonly:
            raise ReadOnlyError(f"{call}: this handle on {self._path} is read-only; open it with readonly=False")
        return session

    def _after_fork_in_child(self) -> None:
        self._mutex = threading.RLock()  # another thread of the parent may have held it at fork
        self._prefetcher = Prefetcher(self._warm)  # the parent's thread does not exist here

    def __getstate__(self) -> dict:
        return {"path": self._path, "options": self._options.as_kwargs()}

    def __setstate__(self, state: dict) -> None:
        self._setup(state["path"], True, StoreOptions.from_kwargs(state["options"]))

    # ----------------------------------------------------------------- properties
    def _caught_up(self) -> Table:
        """The table, caught up with the latest commit for a reader."""
        session = self._active()
        session.refresh()
        return session.table

    @property
    def path(self) -> str:
        return self._path

    @property
    def dim(self) -> int:
        with self._mutex:
            return self._active().table.dim

    @property
    def dtype(self) -> np.dtype:
        with self._mutex:
            return self._active().table.dtype

    @property
    def chunk_rows(self) -> int:
        with self._mutex:
            return self._active().table.chunk_rows

    @property
    def readonly(self) -> bool:
        return self._readonly or self._pid != os.getpid()

    @property
    def ids(self) -> np.ndarray:
        """The sample IDs in row order (a copy)."""
        with self._mutex:
            return self._caught_up().index.ids_copy()

    def __len__(self) -> int:
        with self._mutex:
            return self._caught_up().rows

    def __contains__(self, sample_id: object) -> bool:
        with self._mutex:
            table = self._caught_up()
            try:
                ids = as_ids(sample_id)
            except EmbeddingStoreError:
                return False
            return len(ids) == 1 and bool(table.index.contains(ids)[0])

    def contains(self, ids: IdsLike) -> np.ndarray:
        """A bool array: which of ``ids`` are in the store (this handle's view, uncommitted adds included)."""
        ids = as_ids(ids)
        with self._mutex:
            return self._caught_up().index.contains(ids)

    @property
    def commit_count(self) -> int:
        """Number of commits the store has received since it was created."""
        with self._mutex:
            return self._caught_up().commit

    @property
    def uuid(self) -> str | None:
        """The table's identity: a new one at each ``create`` and ``restore``, kept by ``compact``
        (None for a store written before the format recorded it)."""
        with self._mutex:
            return self._active().config.get("store_uuid")

    def __repr__(self) -> str:
        mode = "closed" if self._closed else ("read-only" if self._readonly else "writable")
        return f"EmbeddingStore({self._path!r}, {mode})"

    # --------------------------------------------------------------------- reading
    def get(self, ids: IdsLike) -> np.ndarray:
        """Rows of ``ids`` in order, as a fresh ``(len(ids), dim)`` array of the store dtype.

        Duplicates are allowed. A writable handle sees its own uncommitted puts; a
        read-only handle sees the latest commit, and one call never mixes two commits.

        Raises:
            KeyError: some IDs are not in the store (the message names some of them).
        """
        return self._gather(MAIN, ids)

    def get_tensor(self, ids: IdsLike, device: torch.device | str | int | None = None) -> torch.Tensor:
        """Like :meth:`get`, as a ``torch.Tensor`` on ``device`` (CUDA copies go through pinned memory);
        without torch, ``MissingDependencyError`` (an ``ImportError``) says how to install it."""
        return as_tensor(self.get(ids), device)

    def get_column(self, name: str, ids: IdsLike) -> np.ndarray:
        """Rows of an auxiliary column for ``ids`` (same rules as :meth:`get`)."""
        return self._gather(name, ids)

    def get_with_state(self, ids: IdsLike, column: str = MAIN) -> tuple[np.ndarray, dict]:
        """``(rows, {"commit", "rows", "attrs"})``: :meth:`get_column` and the state of the SAME read
        (a reader: the commit that served the rows; the sharded store checks its shards by it)."""
        ids = as_ids(ids)
        with self._mutex:
            session = self._active()

            def read() -> tuple[np.ndarray, dict]:
                table = session.table  # bound inside the read: it follows a store swapped in at the path
                rows = _column(table, column).cache.gather(table.index.slots(ids))
                return rows, {"commit": table.commit, "rows": table.rows, "attrs": dict(table.attrs)}

            return session.read(read)

    def prefetch(self, ids: IdsLike) -> None:
        """A hint that the rows of ``ids`` (all columns) will be needed soon: returns at once, changes nothing any
        call returns, ignores IDs not in the store (``core/prefetch.py``). Call it a batch ahead."""
        if self._closed:
            raise ClosedError(f"the handle on {self._path} is closed; open the store again")
        self._prefetcher.hint(as_ids(ids))

    def _warm(self, ids: np.ndarray) -> None:
        with self._mutex:  # the prefetch thread's work, under the mutex as any call
            if not self._closed:
                self._active().prefetch(ids)

    def _gather(self, name: str, ids: IdsLike) -> np.ndarray:
        ids = as_ids(ids)
        with self._mutex:
            session = self._active()
            return session.read(lambda: _gather_from(session.table, name, ids))  # the table as the read finds it

    # --------------------------------------------------------------------- writing
    def put(self, ids: IdsLike, values: ValuesLike) -> None:
        """Overwrite the rows of existing ``ids``; durable at the next :meth:`commit`.

        ``values``: numpy array or torch tensor (any device) of shape (len(ids), dim),
        cast to the store dtype. A rejected call changes nothing.

        Raises:
            ValueError: wrong shape, duplicate ids, non-finite values.
            KeyError: unknown ids. PermissionError: read-only handle.
        """
        with self._mutex:
            session = self._writer("put")
            _put(session, MAIN, ids, values, "put")
            if session.note_update():
                session.commit()

    def put_column(self, name: str, ids: IdsLike, values: ValuesLike) -> None:
        """Overwrite rows of an auxiliary column (same rules as :meth:`put`, not counted by ``commit_every``)."""
        with self._mutex:
            _put(self._writer("put_column"), name, ids, values, "put_column")

    def add(self, ids: IdsLike, values: ValuesLike | None = None) -> None:
        """Append NEW ids (readable at once, durable at commit); values default to the init.

        Raises:
            ValueError: an id already exists, duplicates, bad values. PermissionError: read-only.
        """
        with self._mutex:
            session = self._writer("add")
            table = session.table
            new_ids = as_ids(ids)
            table.index.check_new(new_ids)
            if values is None:
                vals = table.init_values(table.rows, len(new_ids))
            else:
                vals = as_values(values, len(new_ids), table.dim, table.dtype, "add")
            session.append_rows(new_ids, vals)
            if session.note_update():
                session.commit()

    def commit(self) -> None:
        """Make every put/add so far durable, atomically (one transaction, one fsync).

        After it returns, a crash of the process or the OS leaves exactly this state. If
        the disk is full or another I/O error occurs, ``CommitError`` (an ``OSError``) is
        raised, the store keeps its previous commit, and this handle keeps its changes so
        the same ``commit()`` can be retried (unless changes had been spilled to the
        failed transaction, which the message then says: the handle is rolled back).
        """
        with self._mutex:
            self._writer("commit").commit()

    def rollback(self) -> None:
        """Discard every put/add (and new column or attr) since the last commit."""
        with self._mutex:
            self._writer("rollback").rollback()

    # ------------------------------------------------------- auxiliary columns (state)
    def ensure_column(self, name: str, width: int, dtype: str | np.dtype = "float32", fill: float = 0.0) -> None:
        """Declare an auxiliary per-row column (e.g. optimizer moments); rows start at ``fill``.

        The column shares the store's IDs and chunking, is committed atomically with the
        embeddings, and is carried by dump/restore. Declaring it again is a no-op.
        """
        with self._mutex:
            table = self._caught_up()
            if not isinstance(name, str) or not name or name == MAIN or "/" in name:
                raise InvalidInputError(f"column name {name!r} is reserved or invalid")
            width = as_positive_int(width, "width")
            dt = as_dtype(dtype)
            existing = table.columns.get(name)
            if existing is not None:
                if (existing.spec.width, existing.spec.dtype) != (width, dt):
                    raise InvalidInputError(
                        f"column {name!r} exists with width {existing.spec.width} and dtype {existing.spec.dtype}, "
                        f"not {width} and {dt}")
                return
            self._writer("ensure_column").table.declare_column(ColumnSpec(name, width, dt, float(fill)))

    @property
    def columns(self) -> dict:
        """Auxiliary columns: name -> {width, dtype, fill}."""
        with self._mutex:
            return {n: d for n, d in self._caught_up().describe_columns().items() if n != MAIN}

    @property
    def attrs(self) -> dict:
        """Small user metadata (msgpack-able), committed with the rows (e.g. optimizer step)."""
        with self._mutex:
            return dict(self._caught_up().attrs)

    def set_attr(self, key: str, value: object) -> None:
        """Set one attr; durable at the next commit, discarded by rollback."""
        with self._mutex:
            session = self._writer("set_attr")
            try:
                msgpack.packb(value)
            except (TypeError, ValueError) as exc:
                raise InvalidInputError(f"attr {key!r}: value is not msgpack-serializable ({exc})") from None
            session.table.set_attr(str(key), value)

    # ------------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Commit pending changes (writable handle), then release the handle. Idempotent.

        A close whose commit fails (``CommitError``: a full disk) changes nothing: the handle
        stays open with its changes, and the same ``close()`` can be called again.
        """
        with self._mutex:
            if self._closed:
                return
            self._prefetcher.stop()
            session = self._session if self._pid == os.getpid() else None
            if session is not None and session.has_changes():
                session.commit()  # if this raises (disk full), the handle stays open to retry
            self._release()
            self._closed = True

    def _release(self) -> None:
        if self._session is not None and self._pid == os.getpid():
            self._session.release()
        self._session = None

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self._closed and not self.readonly and self._session is not None:
            self.rollback()
        self.close()

    def __del__(self) -> None:  # release the lock and env without committing
        try:
            if not getattr(self, "_closed", True) and getattr(self, "_pid", None) == os.getpid():
                session = self._session
                if session is not None and session.has_changes():
                    log.warning("%s: handle garbage-collected with uncommitted changes (discarded); "
                                "call close() or commit()", self._path)
                self._release()
                self._closed = True
        except Exception:
            pass

    # ----------------------------------------------------------------------- stats
    def stats(self) -> StoreStats:
        """This handle's cache and commit counters and the process's RssAnon: a :class:`StoreStats`."""
        with self._mutex:
            out = self._active().counters()
            out["anon_bytes"] = rss_anon_bytes()  # the whole process's RssAnon: cache + interpreter + yours
            return cast(StoreStats, out)


# ----------------------------------------------------------------------- helpers
def _put(session: WriterSession, name: str, ids, values, call: str) -> None:
    """``put``/``put_column``: every check first, then the session writes the rows, all or nothing."""
    table = session.table
    column = _column(table, name)
    ids = as_ids(ids)
    check_unique(ids, call)
    vals = as_values(values, len(ids), column.spec.width, column.spec.dtype, call)
    session.put_rows(column, table.index.slots(ids), vals, call)


def as_tensor(rows: np.ndarray, device: torch.device | str | int | None = None) -> torch.Tensor:
    """``rows`` as a torch tensor on ``device`` (CUDA copies go through pinned memory, non-blocking)."""
    torch = import_needing("torch", "torch", "get_tensor")  # the only part of the store that needs torch

    tensor = torch.from_numpy(rows)
    if device is None:
        return tensor
    device = torch.device(device)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def check_create_args(ids, dim, dtype, chunk_rows, init, seed) -> tuple:
    """``create``'s arguments, checked: (ids, dim, dtype, chunk_rows, init spec, seed, init values or None).

    ``ids`` comes back as an int N for 0..N-1 (never built as an array) or the unique int64 IDs.
    Shared with ``ShardedEmbeddingStore.create``, which must accept exactly what ``create`` accepts.
    """
    dim = as_positive_int(dim, "dim")
    dt = as_dtype(dtype)
    if chunk_rows is None:  # the store chooses (format.layout.choose_chunk_rows)
        chunk_rows = choose_chunk_rows(dim * dt.itemsize)
    chunk_rows = as_positive_int(chunk_rows, "chunk_rows")
    too_big = chunk_size_problem(chunk_rows, dim * dt.itemsize)
    if too_big:
        raise InvalidInputError(f"create: {too_big}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
        raise InvalidInputError(f"seed must be an int in [0, 2**64), got {seed!r}")
    id_array = _create_ids(ids)
    n = id_array if isinstance(id_array, int) else len(id_array)
    values = None
    if isinstance(init, str):
        spec = init_spec(init, n, dim)
    else:
        values = as_values(init, n, dim, dt, "create(init=array)")
        spec = {"kind": "normal", "std": NORMAL_STD, "name": "array"}
    return id_array, dim, dt, chunk_rows, spec, int(seed), values


def _as_path(path) -> str:
    """An absolute str path from a str, bytes or ``os.PathLike`` (a clear error for anything else)."""
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    try:
        path = os.fspath(path)
    except TypeError:
        raise InvalidTypeError(f"path must be a str or os.PathLike, got {type(path).__name__}") from None
    if isinstance(path, bytes):  # a PathLike whose __fspath__ gives bytes
        path = os.fsdecode(path)
    if not path:
        raise InvalidInputError("path is empty; give the store's directory")
    return os.path.abspath(path)


def _create_ids(ids) -> np.ndarray | int:
    """``create``'s ids: an int N (IDs 0..N-1, never built as an array) or unique int64 IDs."""
    if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
        if ids < 0:
            raise InvalidInputError(f"ids: a row count must be >= 0, got {ids}")
        return int(ids)
    id_array = as_ids(ids, "ids")
    check_unique(id_array, "create")
    return id_array


def _gather_from(table: Table, name: str, ids: np.ndarray) -> np.ndarray:
    return _column(table, name).cache.gather(table.index.slots(ids))


def _column(table: Table, name: str) -> Column:
    """The table's column ``name``, or a clear error."""
    column = table.columns.get(name)
    if column is None:
        raise InvalidInputError(f"no column {name!r}; declare it with ensure_column first")
    return column
