"""One LMDB environment per (process, store directory), shared by every handle.

LMDB allows an environment to be opened once per process and never used after fork
(FIELD_NOTES.md). This module keeps a registry keyed by (pid, realpath): handles in the
same process share one environment and one lock that serializes the moments when a
transaction is open; a forked child finds its parent's entries (different pid), closes
them without touching the parent's state, and opens its own.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import lmdb

from .errors import CorruptionError, EmbeddingStoreError

DATA_FILE = "data.mdb"
MAX_DBS = 64
MAX_READERS = 2048
MIN_MAP_SIZE = 256 << 20
_registry: dict[str, SharedEnv] = {}
_registry_lock = threading.Lock()


class SharedEnv:
    def __init__(self, path: str, env: lmdb.Environment, writable: bool):
        self.path, self.env, self.writable = path, env, writable
        self.pid = os.getpid()
        self.lock = threading.RLock()
        self.users = 0
        self._dbs: dict[bytes, object] = {}

    def db(self, name: bytes, create: bool = False):
        """A named database handle, opened once per environment."""
        handle = self._dbs.get(name)
        if handle is None:
            # Without a txn, py-lmdb opens the handle in its own committed transaction: a
            # handle opened inside a read transaction is unusable in later ones.
            with self.lock:
                handle = self.env.open_db(name, create=create)
            self._dbs[name] = handle
        return handle

    def has_db(self, name: bytes) -> bool:
        if name in self._dbs:
            return True
        with self.lock:
            txn = self.begin_read()
            try:
                return txn.get(name) is not None
            finally:
                txn.abort()

    def begin_read(self) -> lmdb.Transaction:
        """A short read transaction; adopts a map size grown by the writer process."""
        try:
            return self.env.begin(buffers=True)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)
            return self.env.begin(buffers=True)

    @contextmanager
    def reading(self):
        with self.lock:
            txn = self.begin_read()
            try:
                yield txn
            finally:
                txn.abort()

    def reopen_if_panicked(self) -> bool:
        """Reopen an environment LMDB has marked unusable; True if it was.

        When writing a meta page fails (an I/O error at the very end of a commit) LMDB sets
        MDB_FATAL_ERROR and refuses every later transaction with MDB_PANIC until the
        environment is closed. The file still holds the previous commit (the failed meta
        page is the only thing written over live data), so reopening is safe. Database
        handles of the old environment become invalid: callers fetch them again.
        """
        with self.lock:
            try:
                self.begin_read().abort()
                return False
            except lmdb.PanicError:
                pass
            map_size = self.env.info()["map_size"]
            self.env.close()
            self.env = _open_lmdb(self.path, self.writable, map_size, getattr(self, "readahead", True))
            self._dbs.clear()
            return True

    def used_bytes(self) -> int:
        info, stat = self.env.info(), self.env.stat()
        return (info["last_pgno"] + 1) * stat["psize"]

    def ensure_headroom(self, needed: int) -> None:
        """Grow the map (geometrically) so ``needed`` more bytes fit; no txn may be open."""
        with self.lock:
            info = self.env.info()
            want = self.used_bytes() + 2 * needed + (64 << 20)
            size = max(info["map_size"], MIN_MAP_SIZE)
            if want > size:
                while size < want:
                    size *= 2
                self.env.set_mapsize(size)


def _realpath(path: str) -> str:
    return os.path.realpath(os.fspath(path))


def _drop_inherited() -> None:
    """Called in a child process: close (without using) environments of the parent."""
    pid = os.getpid()
    with _registry_lock:
        for key, shared in list(_registry.items()):
            if shared.pid != pid:
                try:
                    shared.env.close()  # py-lmdb skips LMDB cleanup after fork
                except Exception:
                    pass
                del _registry[key]


def acquire(path: str, map_size: int = MIN_MAP_SIZE, readahead: bool = True) -> SharedEnv:
    """The process's environment for the store at ``path`` (opened on first use)."""
    real = _realpath(path)
    _drop_inherited()
    with _registry_lock:
        shared = _registry.get(real)
        if shared is None:
            if not os.path.exists(os.path.join(real, DATA_FILE)):
                raise EmbeddingStoreError(f"no LMDB data file in {real}")
            writable = os.access(real, os.W_OK)
            env = _open_lmdb(real, writable, map_size, readahead)
            shared = _registry[real] = SharedEnv(real, env, writable)
            shared.readahead = readahead
        shared.users += 1
        return shared


def _open_lmdb(real: str, writable: bool, map_size: int, readahead: bool) -> lmdb.Environment:
    try:
        env = lmdb.open(real, subdir=True, map_size=map_size, max_dbs=MAX_DBS,
                        max_readers=MAX_READERS, readonly=not writable, create=False,
                        sync=True, metasync=True, writemap=False, readahead=readahead,
                        meminit=False, max_spare_txns=0, lock=True)
    except lmdb.Error as exc:
        raise EmbeddingStoreError(f"cannot open the LMDB environment in {real}: {exc}") from exc
    try:
        _check_not_truncated(real, env)
    except BaseException:
        env.close()
        raise
    try:
        env.reader_check()  # clear slots of readers killed earlier
    except lmdb.Error:
        pass
    return env


def _check_not_truncated(real: str, env: lmdb.Environment) -> None:
    """Refuse a data file shorter than its last committed page.

    LMDB maps the file and would die with SIGBUS on the first page past its end; the
    meta pages (read at open) say where the committed data ends, so compare first.
    """
    size = os.path.getsize(os.path.join(real, DATA_FILE))
    psize = env.stat()["psize"]
    needed = (env.info()["last_pgno"] + 1) * psize
    if size < max(needed, 2 * psize):
        raise CorruptionError(
            f"{os.path.join(real, DATA_FILE)} is truncated: {size} bytes, but its last committed page "
            f"ends at byte {needed}; restore the store from a dump or backup")


def release(shared: SharedEnv) -> None:
    with _registry_lock:
        shared.users -= 1
        if shared.users <= 0 and _registry.get(shared.path) is shared and shared.pid == os.getpid():
            del _registry[shared.path]
            shared.env.close()


def is_open_here(path: str) -> bool:
    _drop_inherited()
    return _realpath(path) in _registry


def create_env(path: str, map_size: int) -> lmdb.Environment:
    """A brand-new environment for building a store (not shared, closed by the caller)."""
    return lmdb.open(os.fspath(path), subdir=True, map_size=max(map_size, MIN_MAP_SIZE),
                     max_dbs=MAX_DBS, max_readers=MAX_READERS, sync=True, metasync=True,
                     writemap=False, meminit=False, max_spare_txns=0)


def _after_fork_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()  # the parent may have held it while forking
    _drop_inherited()


os.register_at_fork(after_in_child=_after_fork_in_child)
