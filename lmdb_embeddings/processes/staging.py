"""Building a store beside its path, then swapping it in: the one way a whole store appears.

``create``, ``restore``, ``compact``, ``import-cosir`` and the manager's save all build a
complete store in a hidden sibling directory (same filesystem, so the final rename is
atomic) and swap it in only once it is finished, so a crash at any moment leaves the old
store or none at the path, never half of one. An existing store is only ever replaced
while its writer lock is held: no writer can be working on the copy that disappears.
"""

from __future__ import annotations

import os
import shutil

from ..errors import StoreExistsError, WriterLockedError
from ..format.records import is_store
from ..fsutil import remove_stale_temps, replace_dir, sibling_temp
from . import environment
from .writer_lock import WriterLock, holder_pid


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
        raise WriterLockedError(f"{path} is open in this process; close its handles before replacing it",
                                holder_pid=os.getpid())
    holder = holder_pid(path)
    if holder is not None:
        raise WriterLockedError(f"{path} is open for writing by pid {holder}; close it before replacing it",
                                holder_pid=holder)
    return True


class StagedStore:
    """``with StagedStore(path, "restoring") as stage:`` build in ``stage.tmp``, then ``stage.swap_in()``.

    ``purpose`` names the hidden directory (``.NAME.<purpose>-<pid>-<random>``); leftovers of
    killed processes with the same purpose are removed first. With ``hold_lock`` the writer
    lock of the store at ``path`` is taken on entry and held until exit (compact: the store
    must not change while it is copied). Leaving the block without ``swap_in`` (an error)
    removes everything that was built.
    """

    def __init__(self, path: str, purpose: str, *, hold_lock: bool = False):
        self.path, self.purpose, self.hold_lock = path, purpose, hold_lock
        self.tmp: str | None = None
        self._lock: WriterLock | None = None

    def __enter__(self) -> StagedStore:
        if self.hold_lock:
            lock = WriterLock(self.path)
            lock.acquire()
            self._lock = lock
        try:
            remove_stale_temps(self.path, self.purpose)
            self.tmp = sibling_temp(self.path, self.purpose)
            os.mkdir(self.tmp)
        except BaseException:
            self._release()
            raise
        return self

    def swap_in(self) -> None:
        """Put the finished store at the path (atomically replacing an old one, under its writer lock)."""
        if self._lock is not None or not is_store(self.path):
            replace_dir(self.tmp, self.path)
            return
        lock = WriterLock(self.path)
        lock.acquire()
        try:
            replace_dir(self.tmp, self.path)
        finally:
            lock.release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __exit__(self, *exc) -> None:
        try:
            if self.tmp is not None and os.path.exists(self.tmp):
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            self._release()
