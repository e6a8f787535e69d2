"""compact: rewrite a store's environment without free pages, atomically.

LMDB never shrinks its data file; pages freed by old commits are only reused. A
compacting copy (``env.copy(compact=True)``, a consistent snapshot) writes just the live
pages into a hidden sibling directory, which is verified and then swapped in with
``fsutil.replace_dir``. The writer lock is held throughout so no writer can commit to
the old copy meanwhile. If the copy is not smaller, the original is kept: compaction
never grows the file. Readers that still have the old store open keep reading the old
(now unlinked) files until they reopen, so run it while no training reads the store.
"""

from __future__ import annotations

import os
import shutil
import time

import lmdb

from . import environment
from .errors import CorruptionError, EmbeddingStoreError, WriterLockedError
from .fsutil import remove_stale_temps, replace_dir, sibling_temp
from .progress import bar
from .snapshot import Snapshot
from .store_check import verify_store
from .writer_lock import WriterLock


def compact_store(path: str, *, progress: bool = False) -> dict:
    path = os.path.abspath(path)
    with Snapshot(path):  # a store we can read (not a newer format, metadata intact) before copying it
        pass
    data_file = os.path.join(path, environment.DATA_FILE)
    before = os.path.getsize(data_file)
    lock = WriterLock(path)
    try:
        lock.acquire()
    except WriterLockedError as exc:
        raise WriterLockedError(f"cannot compact while a writer holds the store: {exc}") from None
    started = time.perf_counter()
    remove_stale_temps(path, "compacting")
    tmp = sibling_temp(path, "compacting")
    try:
        os.mkdir(tmp)
        shared = environment.acquire(path, write=False)
        try:
            with bar(1, "compact", progress, unit="copy") as pbar:
                shared.env.copy(tmp, compact=True)
                pbar.update(1)
        except lmdb.Error as exc:
            raise EmbeddingStoreError(f"{path}: the compacting copy failed ({exc})") from None
        finally:
            environment.release(shared)
        report = verify_store(tmp, progress=progress)
        if not report["ok"]:
            first = report["problems"][0]
            raise CorruptionError(f"{path}: the compacted copy fails verification ({first['part']} chunk "
                                  f"{first['chunk']}: {first['error']}); the store was left unchanged")
        after = os.path.getsize(os.path.join(tmp, environment.DATA_FILE))
        swapped = after < before
        if swapped:
            replace_dir(tmp, path)
    finally:
        lock.release()
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return {"path": path, "bytes_before": before, "bytes_after": after if swapped else before,
            "compacted": swapped, "seconds": time.perf_counter() - started}
