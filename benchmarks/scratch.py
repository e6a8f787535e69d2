"""Scratch directories for the benchmarks' stores: removed on every exit path, SIGTERM and Ctrl-C included.

A ``finally`` alone does not run when the process is terminated: SIGTERM's default action ends
it on the spot, leaving gigabytes of stores in /tmp. Inside :func:`scratch_dir` (and
:func:`sigterm_raises`) SIGTERM raises ``SystemExit`` instead, as Ctrl-C raises
``KeyboardInterrupt``, so the ``finally`` that removes the directory runs in every case
(only SIGKILL, which nothing can catch, still leaves it).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy.random  # noqa: F401  (see sigterm_raises)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises ``SystemExit(143)`` in the main thread (exit status as if killed).

    numpy.random is imported with this module, before any handler is set: numpy 2 imports it lazily at
    its first use, and a SIGTERM landing inside that import ended ``benchmarks.hot_path`` with exit 0
    (1 of ~40 probe runs, the handler's stack inside ``numpy/random/_pickle.py``)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread can set handlers
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def scratch_dir(prefix: str, keep: str | None = None, parent: str | None = None) -> Iterator[str]:
    """A new temporary directory (in ``parent``, default the system's), removed when the block ends,
    however it ends. ``keep``: the user's own directory instead, used as it is and never removed."""
    with sigterm_raises():
        if keep is not None:
            os.makedirs(keep, exist_ok=True)
            yield keep
            return
        path = tempfile.mkdtemp(prefix=prefix, dir=parent)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
