"""``compact``: rewrite a store's environment without free pages, atomically.

LMDB never shrinks its data file; pages freed by old commits are only reused (and a
writer's file is sized to its map, sparse). A compacting copy (``env.copy(compact=True)``,
a consistent snapshot) writes just the live pages into a hidden sibling directory, which
is verified and then swapped in. The writer lock is held throughout so no writer can
commit to the old copy meanwhile. If the copy does not take less disk (allocated blocks),
the original is kept: compaction never takes more disk. Readers that still have the old
store open keep reading the old (now unlinked) files until they reopen, so run it while
no training reads the store.
"""

from __future__ import annotations

import os
import threading
import time

import lmdb

from ..errors import CorruptionError, EmbeddingStoreError, WriterLockedError
from ..format.records import DATA_FILE
from ..fsutil import allocated_bytes
from ..processes import environment
from ..processes.snapshot import Snapshot
from ..processes.staging import StagedStore
from ..progress import bar
from ..results import CompactResult
from .info import store_info
from .verify import verify_store

POLL_SECONDS = 0.2  # how often the bar looks at the size of the copy being written


def compact_store(path: str, *, progress: bool = False) -> CompactResult:
    """Compact the store at ``path`` in place; returns the disk it took before and after (allocated bytes).

    Raises:
        WriterLockedError: a writer holds the store. CorruptionError: the copy fails verification
        (the store is left unchanged).
    """
    path = os.path.abspath(path)
    with Snapshot(path):  # a store we can read (not a newer format, metadata intact) before copying it
        pass
    before = allocated_bytes(os.path.join(path, DATA_FILE))
    started = time.perf_counter()
    try:
        with StagedStore(path, "compacting", hold_lock=True) as stage:
            after = _copy_compacted(path, stage.tmp, progress)
            swapped = after < before
            if swapped:
                stage.swap_in(replace=True)
    except WriterLockedError as exc:
        raise WriterLockedError(f"cannot compact while a writer holds the store: {exc}",
                                holder_pid=exc.holder_pid) from None
    return {"path": path, "bytes_before": before, "bytes_after": after if swapped else before,
            "compacted": swapped, "seconds": time.perf_counter() - started}


def _copy_compacted(path: str, tmp: str, progress: bool) -> int:
    """LMDB's compacting copy of ``path`` into ``tmp``, verified; returns the disk its data file takes."""
    lm = store_info(path)["lmdb"]
    expected = (lm["pages_in_tables"] + 2) * lm["page_size"]  # the live pages and the two meta pages
    shared = environment.acquire(path, write=False)
    try:
        with bar(expected, "compact", progress) as pbar:
            _copy_watching(lambda: shared.copy_compacted(tmp), os.path.join(tmp, DATA_FILE), pbar)
    except lmdb.Error as exc:
        raise EmbeddingStoreError(f"{path}: the compacting copy failed ({exc})") from None
    finally:
        environment.release(shared)
    report = verify_store(tmp, progress=progress)
    if not report["ok"]:
        first = report["problems"][0]
        raise CorruptionError(f"{path}: the compacted copy fails verification ({first['part']} chunk "
                              f"{first['chunk']}: {first['error']}); the store was left unchanged")
    return allocated_bytes(os.path.join(tmp, DATA_FILE))


def _copy_watching(copy, target: str, pbar) -> None:
    """Run ``copy()`` (one LMDB call, GIL released) in a thread while the bar follows the size of ``target``."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            copy()
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    worker = threading.Thread(target=run, name="compact-copy", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(POLL_SECONDS)
            if os.path.exists(target):
                pbar.update(max(0, min(os.path.getsize(target), pbar.total) - pbar.n))
    finally:
        worker.join()  # even on Ctrl-C: the copy must end before its directory is removed
    if failure:
        raise failure[0]
    pbar.update(pbar.total - pbar.n)
