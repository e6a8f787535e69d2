"""What a forked child must leave alone (issue 12, item 4): a snapshot its parent is reading.

Closing an inherited environment in a child aborts, in LMDB's shared reader table, every read
transaction the parent had open on it. For a dump in progress (``processes.snapshot``) that would
let the writer reuse the pages the dump is still reading. The child leaves that environment
alone and refuses, in one line, to open the store; the parent's snapshot stays whole.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

import lmdb_embeddings as le
from lmdb_embeddings.processes.snapshot import Snapshot


def _fork_and_read(store: le.EmbeddingStore) -> tuple[int, str]:
    """(exit code, stderr line) of a child that reads through ``store``: 0 read, 5 refused, 4 other."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        code, text = 4, ""
        try:
            store.get([0])
            code = 0
        except le.EmbeddingStoreError as exc:
            code, text = 5, str(exc)
        except BaseException as exc:
            text = f"{type(exc).__name__}: {exc}"
        os.write(write_end, text.encode())
        os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child hung")
        time.sleep(0.01)
    with os.fdopen(read_end, "rb") as fh:
        return os.waitstatus_to_exitcode(status), fh.read().decode()


def test_child_forked_during_a_snapshot_refuses_and_the_snapshot_stays_whole(tmp_path):
    path = str(tmp_path / "store")
    rows, dim, cr = 4096, 16, 64
    writer = le.EmbeddingStore.create(path, rows, dim, chunk_rows=cr, init="zeros")
    reader = le.EmbeddingStore.open(path, readonly=True)
    reader.get([0])
    try:
        with Snapshot(path) as snap:  # the parent's dump in progress: commit 0, all zeros
            code, message = _fork_and_read(reader)
            assert code == 5, f"the child did not refuse (exit {code}): {message}"
            assert "\n" not in message.strip() and "snapshot" in message, message
            for r in range(1, 6):  # whole-table commits: they must not reuse the snapshot's pages
                writer.put(writer.ids, np.full((rows, dim), r, np.float32))
                writer.commit()
            seen = np.concatenate([parts[0] for _, parts in snap.chunks()])
        assert seen.shape == (rows, dim) and not seen.any(), "the snapshot saw pages of later commits"
        code, message = _fork_and_read(reader)  # no snapshot open now: the child reads
        assert code == 0, message
    finally:
        reader.close()
        writer.close()


def test_child_forked_while_another_thread_compacts_never_hangs(tmp_path):
    # LMDB's compacting copy (and a snapshot's first reads) run with the GIL released; py-lmdb's
    # close in a child forked meanwhile waited forever for them (before: 8 of 12 children hung).
    path = str(tmp_path / "store")
    rows, dim = 20000, 32
    with le.EmbeddingStore.create(path, rows, dim, init="zeros") as writer:
        for r in (1, 2, 3):  # garbage for compact to drop
            writer.put(writer.ids, np.full((rows, dim), float(r)))
            writer.commit()
    reader = le.EmbeddingStore.open(path, readonly=True)
    reader.get([0])
    stop, compacts, failures = threading.Event(), [], []

    def compact_in_a_loop():
        while not stop.is_set():
            try:
                compacts.append(le.compact_store(path))
            except BaseException as exc:  # reported below, not lost in the thread
                failures.append(exc)
                return

    thread = threading.Thread(target=compact_in_a_loop)
    thread.start()
    outcomes = []
    try:
        for _ in range(20):
            outcomes.append(_fork_and_read(reader))  # raises if the child hangs
    finally:
        stop.set()
        thread.join(60)
    assert not failures, failures
    assert compacts, "the compacting thread never finished a compact"
    for code, message in outcomes:  # read the rows, or refused in one line: a compact was running, or had
        refused = code == 5 and "\n" not in message.strip()  # swapped the store in meanwhile
        assert code == 0 or (refused and ("compact" in message or "replaced" in message)), (code, message)
    assert np.array_equal(reader.get([0, rows - 1]), np.full((2, dim), 3.0, np.float32))
    assert le.verify_store(path)["ok"]
    reader.close()
