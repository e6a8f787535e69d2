"""Issue 18 items 3 and 14: closing a manager (or a store) that cannot commit, and what the finalizer says.

A failed close (a full disk: a real size-limited tmpfs, mounted as root) changes nothing: the
manager (or handle) stays open and usable, and the same ``close()`` succeeds once space is
freed; with managers sharing a store, the others are not stranded. The finalizer of a manager
that was never closed logs what it did, never "nothing was written" over a commit, and never
waits for the lock of the registry of shared stores.
"""

from __future__ import annotations

import gc
import logging
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from guarantees_lib import committed_table, fill_disk, small_tmpfs  # noqa: E402

import lmdb_embeddings as le  # noqa: E402
from lmdb_embeddings.compat.manager import sharing  # noqa: E402

N, DIM, CHUNK = 20_000, 32, 500  # 2.4 MiB of rows: a commit of all of them needs ~3.5 MiB of disk
MODES = ["disk", "memory"]


@pytest.fixture
def small_fs(tmp_path):
    with small_tmpfs(str(tmp_path / "small_fs"), "16m") as mnt:
        yield mnt


def manager(directory, mode="disk", **kw):
    args = dict(sample_ids=list(range(N)), embedding_dim=DIM, device="cpu", storage_mode=mode,
                initialization_strategy="zeros", embeddings_dir=str(directory), chunk_size=CHUNK,
                sync_batch_size=1000)
    args.update(kw)
    return le.TrainableEmbeddingManager(**args)


def store_of(directory) -> str:
    return os.path.join(str(directory), "embeddings.lmdb")


# ------------------------------------------------------------------ item 3: a failed close
@pytest.mark.parametrize("mode", MODES)
def test_a_failed_close_keeps_the_manager_usable_and_retryable(small_fs, mode):
    """Before the fix the failed close counted itself closed: the retry returned without committing,
    ``force_sync_all_chunks()`` raised ClosedError and the updates were discarded at exit."""
    d = os.path.join(small_fs, "emb")
    m = manager(d, mode)
    m.update_embeddings(list(range(N)), torch.full((N, DIM), 3.0))
    ballast = fill_disk(small_fs)
    try:
        with pytest.raises(le.CommitError):
            m.close()
        assert committed_table(store_of(d))["values"] == [0.0]  # nothing was written
        assert (m.get_embeddings([0, N - 1]) == 3.0).all()  # still open, the update still there
        m.update_embeddings([1], torch.full((1, DIM), 4.0))
        with pytest.raises(le.CommitError):
            m.force_sync_all_chunks()
    finally:
        os.remove(ballast)
    m.close()  # the same close, retried once space is back
    assert committed_table(store_of(d))["values"] == [3.0, 4.0]
    with pytest.raises(le.ClosedError):
        m.get_embeddings([0])
    again = manager(d, mode)  # the store was released
    assert (again.get_embeddings([1]) == 4.0).all()
    again.close()


def test_a_failed_close_of_one_shared_manager_strands_no_other(small_fs):
    d = os.path.join(small_fs, "emb")
    first, second = manager(d, "memory"), manager(d, "disk")
    first.update_embeddings(list(range(N)), torch.full((N, DIM), 3.0))
    ballast = fill_disk(small_fs)
    try:
        with pytest.raises(le.CommitError):
            first.close()
        assert (second.get_embeddings([5]) == 3.0).all()  # the other manager goes on
        second.update_embeddings([5], torch.full((1, DIM), 5.0))
        assert (first.get_embeddings([5]) == 5.0).all()  # and so does the one whose close failed
        with pytest.raises(le.CommitError):
            second.close()
    finally:
        os.remove(ballast)
    second.force_sync_all_chunks()
    assert committed_table(store_of(d))["values"] == [3.0, 5.0]
    second.close()
    first.update_embeddings([6], torch.full((1, DIM), 6.0))
    first.close()  # the last one: commits and releases the store
    assert committed_table(store_of(d))["values"] == [3.0, 5.0, 6.0]
    le.EmbeddingStore.open(store_of(d)).close()


def test_a_failed_store_close_keeps_the_handle_open_and_retryable(small_fs):
    path = os.path.join(small_fs, "store")
    store = le.EmbeddingStore.create(path, N, DIM, chunk_rows=CHUNK, init="zeros")
    store.put(np.arange(N), np.full((N, DIM), 3.0, np.float32))
    ballast = fill_disk(small_fs)
    try:
        with pytest.raises(le.CommitError):
            store.close()
        assert not store.readonly and (store.get([0]) == 3.0).all()
        assert committed_table(path)["values"] == [0.0]
    finally:
        os.remove(ballast)
    store.close()
    assert committed_table(path)["values"] == [3.0]
    with pytest.raises(le.ClosedError):
        store.get([0])


# ------------------------------------------------------------------ item 14: what the finalizer says
def test_a_close_refused_for_nan_rows_changes_nothing_and_can_be_retried(tmp_path):
    """Before the fix the refusal said "nothing was written" and the close then committed the pending update."""
    m = manager(tmp_path / "emb", "memory")
    m.update_embeddings([3], torch.full((1, DIM), 7.0))
    with torch.no_grad():
        m.embeddings[5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m.close()
    assert committed_table(store_of(tmp_path / "emb"))["values"] == [0.0]  # really nothing written
    with torch.no_grad():
        m.embeddings[5] = 1.0
    m.close()
    assert committed_table(store_of(tmp_path / "emb"))["values"] == [0.0, 1.0, 7.0]


def test_the_finalizer_log_says_what_it_committed_when_the_parameter_holds_nan(tmp_path, caplog):
    """Before the fix it logged "could not commit ... (nothing was written)" and then committed the update."""
    d = tmp_path / "emb"
    m = manager(d, "memory")
    m.update_embeddings([3], torch.full((1, DIM), 7.0))
    with torch.no_grad():
        m.embeddings[5] = float("nan")
    with caplog.at_level(logging.INFO, logger="lmdb_embeddings"):
        del m
        gc.collect()
    messages = [r.getMessage() for r in caplog.records]
    assert not any("nothing was written" in text for text in messages), messages
    assert any("NaN" in text and "none of the rows written straight into it were saved" in text
               for text in messages), messages
    assert any("committed 1 pending updates" in text for text in messages), messages
    assert committed_table(store_of(d))["values"] == [0.0, 7.0]  # the update, not the NaN row


def test_the_finalizer_never_waits_for_the_registry_lock(tmp_path):
    """A garbage collection can run a manager's finalizer on a thread that holds the registry lock (inside
    another manager's constructor or close): the release is queued and done when the lock is let go."""
    d = tmp_path / "emb"
    m = manager(d, "disk")
    m.update_embeddings([3], torch.full((1, DIM), 7.0))
    sharing._lock.acquire()  # as a thread inside open_managed() or release() holds it
    try:
        del m
        gc.collect()  # the finalizer runs here, on this thread: it must return, not wait
        assert committed_table(store_of(d))["values"] == [0.0]  # queued, not done yet
    finally:
        sharing._unlock()  # the holder lets go: the queued release commits and closes the store
    assert committed_table(store_of(d))["values"] == [0.0, 7.0]
    le.EmbeddingStore.open(store_of(d)).close()  # the writer lock was given back
