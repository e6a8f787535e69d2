"""What this process holds in anonymous memory (heap, numpy arrays, caches): the figure the cache bounds.

File-backed pages (LMDB's map of the data file, writemap's pending pages) are the page
cache's, shared and reclaimable; ``RssAnon`` is what the OOM killer counts against us.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap

import numpy as np

try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
except OSError:
    _libc = None
_malloc_trim = getattr(_libc, "malloc_trim", None)  # glibc only
_madvise = getattr(_libc, "madvise", None)
if _madvise is not None:
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MADV_WILLNEED = getattr(mmap, "MADV_WILLNEED", 3)


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


def will_need(addresses: np.ndarray, length: int) -> None:
    """Ask the kernel to read ahead the mapped file pages holding ``length`` bytes at each address.

    ``madvise(MADV_WILLNEED)`` starts the reads and returns: pages of a cold data file arrive
    while the caller does other work (``store.prefetch``). One call per run of adjacent pages.
    """
    if _madvise is None or not len(addresses):
        return
    page = mmap.PAGESIZE
    addresses = np.sort(addresses)
    first, last = addresses // page, (addresses + (length - 1)) // page
    run_last = np.maximum.accumulate(last)
    starts = np.flatnonzero(np.concatenate(([True], first[1:] > run_last[:-1] + 1)))
    stops = np.append(starts[1:], len(first)) - 1
    for start, stop in zip(first[starts].tolist(), run_last[stops].tolist(), strict=True):
        _madvise(start * page, (stop - start + 1) * page, _MADV_WILLNEED)
