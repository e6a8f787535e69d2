"""One process's LMDB environment for one store, its state, its leases, and the one rule for closing it.

An environment is shared by every handle of the process on that store (``environment.py``
keeps the registry). Its life, explicitly (:class:`EnvState`):

* ``READ_ONLY`` while the process has only readers: py-lmdb opens a named database of a
  writable environment with a WRITE transaction, which would block a DataLoader worker while
  the trainer holds a long write transaction;
* ``WRITABLE`` once a writable handle arrives (reopened in place; database handles are looked
  up through :meth:`SharedEnv.cached_db`, never cached by the stores);
* ``RETIRED`` when the store at the path is another one now (closed, so the new one can open);
* ``STRANDED`` in a forked child, when the parent was using it in a way that closing would
  break: never used nor closed there;
* ``CLOSED`` when its last user let it go.

Two things outlive one store call and are held as *leases* (context managers): a write
transaction (:meth:`SharedEnv.write_lease`, held by ``processes/transaction.WriteTransaction``
from begin to commit or abort; only the thread that began it can end it) and a snapshot
(:meth:`SharedEnv.snapshot_lease`: a dump, verify or compact reading one read transaction).
While either is held, the environment must not be closed, and :meth:`SharedEnv.why_not_closable`
says so: retiring, reopening writable, reopening after a panic, dropping after fork and the
last release all ask it, and none closes an environment something is still using.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import threading
import time
from contextlib import contextmanager

import lmdb

from ..errors import CorruptionError, EmbeddingStoreError, StorageError
from ..format.records import DATA_FILE, META_DB, pack_record
from .data_file import DataFile
from .space import SpaceBudget
from .transaction import WriteTransaction

log = logging.getLogger(__name__)
LOCK_FILE = "lock.mdb"
MAX_DBS = 64
MAX_READERS = 2048


class EnvState(enum.Enum):
    READ_ONLY = "read-only"
    WRITABLE = "writable"
    RETIRED = "retired"  # another store is at the path now: closed
    STRANDED = "stranded"  # a forked child's copy of an environment its parent was using: never touched
    CLOSED = "closed"


class SharedEnv:
    """A process's environment for one store, shared by all its handles there (see the module docstring)."""

    def __init__(self, path: str, env: lmdb.Environment, writable: bool, readahead: bool, writemap: bool,
                 identity: tuple[int, int] | None = None):
        self.path, self.env, self.readahead = path, env, readahead
        self.state = EnvState.WRITABLE if writable else EnvState.READ_ONLY
        self.writemap = writemap and writable
        self.identity = identity  # (st_dev, st_ino) of the data file this environment opened
        self.write_owner: int | None = None  # thread holding the write lease (an open write transaction)
        self.snapshots = 0  # snapshot leases held (processes.snapshot: dump, verify, compact)
        self.map_epoch = 0  # changes whenever the map may move (resize, close): addresses into it are stale then
        self.pid = os.getpid()
        self.lock = threading.RLock()
        self.users = 0
        self._dbs: dict[bytes, object] = {}
        self.data_file = DataFile(path, env.stat()["psize"])
        self.budget = SpaceBudget(self.data_file.page_size)

    @property
    def writable(self) -> bool:
        return self.state is EnvState.WRITABLE

    @property
    def retired(self) -> bool:
        return self.state is EnvState.RETIRED

    # -- leases and the close policy ---------------------------------------------------------
    @contextmanager
    def write_lease(self):
        """Held while a write transaction is open on this environment (by the thread that began it)."""
        self.write_owner = threading.get_ident()
        try:
            yield
        finally:
            self.write_owner = None

    @contextmanager
    def snapshot_lease(self):
        """Held while a read outlives one call (a dump, verify or compact), from before its first LMDB call:
        a child forked meanwhile leaves this environment alone (py-lmdb's close there would wait for it)."""
        with self.lock:  # threads may start snapshots at once
            self.snapshots += 1
        try:
            yield
        finally:
            with self.lock:
                self.snapshots -= 1

    def why_not_closable(self, writes_may_go: bool = False) -> str | None:
        """Why closing (or reopening) this environment now would break something, or None if it may close.

        ``writes_may_go``: this thread's own open write transaction may be discarded (a forked child
        dropping its parent's). Another thread's write transaction never may: py-lmdb's close waits
        for it. Nor may a snapshot being read: closing ends its read transaction mid-way.
        """
        owner = self.write_owner
        if owner is not None and (owner != threading.get_ident() or not writes_may_go):
            return ("a write transaction is open on it (a writable handle spilled changes from its cache into it "
                    "and has not committed)")
        if self.snapshots:
            return "a snapshot of it is being read (a dump, verify or compact in progress)"
        return None

    def close(self, state: EnvState = EnvState.CLOSED) -> None:
        """Close the LMDB environment (the caller checked :meth:`why_not_closable`)."""
        self.state = state
        self._dbs.clear()
        self.map_epoch += 1
        self.env.close()

    # -- named databases ---------------------------------------------------------------------
    def cached_db(self, name: bytes):
        """The handle of a named database opened earlier, or None.

        Handles are only ever opened outside transactions (``open_dbs``) or inside the
        writer's own transaction (``create_db``): LMDB fixes the set of databases a
        transaction can see when it begins.
        """
        return self._dbs.get(name)

    def open_dbs(self, names=None) -> None:
        """Open the given named databases (default: all that exist); no txn may be open."""
        with self.lock:
            if names is None:
                txn = self.env.begin()
                try:
                    names = [bytes(key) for key in txn.cursor().iternext(keys=True, values=False)]
                finally:
                    txn.abort()
            for name in names:
                if name not in self._dbs:
                    try:
                        self._dbs[name] = self.env.open_db(name, create=False)
                    except lmdb.IncompatibleError:
                        pass  # a plain key, not a named database (a foreign environment)

    def create_db(self, name: bytes, txn: lmdb.Transaction):
        """Create a database inside the caller's write transaction; see ``forget_db``."""
        handle = self._dbs.get(name)
        if handle is None:
            handle = self._dbs[name] = self.env.open_db(name, txn=txn, create=True)
        return handle

    def forget_db(self, name: bytes) -> None:
        """Drop a handle created in a transaction that was aborted (it is invalid now)."""
        self._dbs.pop(name, None)

    # -- reopening in place --------------------------------------------------------------------
    def make_writable(self, writemap: bool) -> None:
        """Reopen a read-only environment writable, in place; refused while something reads it.

        Raises ``EmbeddingStoreError`` when another thread of this process is reading a snapshot
        of the store: reopening would end that read transaction in the middle of the dump.
        """
        with self.lock:
            if self.writable:
                return
            why = self.why_not_closable()
            if why is not None:
                raise EmbeddingStoreError(
                    f"{self.path} cannot be opened writable now: this process has it open read-only and {why}, "
                    "which reopening it writable would end; open the writable handle once that is done, or before "
                    "starting it")
            self.close(EnvState.READ_ONLY)
            self.env = open_env(self.path, readonly=False, readahead=self.readahead, writemap=writemap)
            self.state, self.writemap = EnvState.WRITABLE, writemap
            self.open_dbs()

    def reopen_if_panicked(self) -> bool:
        """Reopen an environment LMDB has marked unusable; True if it was.

        When writing a meta page fails (an I/O error at the very end of a commit) LMDB sets
        MDB_FATAL_ERROR and refuses every later transaction with MDB_PANIC until the
        environment is closed. The file still holds the previous commit (the failed meta
        page is the only thing written over live data), so reopening is safe. Database
        handles of the old environment become invalid: they are reopened here. While a
        snapshot is being read it stays as it is (the read goes on; the next commit tries again).
        """
        with self.lock:
            try:
                self.begin_read().abort()
                return False
            except lmdb.PanicError:
                pass
            why = self.why_not_closable(writes_may_go=True)
            if why is not None:
                log.warning("%s: LMDB marked the environment unusable after a failed commit; it stays so (commits "
                            "fail) until it can be reopened, because %s", self.path, why)
                return False
            map_size = self.env.info()["map_size"]
            state = self.state
            self.close(state)
            self.env = open_env(self.path, readonly=state is not EnvState.WRITABLE, readahead=self.readahead,
                                map_size=map_size, writemap=self.writemap)
            self.open_dbs()
            return True

    # -- reading -------------------------------------------------------------------------------
    def begin_read(self) -> lmdb.Transaction:
        """A short read transaction; adopts a map size grown by the writer process."""
        try:
            return self.env.begin(buffers=True)
        except lmdb.MapResizedError:
            self.map_epoch += 1
            self.env.set_mapsize(0)
            return self.env.begin(buffers=True)

    def copy_compacted(self, target: str) -> None:
        """LMDB's compacting copy of the committed state into the directory ``target``.

        The copy runs in LMDB with the GIL released, so it holds a snapshot lease."""
        with self.snapshot_lease():
            self.env.copy(target, compact=True)

    @contextmanager
    def reading(self, current_only: bool = False):
        """One read transaction under the lock. A retired environment yields None with
        ``current_only`` (the caller follows the store at the path) and raises otherwise."""
        with self.lock:
            if self.retired:
                if current_only:
                    yield None
                    return
                raise EmbeddingStoreError(f"{self.path} was replaced by another store while this handle had the "
                                          "old one open; open it again")
            txn = self.begin_read()
            try:
                yield txn
            finally:
                txn.abort()

    def is_current(self) -> bool:
        """True while the data file at the path is still the one this environment opened (one ``stat``)."""
        return not self.retired and data_file_identity(self.path) == self.identity

    # -- writing -------------------------------------------------------------------------------
    def clear_stale_readers(self) -> None:
        """Free the reader slots of dead processes (a killed worker's snapshot pins pages until then)."""
        try:
            self.env.reader_check()
        except lmdb.Error:
            pass

    def last_txnid(self) -> int:
        """LMDB's id of the last committed transaction, read from the meta pages."""
        return self.env.info()["last_txnid"]

    def used_bytes(self) -> int:
        """Bytes up to the last committed page (the rest of a writemap file is sparse or free)."""
        return (self.env.info()["last_pgno"] + 1) * self.data_file.page_size

    def ensure_headroom(self, needed: int) -> None:
        """Grow the map (geometrically, ``SpaceBudget.map_size``) so ``needed`` more bytes fit; no txn may be open."""
        with self.lock:
            current = self.env.info()["map_size"]
            size = self.budget.map_size(current, self.used_bytes(), needed)
            if size > current:
                self.map_epoch += 1
                self.env.set_mapsize(size)

    def mark_replaced(self) -> None:
        """After a swap, commit a ``replaced`` record into this (old, now unlinked) store.

        Readers in other processes that still have the old store open see LMDB's transaction
        id change at their next call, look at the path and follow the store that is there now
        (``core/readers.py``). Best effort: without it they notice within ``IDENTITY_CHECK_S``.
        """
        with self.lock:
            pending = WriteTransaction(self)
            try:
                pending.begin()
                pending.put(META_DB, b"replaced", pack_record({"replaced_at": time.time()}))
                pending.commit()
            except (lmdb.Error, EmbeddingStoreError) as exc:
                log.warning("%s: could not mark the replaced store (%s); its readers notice within a moment",
                            self.path, exc)
            finally:
                pending.abort()


