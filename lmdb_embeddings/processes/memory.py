"""What this process holds in anonymous memory (heap, numpy arrays, caches): the figure the cache bounds.

File-backed pages (LMDB's map of the data file, writemap's pending pages) are the page
cache's, shared and reclaimable; ``RssAnon`` is what the OOM killer counts against us.
"""

from __future__ import annotations


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
