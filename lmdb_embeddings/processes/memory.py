"""What this process holds in anonymous memory (heap, numpy arrays, caches): the figure the cache bounds.

File-backed pages (LMDB's map of the data file, writemap's pending pages) are the page
cache's, shared and reclaimable; ``RssAnon`` is what the OOM killer counts against us.
"""

from __future__ import annotations

import ctypes
import ctypes.util

try:
    _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc
    _malloc_trim = None


def rss_anon_bytes() -> int | None:
    """This process's resident anonymous memory (Linux ``/proc/self/status``), or None elsewhere."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def return_free_heap() -> None:
    """Hand memory freed by a large operation back to the OS (glibc keeps it otherwise).

    Building a store passes its whole table through LMDB's malloc'd write buffers; glibc
    keeps the freed arenas, so the process's RssAnon would stay tens of MiB higher for good.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)