def data_file_identity(directory: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the data file in ``directory``, or None if there is none."""
    try:
        st = os.stat(os.path.join(directory, DATA_FILE))
    except OSError:
        return None
    return st.st_dev, st.st_ino


# LMDB's lock file holds a header (MDB_txninfo: two cache lines plus the first reader slot) and
# one 64-byte slot per further reader; the first opener sizes it with ftruncate, sparse.
_LOCK_FILE_BYTES = 192 + (MAX_READERS - 1) * 64


def preallocate_lock_file(directory: str) -> None:
    """Give a store without one a ``lock.mdb`` whose blocks are allocated, before LMDB opens it.

    LMDB writes its lock file through a shared memory map; a sparse one on a full disk kills
    the process with SIGBUS instead of failing. Sized as LMDB sizes it for ``MAX_READERS``,
    so LMDB takes it as it is. Nothing to do on a read-only filesystem (LMDB then reads
    without a lock file) or when the file exists.
    """
    path = os.path.join(directory, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.EROFS, errno.EACCES, errno.EPERM):
            return
        raise StorageError(f"cannot create {path} ({exc.strerror})") from None
    try:
        os.posix_fallocate(fd, 0, _LOCK_FILE_BYTES)
    except OSError as exc:
        os.close(fd)
        fd = None
        os.unlink(path)
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            reason = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc.strerror
            raise StorageError(f"cannot create the lock file of {directory} ({reason}); nothing was changed") \
                from None
    finally:
        if fd is not None:
            os.close(fd)


def open_env(path: str, readonly: bool, readahead: bool, map_size: int | None = None,
             writemap: bool = False) -> lmdb.Environment:
    """Open the environment (``sync`` + ``metasync``: a commit is durable when it returns).

    With ``writemap`` LMDB sizes the file to the map as it opens it, which would hide a
    truncated file (extended, sparse): the truncation check runs on a plain read-only open
    first. The map is never smaller than the file, so LMDB never cuts reserved blocks off.
    """
    map_size = map_size or SpaceBudget.MIN_MAP
    preallocate_lock_file(path)
    if writemap:
        open_env(path, readonly=True, readahead=readahead).close()
        map_size = max(map_size, os.path.getsize(os.path.join(path, DATA_FILE)))
    try:
        env = lmdb.open(path, subdir=True, map_size=map_size, max_dbs=MAX_DBS, max_readers=MAX_READERS,
                        readonly=readonly, create=False, sync=True, metasync=True, writemap=writemap,
                        readahead=readahead, meminit=False, max_spare_txns=0, lock=True)
    except lmdb.Error as exc:
        raise EmbeddingStoreError(f"cannot open the LMDB environment in {path}: {exc}") from exc
    try:
        if not writemap:
            _check_not_truncated(path, env)
    except BaseException:
        env.close()
        raise
    try:
        env.reader_check()  # clear slots of readers killed earlier
    except lmdb.Error:
        pass
    return env


def _check_not_truncated(path: str, env: lmdb.Environment) -> None:
    """Refuse a data file shorter than its last committed page.

    LMDB maps the file and would die with SIGBUS on the first page past its end; the
    meta pages (read at open) say where the committed data ends, so compare first.
    """
    size = os.path.getsize(os.path.join(path, DATA_FILE))
    psize = env.stat()["psize"]
    needed = (env.info()["last_pgno"] + 1) * psize
    if size < max(needed, 2 * psize):
        raise CorruptionError(
            f"{os.path.join(path, DATA_FILE)} is truncated: {size} bytes, but its last committed page "
            f"ends at byte {needed}; restore the store from a dump or backup")
