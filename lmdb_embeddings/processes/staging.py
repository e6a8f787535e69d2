"""Building a store beside its path, then swapping it in: the one way a whole store appears.

``create``, ``restore``, ``compact``, ``import-cosir`` and the manager's save all build a
complete store in a hidden sibling directory (same filesystem, so the final rename is
atomic) and swap it in only once it is finished, so a crash at any moment leaves the old
store or none at the path, never half of one. An existing store is only ever replaced
while its writer lock is held: no writer can be working on the copy that disappears.

Races (many processes creating one path at once, e.g. DDP ranks doing "if not exists:
create"): the check before building is only advice. What decides is the swap itself:
where nothing may be replaced, the finished directory is renamed onto the path (``rename(2)``),
which the kernel refuses atomically once another store is there (``StoreExistsError``),
so exactly one creator wins. A creator can take the writer lock of its new store before
the swap (``lock_new``) and keep it into its open, so nobody can replace the store between
the swap and the moment its handle has it. A path that is a symbolic link is resolved
first: the real directory is swapped and the link keeps pointing at it.
"""

from __future__ import annotations

import errno
import os
import shutil

from ..errors import (
    EmbeddingStoreError,
    InvalidInputError,
    ReadOnlyError,
    StorageError,
    StoreExistsError,
    WriterLockedError,
)
from ..format.records import is_store
from ..fsutil import fsync_dir, remove_stale_temps, replace_dir, sibling_temp
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
    refuse_if_open(path)
    return True


def refuse_if_open(path: str) -> None:
    """``WriterLockedError`` if the store at ``path`` is open in this process or has a writer anywhere."""
    if environment.is_open_here(path):
        raise WriterLockedError(f"{path} is open in this process; close its handles before replacing it",
                                holder_pid=os.getpid())
    holder = holder_pid(path)
    if holder is not None:
        raise WriterLockedError(f"{path} is open for writing by pid {holder}; close it before replacing it",
                                holder_pid=holder)


class StagedStore:
    """``with StagedStore(path, "restoring") as stage:`` build in ``stage.tmp``, then ``stage.swap_in(replace)``.

    ``purpose`` names the hidden directory (``.NAME.<purpose>-<pid>-<random>``); leftovers of
    killed processes with the same purpose are removed first. With ``hold_lock`` the writer
    lock of the store at ``path`` is taken on entry and held until exit (compact: the store
    must not change while it is copied). Leaving the block without ``swap_in`` (an error)
    removes everything that was built.
    """

    def __init__(self, path: str, purpose: str, *, hold_lock: bool = False):
        self.path = os.path.realpath(os.fspath(path))  # swap the real directory, never a link to it
        self.purpose, self.hold_lock = purpose, hold_lock
        self.tmp: str | None = None
        self._lock: WriterLock | None = None
        self._new_lock: WriterLock | None = None

    def __enter__(self) -> StagedStore:
        if self.hold_lock:
            lock = WriterLock(self.path)
            lock.acquire()
            self._lock = lock
        try:
            remove_stale_temps(self.path, self.purpose)
            self.tmp = sibling_temp(self.path, self.purpose)
            _mkdir(self.tmp)
        except BaseException:
            self._release()
            raise
        return self

    def lock_new(self) -> WriterLock:
        """Take the writer lock of the finished store in ``tmp``; after ``swap_in`` it is the caller's."""
        lock = WriterLock(self.tmp)
        lock.acquire()
        self._new_lock = lock
        return lock

    def swap_in(self, replace: bool, *, only_stores: bool = True) -> None:
        """Put the finished store (or directory) at the path.

        ``replace``: an existing store there is replaced atomically, under its writer lock
        (``WriterLockedError`` while a writer holds it); a directory that is not a store only
        with ``only_stores=False`` (a directory of files the caller has checked). Without
        ``replace``, anything that appeared at the path meanwhile is never touched:
        ``StoreExistsError``.
        """
        if self._lock is not None:  # compact: the old store has been locked all along
            self._exchange()
        elif replace and (is_store(self.path) or (not only_stores and os.path.isdir(self.path))):
            self._replace_under_its_lock(only_stores)
        elif not self._claim():  # something arrived at the path since the caller's check
            if not replace:
                raise StoreExistsError(f"something appeared at {self.path} while this was being built; "
                                       "it was left as it is")
            self._replace_under_its_lock(only_stores)
        if self._new_lock is not None:
            self._new_lock.moved_to(self.path)
            self._new_lock = None  # handed over with the store

    def _replace_under_its_lock(self, only_stores: bool) -> None:
        if not is_store(self.path):
            if only_stores:
                raise StoreExistsError(f"{self.path} holds something that is not a store; refusing to replace it")
            replace_dir(self.tmp, self.path)  # files the caller checked: no store, no writer lock
            return
        lock = WriterLock(self.path)
        lock.acquire()
        try:
            self._exchange()
        finally:
            lock.release()

    def _claim(self) -> bool:
        """``rename`` onto the path: True if done, False if a non-empty directory is there (atomic)."""
        try:
            os.rename(self.tmp, self.path)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                return False
            if exc.errno == errno.ENOTDIR:
                raise StoreExistsError(f"{self.path} exists and is not a directory") from None
            raise
        fsync_dir(os.path.dirname(self.path))
        return True

    def _exchange(self) -> None:
        """Replace the (locked) store at the path, then tell its readers (``SharedEnv.mark_replaced``)."""
        try:
            old = environment.acquire(self.path, write=True)
        except EmbeddingStoreError:  # a damaged store can still be replaced; its readers notice later
            old = None
        try:
            replace_dir(self.tmp, self.path)
            if old is not None:
                old.mark_replaced()
        finally:
            if old is not None:
                environment.release(old)

    def _release(self) -> None:
        for name in ("_new_lock", "_lock"):
            lock = getattr(self, name)
            if lock is not None:
                lock.release()
                setattr(self, name, None)

    def __exit__(self, *exc) -> None:
        try:
            if self.tmp is not None and os.path.exists(self.tmp):
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            self._release()


def _mkdir(path: str) -> None:
    """The hidden build directory, with the error that says why it cannot be made."""
    try:
        os.mkdir(path)
    except OSError as exc:
        parent = os.path.dirname(path)
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise ReadOnlyError(f"cannot create a store in {parent}: {exc.strerror}") from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise InvalidInputError(f"the parent directory {parent} does not exist; create it first") from None
        raise StorageError(f"cannot create a store in {parent}: {exc.strerror}") from None
