"""One writer per store across all processes: an exclusive lock on ``writer.lock``.

The kernel releases the lock when the holder dies (even by kill -9), so a crashed trainer
never blocks the next one. A forked child closes its inherited copy of the descriptor at
once (``register_at_fork``), so DataLoader workers never keep their parent's lock alive.
The holder's pid is written into the file so a refused opener can name it.

The lock is taken twice on the same open file: an ``flock`` (what earlier versions took,
so a writer of either version excludes the other) and an open-file-description
``fcntl`` lock (``F_OFD_SETLK``). The second exists for :func:`holder_pid`: ``F_OFD_GETLK``
asks the kernel whether the file is locked WITHOUT taking the lock, so probing (``info``,
the checks before ``create(overwrite=True)``/``restore --force``) can never make a writer
that opens at that instant fail. Both locks belong to the open file description: closing
a forked child's copy of the descriptor releases neither.

A lock is only as good as the directory it sits in: a store swapped in at the path
between opening ``writer.lock`` and locking it would leave the opener holding the lock of
the store that left. :meth:`WriterLock.acquire` therefore checks, once locked, that the
file it locked is still the one at the path, and starts again if not.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import time
import weakref
from collections.abc import Iterator

import psutil

from ..errors import ReadOnlyError, StorageError, StoreNotFoundError, WriterLockedError
from . import fork

LOCK_FILE = "writer.lock"
_held: weakref.WeakSet[WriterLock] = weakref.WeakSet()
_OFD = hasattr(fcntl, "F_OFD_SETLK")  # Linux >= 3.15
_FLOCK = struct.Struct("hh4xqqi4x")  # struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid
_WHOLE_FILE_WRITE = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
_UNLOCK_WHOLE_FILE = _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0)
_SWAP_RETRIES = 20


class WriterLock:
    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock of the store now at ``directory`` and record our pid in it.

        Raises ``WriterLockedError`` (naming the holder) if another handle holds it,
        ``ReadOnlyError`` on a read-only filesystem or directory, ``StorageError`` if the
        pid cannot be written (disk full): in every failure nothing stays locked or open.
        """
        for _attempt in range(_SWAP_RETRIES):
            fd = self._open()
            try:
                locked = _lock(fd)
            except BaseException:
                os.close(fd)
                raise
            if not locked:
                holder = _read_pid(fd)
                os.close(fd)
                same = " (this process: close the other handle first)" if holder == os.getpid() else ""
                raise WriterLockedError(
                    f"{self.directory} is already open for writing by pid {holder}{same}; "
                    "open it with readonly=True, or close the writer first", holder_pid=holder,
                )
            if _same_file(fd, self.path):
                break
            _unlock_and_close(fd)  # another store was swapped in at the path meanwhile: lock that one
        else:
            raise WriterLockedError(f"{self.directory} keeps being replaced by other processes; try again")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            _unlock_and_close(fd)
            raise StorageError(f"cannot open {self.directory} for writing: recording the writer in {LOCK_FILE} "
                               f"failed ({exc.strerror}); nothing was opened: free space and try again") from None
        self.fd = fd
        _held.add(self)

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            if exc.errno == errno.EROFS:
                raise ReadOnlyError(f"{self.directory} is on a read-only filesystem; open it with readonly=True") \
                    from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise ReadOnlyError(f"{self.directory} is not writable by this user ({exc.strerror}); open it "
                                    "with readonly=True") from None
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise StoreNotFoundError(f"no store at {self.directory} (it was removed)") from None
            raise StorageError(f"cannot open {self.path} ({exc.strerror})") from None

    def moved_to(self, directory: str) -> None:
        """The locked store was renamed to ``directory`` (a finished build swapped in)."""
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            finally:
                _unlock_and_close(self.fd)
                self.fd = None
                _held.discard(self)

    def _forget_after_fork(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops only the child's reference; the parent keeps its lock
            self.fd = None


def _lock(fd: int) -> bool:
    """Both locks on ``fd``, or neither (False: another handle holds the store)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    if _OFD:
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _WHOLE_FILE_WRITE)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                fcntl.flock(fd, fcntl.LOCK_UN)
                return False
            # EINVAL: a filesystem without record locks; the flock still excludes other writers
    return True


def _unlock_and_close(fd: int) -> None:
    """Explicitly unlock first: a forked child may hold a copy of the descriptor."""
    try:
        if _OFD:
            try:
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _UNLOCK_WHOLE_FILE)
            except OSError:
                pass
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _same_file(fd: int, path: str) -> bool:
    """True if ``fd`` is the file now at ``path`` (not one a swap moved away)."""
    try:
        now = os.stat(path)
    except OSError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


@contextlib.contextmanager
def holding_writer_locks(directories: list[str]) -> Iterator[None]:
    """Hold the writer locks of ``directories`` (say, an old sharded store's shards, while it is replaced)."""
    locks = []
    try:
        for directory in directories:
            lock = WriterLock(directory)
            lock.acquire()
            locks.append(lock)
        yield
    finally:
        for lock in locks:
            lock.release()


def holder_pid(directory: str) -> int | None:
    """The pid holding the writer lock of a store, or None if nobody holds it.

    Never takes the lock (see the module docstring): the kernel is asked whether the file
    is locked, and only then is the pid read from it.
    """
    path = os.path.join(directory, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if _OFD:
            try:
                found = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _WHOLE_FILE_WRITE))
            except OSError:
                pass
            else:
                return _recorded_pid(fd) if found[0] != fcntl.F_UNLCK else None
        pid = _read_pid(fd)  # no record locks here: trust the pid file if that process is alive
        return pid if pid is not None and psutil.pid_exists(pid) else None
    finally:
        os.close(fd)


def _recorded_pid(fd: int) -> int | None:
    """The holder's pid; a holder that has just locked writes it within moments."""
    for _ in range(25):
        pid = _read_pid(fd)
        if pid is not None:
            return pid
        time.sleep(0.002)
    return None


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or "0") or None
    except (ValueError, OSError):
        return None


@fork.in_child
def _after_fork_in_child() -> None:
    for lock in list(_held):
        lock._forget_after_fork()
