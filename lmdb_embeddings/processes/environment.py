"""One LMDB environment per (process, store directory), shared by every handle: the registry.

LMDB allows an environment to be opened once per process and never used after fork
(../shared/FIELD_NOTES.md). :class:`Registry` keeps this process's environments keyed by
realpath (``processes/shared_env.SharedEnv``: its state, leases and close policy); handles in
the same process share one. A forked child gets a NEW registry (:meth:`Registry.for_child`): the
parent's environments are closed there without being used, or stranded when the parent was
using them in a way that closing would break (``SharedEnv.why_not_closable``), and the child
refuses to open those stores.

A path is not a store: ``compact``, ``restore --force``, ``create(overwrite=True)`` (or a
user's delete and re-create) put ANOTHER directory at the same path. Each entry remembers
the identity of the data file it opened, ``(st_dev, st_ino)`` of ``data.mdb`` (the
environment keeps that file open, so the number cannot be reused by a new file while the
entry lives; a directory's inode can, as soon as it is deleted). :meth:`Registry.acquire`
compares it with the file now at the path and never hands out an entry that no longer
matches: it *retires* it (closes it: py-lmdb refuses to open a path twice in one process, so
the old one must go before the new one can open) and opens the store that is there now.
Handles still holding a retired entry notice it at their next call (``core/readers.py``).

Finalizers (``EmbeddingStore.__del__``, the manager's ``weakref.finalize``) release
environments. The garbage collector can run them on a thread that is inside the registry
already (a GC pass during :meth:`Registry.acquire`), so :meth:`Registry.release` never waits
for the registry lock: if it is held, the release is queued and the holder performs it before
letting go. No finalizer can deadlock on it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque

from ..errors import EmbeddingStoreError
from . import fork
from .shared_env import (  # noqa: F401  (re-exported: the modules that open stores use these names)
    MAX_DBS,
    MAX_READERS,
    EnvState,
    SharedEnv,
    data_file_identity,
    open_env,
    preallocate_lock_file,
)

log = logging.getLogger(__name__)
IDENTITY_CHECK_S = 0.1  # a reader looks at the path at least this often (see core/readers.py)


def _realpath(path: str) -> str:
    return os.path.realpath(os.fspath(path))


class Registry:
    """This process's environments (see the module docstring); one per process, a new one after fork."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._entries: dict[str, SharedEnv] = {}
        self._stranded: dict[str, str] = {}  # path -> why the environment inherited from the parent stays
        self._kept: list[SharedEnv] = []  # never closed nor garbage-collected in this process
        self._deferred: deque[SharedEnv] = deque()  # releases asked for while the lock was held
        self._held: list[SharedEnv] = []  # environment locks taken for a fork

    # -- the lock: whoever holds it performs the releases queued meanwhile ------------------------
    def _enter(self) -> None:
        self._lock.acquire()
        self._drain()

    def _leave(self) -> None:
        while True:
            self._drain()
            self._lock.release()
            if not self._deferred or not self._lock.acquire(blocking=False):
                return

    def _drain(self) -> None:
        while self._deferred:
            self._release_locked(self._deferred.popleft())

    # -- handles take and give back environments ----------------------------------------------
    def acquire(self, path: str, write: bool, readahead: bool = True, writemap: bool = False) -> SharedEnv:
        """The process's environment for the store now at ``path`` (opened on first use).

        ``writemap`` (writers only) applies when this call opens or reopens it writable. An
        entry whose data file is no longer the one at the path is retired, never handed out.
        """
        real = _realpath(path)
        self._enter()
        try:
            if real in self._stranded:
                raise EmbeddingStoreError(f"{real}: this process was forked while its parent was using the store "
                                          f"({self._stranded[real]}); commit or let that end before forking, or start "
                                          "workers with spawn/forkserver")
            shared = self._entries.get(real)
            if shared is not None and not shared.is_current():
                self._retire(shared)
                shared = None
            if shared is None:
                shared = _open_shared(real, write, readahead, write and writemap)
                self._entries[real] = shared
            elif write:
                shared.make_writable(writemap)
            shared.users += 1
            return shared
        finally:
            self._leave()

    def release(self, shared: SharedEnv) -> None:
        """A handle lets its environment go; the last one closes it. Never waits (see the module docstring)."""
        if not self._lock.acquire(blocking=False):
            self._deferred.append(shared)  # the holder, maybe this very thread, performs it
            return
        self._drain()
        try:
            self._release_locked(shared)
        finally:
            self._leave()

    def _release_locked(self, shared: SharedEnv) -> None:
        shared.users -= 1
        if shared.users > 0 or shared.pid != self.pid or shared.state in (EnvState.RETIRED, EnvState.CLOSED):
            return
        if self._entries.get(shared.path) is shared:
            del self._entries[shared.path]
        why = shared.why_not_closable()
        if why is not None:  # cannot happen through the handles; never close under a user anyway
            log.warning("%s: left open at its last release because %s", shared.path, why)
            self._kept.append(shared)
            return
        shared.close()

    def is_open_here(self, path: str) -> bool:
        """True if this process has the store now at ``path`` open."""
        self._enter()
        try:
            shared = self._entries.get(_realpath(path))
            return shared is not None and shared.is_current()
        finally:
            self._leave()

    def _retire(self, shared: SharedEnv) -> None:
        """Close the environment of a store that was replaced at its path (lock held)."""
        with shared.lock:  # no reader of another thread is inside a transaction on it
            why = shared.why_not_closable()
            if why is not None:
                raise EmbeddingStoreError(
                    f"{shared.path} was replaced by another store, but this process still uses the one that was "
                    f"there: {why}; finish that (commit or roll back, let the dump end), then open it again")
            shared.close(EnvState.RETIRED)
        if self._entries.get(shared.path) is shared:
            del self._entries[shared.path]

    # -- fork ---------------------------------------------------------------------------------
    def hold_for_fork(self) -> None:
        """Before a fork: no thread may be inside the registry or inside a transaction (see ``fork``)."""
        self._lock.acquire()
        for shared in list(self._entries.values()):
            shared.lock.acquire()
            self._held.append(shared)

    def give_back_after_fork(self) -> None:
        while self._held:
            self._held.pop().lock.release()
        self._leave()

    def for_child(self) -> Registry:
        """In a forked child: a new registry; the parent's environments closed without being used, or stranded.

        Stranded: a write transaction another thread of the parent began (py-lmdb would wait for that
        thread, which does not exist here), or a snapshot being read (closing would end its read
        transaction in LMDB's shared reader table, under the parent's feet). They are left as they are
        (the child's copy of memory; nothing is written), and the child refuses to open those stores.
        """
        child = Registry()
        child._stranded.update(self._stranded)
        child._kept.extend(self._kept)
        for shared in self._held:
            shared.lock = threading.RLock()  # held by the forking thread: this process's one is new
        for path, shared in self._entries.items():
            why = shared.why_not_closable(writes_may_go=True)
            if why is not None:
                shared.state = EnvState.STRANDED
                child._stranded[path] = why
                child._kept.append(shared)
                continue
            try:
                shared.close()  # py-lmdb skips LMDB cleanup after fork
            except Exception:
                pass
        return child


