"""The writer's data file under ``writemap``: disk blocks reserved ahead, meta pages kept across a failure.

With ``writemap`` LMDB stores pages straight into a shared mapping of ``data.mdb`` (no
private copy of the pending transaction: the writer's memory stays bounded by its cache)
and commits with ``msync``. Two hazards come with it, both handled here:

* The file is sparse (LMDB sizes it to the map). A store into a hole on a full disk kills
  the process with ``SIGBUS``. :meth:`DataFile.reserve` allocates, with
  ``posix_fallocate``, every block a transaction may write *before* it writes any, so a
  full disk is a clean error (the session raises ``CommitError``) and nothing was written.
* LMDB writes the new meta page into the map, then ``msync``\\ s it. If that ``msync``
  fails, the page cache still holds a meta page for a commit that was reported as failed,
  and the next open would see it. :meth:`DataFile.save_meta` keeps both meta pages before a
  commit and :meth:`DataFile.restore_meta` writes them back if a failed commit changed them.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os

from ..format.records import DATA_FILE
from ..fsutil import allocated_bytes

log = logging.getLogger(__name__)


class DataFile:
    """``data.mdb`` of one store, as the writer's session sees it."""

    def __init__(self, directory: str, page_size: int):
        self.path = os.path.join(directory, DATA_FILE)
        self.page_size = page_size
        self._reserved = 0  # bytes from the start of the file known to be allocated

    def reserve(self, end: int) -> None:
        """Make sure the first ``end`` bytes of the file are allocated on disk.

        Raises ``OSError`` (ENOSPC/EDQUOT when the disk is full); the caller says what failed.
        """
        if end <= self._reserved:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.posix_fallocate(fd, 0, end)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # a filesystem without fallocate: nothing to reserve with, the write itself will tell
        finally:
            os.close(fd)
        self._reserved = end

    def allocated_bytes(self) -> int:
        return allocated_bytes(self.path)

    def save_meta(self) -> bytes:
        """Both meta pages as they are now (the last committed state)."""
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, 2 * self.page_size, 0)
        finally:
            os.close(fd)

    def restore_meta(self, saved: bytes) -> bool:
        """After a failed commit: put ``saved`` back if the meta pages changed; True if they had.

        The bytes go in through a shared mapping, so the page cache (what every process
        reads) holds the old meta pages even when the device keeps failing; flushing them
        to disk is then best effort (the disk still holds the old ones: the new never synced).
        """
        if self.save_meta() == saved:
            return False
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        try:
            with mmap.mmap(fd, len(saved), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as pages:
                pages[:] = saved
                try:
                    pages.flush()
                except OSError as exc:
                    log.warning("%s: the previous meta pages are back in the page cache, but syncing them "
                                "failed too (%s)", self.path, exc.strerror)
        finally:
            os.close(fd)
        return True

