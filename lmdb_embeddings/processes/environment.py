"""One LMDB environment per (process, store directory), shared by every handle.

LMDB allows an environment to be opened once per process and never used after fork
(../shared/FIELD_NOTES.md). This module keeps a registry keyed by (pid, realpath): handles in the
same process share one environment and one lock that serializes the moments when a
transaction is open; a forked child finds its parent's entries (different pid), closes
them without touching the parent's state, and opens its own.

A path is not a store: ``compact``, ``restore --force``, ``create(overwrite=True)`` (or a
user's delete and re-create) put ANOTHER directory at the same path. Each entry remembers
the identity of the data file it opened, ``(st_dev, st_ino)`` of ``data.mdb`` (the
environment keeps that file open, so the number cannot be reused by a new file while the
entry lives; a directory's inode can, as soon as it is deleted). ``acquire`` compares it
with the file now at the path and never hands out an entry that no longer matches: it
*retires* it (closes its environment: py-lmdb refuses to open a path twice in one process,
so the old one must go before the new one can open) and opens the store that is there now.
Handles still holding a retired entry notice it at their next call (a reader follows the
store at the path, see ``core/readers.py``).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from contextlib import contextmanager

import lmdb

from ..errors import CorruptionError, EmbeddingStoreError, StorageError
from ..format.records import DATA_FILE, META_DB, pack_record
from . import fork
from .data_file import DataFile

log = logging.getLogger(__name__)
LOCK_FILE = "lock.mdb"
MAX_DBS = 64
IDENTITY_CHECK_S = 0.1  # a reader looks at the path at least this often (see core/readers.py)
MAX_READERS = 2048
MIN_MAP_SIZE = 256 << 20
_registry: dict[str, SharedEnv] = {}
_registry_lock = threading.Lock()
_stranded: dict[str, str] = {}  # in a forked child: path -> why its inherited environment cannot be closed
_kept_alive: list[SharedEnv] = []
_held_for_fork: list[SharedEnv] = []


class SharedEnv:
    """A process's environment for one store, shared by all its handles there.

    The environment is opened read-only while the process has only readers: py-lmdb
    opens a named database of a writable environment with a WRITE transaction, which
    would block a DataLoader worker while the trainer holds a long write transaction.
    When a writable handle arrives, the environment is reopened writable in place
    (database handles are looked up through ``db()``, never cached by the stores).
    """

    def __init__(self, path: str, env: lmdb.Environment, writable: bool, readahead: bool, writemap: bool,
                 identity: tuple[int, int] | None = None):
        self.path, self.env, self.writable, self.readahead = path, env, writable, readahead
        self.writemap = writemap and writable
        self.identity = identity  # (st_dev, st_ino) of the data file this environment opened
        self.retired = False  # the store at the path is another one now: this environment is closed
        self.write_owner: int | None = None  # thread that began the open write transaction, if any
        self.snapshots = 0  # read transactions held across calls (format.snapshot: dump, verify, compact)
        self.map_epoch = 0  # changes whenever the map may have moved (resize, reopen): addresses into it are stale
        self.pid = os.getpid()
        self.lock = threading.RLock()
        self.users = 0
        self._dbs: dict[bytes, object] = {}
        self.data_file = DataFile(path, env.stat()["psize"])

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

    def make_writable(self, writemap: bool) -> None:
        """Reopen a read-only environment writable, in place (no transaction may be open)."""
        with self.lock:
            if self.writable:
                return
            self.env.close()
            self._dbs.clear()
            self.map_epoch += 1
            self.env = _open(self.path, readonly=False, readahead=self.readahead, writemap=writemap)
            self.writable, self.writemap = True, writemap
            self.open_dbs()

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

        The copy runs in LMDB with the GIL released, so it counts as an open snapshot: a child
        forked meanwhile leaves this environment alone (py-lmdb's close there would wait for
        the copy forever)."""
        self.count_snapshot(+1)
        try:
            self.env.copy(target, compact=True)
        finally:
            self.count_snapshot(-1)

    def count_snapshot(self, change: int) -> None:
        """Register (+1) or end (-1) a read that outlives one call; threads may do so at once."""
        with self.lock:
            self.snapshots += change

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

    def clear_stale_readers(self) -> None:
        """Free the reader slots of dead processes (a killed worker's snapshot pins pages until then)."""
        try:
            self.env.reader_check()
        except lmdb.Error:
            pass

    def mark_replaced(self) -> None:
        """After a swap, commit a ``replaced`` record into this (old, now unlinked) store.

        Readers in other processes that still have the old store open see LMDB's
        transaction id change at their next call, look at the path and follow the store
        that is there now (``core/readers.py``). Best effort: without it they notice
        within ``IDENTITY_CHECK_S`` anyway.
        """
        with self.lock:
            try:
                with self.env.begin(write=True) as txn:
                    txn.put(b"replaced", pack_record({"replaced_at": time.time()}), db=self.cached_db(META_DB))
            except lmdb.Error as exc:
                log.warning("%s: could not mark the replaced store (%s); its readers notice within %.1f s",
                            self.path, exc, IDENTITY_CHECK_S)

    def reopen_if_panicked(self) -> bool:
        """Reopen an environment LMDB has marked unusable; True if it was.

        When writing a meta page fails (an I/O error at the very end of a commit) LMDB sets
        MDB_FATAL_ERROR and refuses every later transaction with MDB_PANIC until the
        environment is closed. The file still holds the previous commit (the failed meta
        page is the only thing written over live data), so reopening is safe. Database
        handles of the old environment become invalid: they are reopened here.
        """
        with self.lock:
            try:
                self.begin_read().abort()
                return False
            except lmdb.PanicError:
                pass
            map_size = self.env.info()["map_size"]
            self.env.close()
            self._dbs.clear()
            self.map_epoch += 1
            self.env = _open(self.path, readonly=not self.writable, readahead=self.readahead, map_size=map_size,
                             writemap=self.writemap)
            self.open_dbs()
            return True

    def used_bytes(self) -> int:
        """Bytes up to the last committed page (the rest of a writemap file is sparse or free)."""
        return (self.env.info()["last_pgno"] + 1) * self.data_file.page_size

    def ensure_headroom(self, needed: int) -> None:
        """Grow the map (geometrically) so ``needed`` more bytes fit; no txn may be open."""
        with self.lock:
            info = self.env.info()
            want = self.used_bytes() + 2 * needed + (64 << 20)
            size = max(info["map_size"], MIN_MAP_SIZE)
            if want > size:
                while size < want:
                    size *= 2
                self.map_epoch += 1
                self.env.set_mapsize(size)


