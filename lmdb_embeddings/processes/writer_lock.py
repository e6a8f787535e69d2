"""One writer per store across all processes: an exclusive ``flock`` on ``writer.lock``.

The kernel releases the lock when the holder dies (even by kill -9), so a crashed trainer
never blocks the next one. A forked child closes its inherited copy of the descriptor at
once (``register_at_fork``), so DataLoader workers never keep their parent's lock alive.
The holder's pid is written into the file so a refused opener can name it.
"""

from __future__ import annotations

import fcntl
import os
import weakref

from ..errors import WriterLockedError
from . import fork

LOCK_FILE = "writer.lock"
_held: weakref.WeakSet[WriterLock] = weakref.WeakSet()


class WriterLock:
    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK_FILE)
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            same = " (this process: close the other handle first)" if holder == os.getpid() else ""
            raise WriterLockedError(
                f"{os.path.dirname(self.path)} is already open for writing by pid {holder}{same}; "
                "open it with readonly=True, or close the writer first", holder_pid=holder,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        _held.add(self)

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None
                _held.discard(self)

    def _forget_after_fork(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops only the child's reference; the parent keeps its lock
            self.fd = None


def holder_pid(directory: str) -> int | None:
    """The pid holding the writer lock of a store, or None if nobody holds it."""
    path = os.path.join(directory, LOCK_FILE)
    if not os.path.exists(path):
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or "0") or None
    except ValueError:
        return None


@fork.in_child
def _after_fork_in_child() -> None:
    for lock in list(_held):
        lock._forget_after_fork()