def _open_shared(real: str, write: bool, readahead: bool, writemap: bool) -> SharedEnv:
    """A new entry for the store at ``real``, its identity taken around the open (a swap meanwhile: again)."""
    for _attempt in range(5):
        identity = data_file_identity(real)
        if identity is None:
            raise EmbeddingStoreError(f"no LMDB data file in {real}")
        env = open_env(real, readonly=not write, readahead=readahead, writemap=writemap)
        if data_file_identity(real) == identity:
            break
        env.close()
    else:
        raise EmbeddingStoreError(f"{real} keeps being replaced by other processes; try again")
    shared = SharedEnv(real, env, write, readahead, writemap, identity)
    try:
        shared.open_dbs()
    except Exception as exc:
        env.close()
        raise EmbeddingStoreError(f"cannot read the databases of {real}: {exc}") from exc
    return shared


_registry = Registry()


def registry() -> Registry:
    """This process's registry (a forked child's own, even if the fork hook did not run)."""
    global _registry
    if _registry.pid != os.getpid():
        _registry = _registry.for_child()
    return _registry


def acquire(path: str, write: bool, readahead: bool = True, writemap: bool = False) -> SharedEnv:
    return registry().acquire(path, write, readahead, writemap)


def release(shared: SharedEnv) -> None:
    registry().release(shared)


def is_open_here(path: str) -> bool:
    return registry().is_open_here(path)


fork.holding(lambda: _registry.hold_for_fork(), lambda: _registry.give_back_after_fork())


@fork.in_child
def _after_fork_in_child() -> None:
    registry()