def _realpath(path: str) -> str:
    return os.path.realpath(os.fspath(path))


def data_file_identity(directory: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the data file in ``directory``, or None if there is none."""
    try:
        st = os.stat(os.path.join(directory, DATA_FILE))
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _drop_inherited() -> None:
    """Called in a child process: close (without using) environments of the parent.

    Two kinds cannot be closed here. One with a write transaction that another thread of
    the parent began (to spill changes): py-lmdb would wait for that thread, which does not
    exist in the child. One with a snapshot open (a dump, verify or compact in progress): closing
    would end its read transaction in LMDB's shared reader table, under the parent's feet.
    They are left as they are (the child's copy of memory; nothing is written), and the
    child refuses to open that store (``acquire``).
    """
    pid, me = os.getpid(), threading.get_ident()
    with _registry_lock:
        for key, shared in list(_registry.items()):
            if shared.pid != pid:
                del _registry[key]
                if shared.write_owner is not None and shared.write_owner != me:
                    _stranded[key] = "another thread of its parent had a write transaction open on it (changes " \
                                     "spilled from its cache), which cannot be released here; commit before forking"
                    _kept_alive.append(shared)  # never closed (nor garbage-collected) in this process
                    continue
                if shared.snapshots:
                    _stranded[key] = "its parent was reading a snapshot of it (a dump, verify or compact), which " \
                                     "closing it here would break; fork before or after that"
                    _kept_alive.append(shared)
                    continue
                try:
                    shared.env.close()  # py-lmdb skips LMDB cleanup after fork
                except Exception:
                    pass


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


def _open(path: str, readonly: bool, readahead: bool, map_size: int | None = None,
          writemap: bool = False) -> lmdb.Environment:
    """Open the environment (``sync`` + ``metasync``: a commit is durable when it returns).

    With ``writemap`` LMDB sizes the file to the map as it opens it, which would hide a
    truncated file (extended, sparse): the truncation check runs on a plain read-only open
    first. The map is never smaller than the file, so LMDB never cuts reserved blocks off.
    """
    map_size = map_size or MIN_MAP_SIZE
    preallocate_lock_file(path)
    if writemap:
        _open(path, readonly=True, readahead=readahead).close()
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


def acquire(path: str, write: bool, readahead: bool = True, writemap: bool = False) -> SharedEnv:
    """The process's environment for the store now at ``path`` (opened on first use).

    ``writemap`` (writers only) applies when this call opens or reopens it writable. An
    entry whose data file is no longer the one at the path is retired, never handed out.
    """
    real = _realpath(path)
    _drop_inherited()
    with _registry_lock:
        if real in _stranded:
            raise EmbeddingStoreError(f"{real}: this process was forked while {_stranded[real]}, or start workers "
                                      "with spawn/forkserver")
        shared = _registry.get(real)
        if shared is not None and not shared.is_current():
            _retire(shared)
            shared = None
        if shared is None:
            shared = _open_shared(real, write, readahead, write and writemap)
            _registry[real] = shared
        elif write:
            shared.make_writable(writemap)
        shared.users += 1
        return shared


def _open_shared(real: str, write: bool, readahead: bool, writemap: bool) -> SharedEnv:
    """A new entry for the store at ``real``, its identity taken around the open (a swap meanwhile: again)."""
    for _attempt in range(5):
        identity = data_file_identity(real)
        if identity is None:
            raise EmbeddingStoreError(f"no LMDB data file in {real}")
        env = _open(real, readonly=not write, readahead=readahead, writemap=writemap)
        if data_file_identity(real) == identity:
            break
        env.close()
    else:
        raise EmbeddingStoreError(f"{real} keeps being replaced by other processes; try again")
    shared = SharedEnv(real, env, write, readahead, writemap, identity)
    try:
        shared.open_dbs()
    except lmdb.Error as exc:
        env.close()
        raise EmbeddingStoreError(f"cannot read the databases of {real}: {exc}") from exc
    return shared


def _retire(shared: SharedEnv) -> None:
    """Close the environment of a store that was replaced at its path (registry lock held)."""
    if shared.write_owner is not None:
        raise EmbeddingStoreError(
            f"{shared.path} was replaced while a writable handle of this process still has uncommitted changes "
            "in the store that was there; close (or roll back) that handle first")
    if shared.snapshots:  # closing would end a dump/verify of the old store in the middle
        raise EmbeddingStoreError(
            f"{shared.path} was replaced while this process is still reading a snapshot (a dump, verify or "
            "compact) of the store that was there; open it again once that is done")
    with shared.lock:
        shared.retired = True
        shared.env.close()
    if _registry.get(shared.path) is shared:
        del _registry[shared.path]


def release(shared: SharedEnv) -> None:
    with _registry_lock:
        shared.users -= 1
        if shared.users <= 0 and shared.pid == os.getpid():
            if _registry.get(shared.path) is shared:
                del _registry[shared.path]
            shared.env.close()  # a retired one is closed already: closing again is harmless


def is_open_here(path: str) -> bool:
    """True if this process has the store now at ``path`` open."""
    _drop_inherited()
    shared = _registry.get(_realpath(path))
    return shared is not None and shared.is_current()


def _hold_for_fork() -> None:
    """Before a fork: no thread may be inside the registry or inside a transaction (see ``fork``)."""
    _registry_lock.acquire()
    for shared in list(_registry.values()):
        shared.lock.acquire()
        _held_for_fork.append(shared)


def _give_back_after_fork() -> None:
    while _held_for_fork:
        _held_for_fork.pop().lock.release()
    _registry_lock.release()


fork.holding(_hold_for_fork, _give_back_after_fork)


@fork.in_child
def _after_fork_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()  # held by the forking thread: this process's one is new
    for shared in _held_for_fork:
        shared.lock = threading.RLock()
    _held_for_fork.clear()
    _drop_inherited()
