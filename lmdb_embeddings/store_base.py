"""StoreBase: an ``EmbeddingStore`` handle's session in the current process, and what every part of the handle
calls to reach it.

The handle (store.py) is assembled from parts, one per responsibility: its table's metadata
(store_metadata.py), reading rows (store_reads.py), writing them (store_writes.py), and, in store.py
itself, creating, opening, closing and the counters. Each part is a base class of ``EmbeddingStore``
over this one, which holds the session (``core.writes.WriterSession`` or ``core.readers.ReaderSession``)
and keeps it valid in this process: opened lazily, reopened read-only after ``fork`` or unpickling,
refused once closed. Every public call takes the handle's mutex, then the session through
:meth:`StoreBase._active` (or :meth:`StoreBase._writer` for a write).
"""

from __future__ import annotations

import os
import threading
from typing import cast

import numpy as np

from .core.cache import CacheStats
from .core.prefetch import Prefetcher
from .core.readers import ReaderSession
from .core.session import Session
from .core.table import Table
from .core.writes import WriterSession
from .errors import ClosedError, ReadOnlyError
from .format.records import check_store_dir
from .options import StoreOptions
from .processes import fork
from .processes.writer_lock import WriterLock


class StoreBase:
    """A handle's path, mode, options, mutex and session (see the module docstring)."""

    _path: str
    _readonly: bool
    _options: StoreOptions
    _mutex: threading.RLock
    _pid: int
    _session: Session | None
    _closed: bool
    _stats: CacheStats
    _prefetcher: Prefetcher

    def _setup(self, path: str, readonly: bool, options: StoreOptions) -> None:
        self._path, self._readonly, self._options = path, readonly, options
        self._mutex = threading.RLock()
        self._pid = os.getpid()
        self._session = None
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
        self._check_open()
        if self._pid != os.getpid():  # a forked child: the fork guard closed the parent's env and lock
            self._session, self._readonly, self._stats = None, True, CacheStats()
            self._pid = os.getpid()
        if self._session is None:
            self._session = self._open_session()
        self._session.settle()  # a commit Python was interrupted around: the handle learns what LMDB did
        return self._session

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"the handle on {self._path} is closed; open the store again")

    def _writer(self, call: str) -> WriterSession:
        session = self._active()
        if session.readonly:
            raise ReadOnlyError(f"{call}: this handle on {self._path} is read-only; open it with readonly=False")
        return cast(WriterSession, session)  # a session that is not read-only is the writer's

    def _caught_up(self) -> Table:
        """The table, caught up with the latest commit for a reader."""
        session = self._active()
        session.refresh()
        return session.table

    def _after_fork_in_child(self) -> None:
        self._mutex = threading.RLock()  # another thread of the parent may have held it at fork
        self._prefetcher = Prefetcher(self._warm)  # the parent's thread does not exist here

    def _warm(self, ids: np.ndarray) -> None:
        with self._mutex:  # the prefetch thread's work, under the mutex as any call
            if not self._closed:
                self._active().prefetch(ids)

    def __getstate__(self) -> dict:
        return {"path": self._path, "options": self._options}

    def __setstate__(self, state: dict) -> None:
        self._setup(state["path"], True, state["options"])

    # ----------------------------------------------------------------- properties
    @property
    def path(self) -> str:
        return self._path

    @property
    def readonly(self) -> bool:
        return self._readonly or self._pid != os.getpid()
