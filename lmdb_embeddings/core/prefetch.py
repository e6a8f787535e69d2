"""``store.prefetch(ids)``: rows a caller will need soon, brought closer by a background thread.

A training loop knows its next batches (a sampler's permutation). ``prefetch`` queues their IDs
and returns at once; one thread per handle then warms them under the handle's mutex, like any
call (so never inside LMDB while another thread forks, and never beside another call on the same
caches): for a table that fits L1 it loads the chunks into L1; for a larger one it looks the
chunks up in LMDB's map (verifying the checksums of versions not seen yet, the expensive part
after a commit) and asks the kernel to read their pages ahead (``madvise(MADV_WILLNEED)``).
py-lmdb and the kernel calls release the GIL, so the caller's thread keeps computing meanwhile.

A hint changes nothing any call returns (it only moves work), and fails silently: what it could
not warm, the call that needs the rows reads as usual and raises what there is to raise. The
thread exits after ``IDLE_S`` without hints, holds only a weak reference to the handle (a
collected handle stops it), and is never inherited: a forked child starts its own on its first
hint (``EmbeddingStore._after_fork_in_child`` forgets the parent's).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

IDLE_S = 2.0  # the thread exits after this long without a hint
MAX_PENDING = 8  # hints queued at most; the oldest is dropped beyond (a loop far ahead of its reads)


class Prefetcher:
    """One handle's queue of hints and the thread that serves them (see the module docstring)."""

    def __init__(self, warm: Callable[[np.ndarray], None]):
        self._warm = weakref.WeakMethod(warm)  # the handle's method: a collected handle ends the thread
        self._hints: deque[np.ndarray] = deque(maxlen=MAX_PENDING)
        self._wake = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.served = 0  # hints warmed (for tests and benchmarks)

    def hint(self, ids: np.ndarray) -> None:
        """Queue ``ids`` (an int64 array) and return at once."""
        with self._wake:
            if self._stopped or not len(ids):
                return
            self._hints.append(ids)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lmdb-embeddings-prefetch", daemon=True)
                self._thread.start()
            self._wake.notify()

    def stop(self) -> None:
        """Drop queued hints; the thread exits after the one it is serving (the handle is closing)."""
        with self._wake:
            self._stopped = True
            self._hints.clear()
            self._wake.notify()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """True once every queued hint is served (tests, benchmarks)."""
        with self._wake:
            return self._wake.wait_for(lambda: not self._hints and not self._busy, timeout)

    _busy = False

    def _run(self) -> None:
        while True:
            with self._wake:
                self._busy = False
                self._wake.notify_all()
                if not self._wake.wait_for(lambda: self._hints or self._stopped, IDLE_S) or self._stopped:
                    self._thread = None
                    return
                ids = self._hints.popleft()
                self._busy = True
            warm = self._warm()
            if warm is None:
                with self._wake:
                    self._thread, self._busy = None, False
                    self._wake.notify_all()
                return
            try:
                warm(ids)
                self.served += 1
            except Exception as exc:  # a hint: the call that needs the rows reports what went wrong
                log.debug("prefetch of %d ids skipped: %s", len(ids), exc)
            del warm


__all__ = ["Prefetcher", "IDLE_S", "MAX_PENDING"]
