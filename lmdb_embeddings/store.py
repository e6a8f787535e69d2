"""EmbeddingStore: a chunked, cached, transactional embedding table in one LMDB environment.

This module is the public facade: it checks arguments and hands each call to the handle's
session (``core.writes.WriterSession`` or ``core.readers.ReaderSession``), whose table
(``core.table``) serves rows from its chunk caches (``core.cache``). The handle is assembled
from parts, one per responsibility: the session in this process (store_base.py), the table's
metadata (store_metadata.py), reading rows (store_reads.py) and writing them (store_writes.py);
creating, opening, closing and the counters are here. It implements ``handle.TableHandle``.
docs/ARCHITECTURE.md has the whole picture; docs/FORMAT.md the bytes on disk.

Concurrency: one writable handle per store (``processes.writer_lock``); any number of
read-only handles in any process, each call running in one short read transaction, so it
sees exactly one commit and never pins old pages. One handle may be shared by threads
(calls are serialized); after ``fork`` or unpickling it reopens read-only.
"""

from __future__ import annotations

import logging
import os
from typing import Any, ClassVar, cast

import numpy as np

from .core.table_spec import TableSpec
from .errors import InvalidInputError, InvalidTypeError
from .handle import implements_table_handle
from .inputs import IdsLike, ValuesLike
from .options import StoreOptions
from .processes.builder import build_new_table
from .processes.memory import rss_anon_bytes
from .processes.staging import StagedStore, check_replace_target
from .progress import bar
from .results import StoreStats
from .store_metadata import TableMetadata
from .store_reads import RowReads
from .store_writes import RowWrites

log = logging.getLogger(__name__)


@implements_table_handle
class EmbeddingStore(TableMetadata, RowReads, RowWrites):
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

    sharded: ClassVar[bool] = False  # handle.TableHandle: one process's handle, no call is collective

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
        table = TableSpec.from_create_args(ids, dim, dtype, chunk_rows, init, seed)
        n = table.rows
        options.check_writer_cache(table.chunk_rows, table.dim * table.dtype.itemsize, n, "create")  # before building
        path = _as_path(path)
        check_replace_target(path, overwrite, "pass overwrite=True")
        with StagedStore(path, "creating") as stage, bar(n, "create", progress, unit="rows") as pbar:
            build_new_table(stage.tmp, table.ids, table.dim, table.dtype, table.chunk_rows, table.init, table.seed,
                            table.values, pbar.update)
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
        return cls.open_with_options(path, StoreOptions.from_kwargs(open_options), readonly=readonly)

    @classmethod
    def open_with_options(cls, path: str | os.PathLike[str], options: StoreOptions, *,
                          readonly: bool = False) -> EmbeddingStore:
        """:meth:`open` with the options as one checked :class:`~lmdb_embeddings.StoreOptions` (internal
        ones included: the sharded store opens its shards with ``undo_log``)."""
        store = cls.__new__(cls)
        store._setup(_as_path(path), bool(readonly), options)
        store._session = store._open_session()
        return store

    def __repr__(self) -> str:
        mode = "closed" if self._closed else ("read-only" if self._readonly else "writable")
        return f"EmbeddingStore({self._path!r}, {mode})"

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
