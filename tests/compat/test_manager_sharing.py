"""Issue 21: managers of one process on one ``embeddings_dir`` share one writable store.

Each test follows one upstream CoSiR pattern with its calls unchanged: a second manager that
reads back what the first wrote (``tests/debug_embedding_init.py``, ``tests/verify_embedding_fix.py``),
a second manager that reads AND writes (``test_backward_compatibility``), the first manager
still writing after the second opened (``tests/test_nocache_manager.py``,
``src/test/20260406_feature_embedding_test``), in disk and memory mode; then what the sharing
promises: one commit of everything pending, the store closing with its last manager, another
process refused naming our pid, and a kill -9 at any moment leaving the last commit.
"""

from __future__ import annotations

import inspect
import os
import shutil
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from checkout import kill_9_once, run_python  # noqa: E402
from upstream_managers import CHUNK, DIM, MODES, N, committed, manager  # noqa: E402

import lmdb_embeddings as le  # noqa: E402


def rows(m, ids) -> np.ndarray:
    return m.get_embeddings(ids).detach().cpu().numpy()


# ------------------------------------------------------------------ the upstream patterns
@pytest.mark.parametrize("mode", MODES)
def test_read_back_manager_sees_what_the_first_wrote(tmp_path, mode):
    """debug_embedding_init.py / verify_embedding_fix.py: update by chunk, sync, a NEW manager reads it back
    while the first is still open (before issue 21 the second constructor raised WriterLockedError)."""
    d = tmp_path / "embeddings"
    first = manager(d, mode, auto_sync=True, sync_batch_size=100)
    new = torch.arange(CHUNK * DIM, dtype=torch.float32).reshape(CHUNK, DIM) + 1
    first.update_embeddings_by_chunk(0, list(range(CHUNK)), new)
    first.sync_dirty_chunks_to_disk()
    assert first.dirty_chunks == set()
    second = manager(d, mode, auto_sync=True)
    assert np.array_equal(rows(second, [0, 50, 99]), new[[0, 50, 99]].numpy())
    assert not rows(second, [100, 499]).any()
    # uncommitted rows are shared too: an update through the first, read through the second, before any sync
    first.update_embeddings([499], torch.full((1, DIM), 5.0))
    assert (rows(second, [499]) == 5.0).all()
    assert not committed(d)[0][499].any()
    assert second.store is first.store  # one writable handle
    first.close()
    assert (rows(second, [499]) == 5.0).all()  # the first's close (auto_sync) committed; the second goes on
    assert (committed(d)[0][499] == 5.0).all()
    second.close()


@pytest.mark.parametrize("mode", MODES)
def test_second_manager_reads_and_writes(tmp_path, mode):
    """test_backward_compatibility: the second manager writes; the first sees it; one sync commits both."""
    d = tmp_path / "embeddings"
    first = manager(d, mode, auto_sync=False)
    second = manager(d, mode, auto_sync=False)
    first.update_embeddings([1, 2], torch.full((2, DIM), 1.0))
    second.update_embeddings([3, 1], torch.full((2, DIM), 2.0))
    for m in (first, second):
        assert rows(m, [1, 2, 3]).tolist() == [[2.0, 2.0], [1.0, 1.0], [2.0, 2.0]]
        assert m.get_all_embeddings()[1][3].tolist() == [2.0, 2.0]
    assert first.dirty_chunks == second.dirty_chunks == {0}
    _, before = committed(d)
    second.force_sync_all_chunks()  # everything pending, both managers' updates, in ONE commit
    table, after = committed(d)
    assert after == before + 1
    assert table[[1, 2, 3]].tolist() == [[2.0, 2.0], [1.0, 1.0], [2.0, 2.0]]
    assert first.dirty_chunks == set()
    first.close()
    second.close()


@pytest.mark.parametrize("mode", MODES)
def test_first_manager_keeps_writing_after_the_second_opened(tmp_path, mode):
    """test_nocache_manager.py steps 7-9 and the 2026-04-06 feature-embedding test (2d, then training through
    the first): the first manager keeps updating, the second sees every update, then the first saves."""
    d = tmp_path / "embeddings"
    first = manager(d, mode)
    ids0, _ = first.get_embeddings_by_chunk(0)
    first.update_embeddings_by_chunk(0, ids0, torch.full((CHUNK, DIM), 5.0))
    second = manager(d, mode)
    reloaded_ids, reloaded = second.get_embeddings_by_chunk(0)
    assert reloaded_ids == ids0 and (reloaded.detach() == 5.0).all()
    for chunk in (1, 2):
        ids, _ = first.get_embeddings_by_chunk(chunk)
        first.update_embeddings_by_chunk(chunk, ids, torch.full((len(ids), DIM), float(chunk)))
        assert (second.get_embeddings_by_chunk(chunk)[1].detach() == float(chunk)).all()
    for step in range(25):  # a training loop through the first (auto-syncs every 10 updates)
        batch = list(range(step * 4, step * 4 + 4))
        first.update_embeddings(batch, first.get_embeddings(batch).detach() + 1.0)
    assert np.array_equal(rows(second, list(range(N))), rows(first, list(range(N))))
    final = tmp_path / "final"
    first.save_final_embeddings(str(final))  # the first continues on the copy; the second on the directory
    first.update_embeddings([499], torch.full((1, DIM), -1.0))
    assert not (rows(second, [499]) == -1.0).any()
    second.update_embeddings([498], torch.full((1, DIM), -2.0))
    first.close()
    second.close()
    assert (committed(d)[0][498] == -2.0).all()
    assert (committed(final)[0][499] == -1.0).all()


def test_memory_managers_with_the_same_rows_share_one_parameter(tmp_path):
    """Memory mode: one Parameter for the same rows in the same order on the same device (direct writes, an
    optimizer step, are seen at once); another order or disk mode sees them after the next sync."""
    d = tmp_path / "embeddings"
    first = manager(d, "memory", auto_sync=False)
    twin = manager(d, "memory", auto_sync=False)
    caller_order = list(range(N))[::-1]
    reordered = le.TrainableEmbeddingManager(caller_order, DIM, str(d), mode="ram")  # memmap style: caller's order
    disk = manager(d, "disk", auto_sync=False)
    assert twin.embeddings is first.embeddings and reordered.embeddings is not first.embeddings
    assert reordered.sample_ids == caller_order
    twin.update_embeddings([7], torch.full((1, DIM), 3.0))
    for m in (first, twin, reordered, disk):
        assert (rows(m, [7]) == 3.0).all()
    reordered.update_embeddings([8], torch.full((1, DIM), 4.0))
    for m in (first, twin, reordered, disk):
        assert (rows(m, [8]) == 4.0).all()
    with torch.no_grad():
        first.embeddings[first.id_to_index[9]] = 6.0  # an optimizer-style write straight into the Parameter
    assert (rows(twin, [9]) == 6.0).all()
    assert not (rows(reordered, [9]) == 6.0).any() and not (rows(disk, [9]) == 6.0).any()
    disk.force_sync_all_chunks()  # a sync through ANY manager reconciles every Parameter, then commits
    for m in (first, twin, reordered, disk):
        assert (rows(m, [9]) == 6.0).all()
    assert (committed(d)[0][[7, 8, 9]] == [[3.0] * DIM, [4.0] * DIM, [6.0] * DIM]).all()
    for m in (first, twin, reordered, disk):
        m.close()


def test_a_rollback_and_the_last_close_apply_to_the_shared_store(tmp_path):
    """``auto_sync=False``: a non-last close leaves its updates to the others; the last close discards."""
    d = tmp_path / "embeddings"
    first = manager(d, "memory", auto_sync=False)
    second = manager(d, "disk", auto_sync=False)
    first.update_embeddings([1], torch.full((1, DIM), 1.0))
    first.close()  # not the last: the update stays pending, the second still sees it
    assert (rows(second, [1]) == 1.0).all()
    with pytest.raises(le.ClosedError):
        first.get_embeddings([1])
    second.close()  # the last, auto_sync off: discarded
    assert not committed(d)[0][1].any()
    with manager(d, "memory", auto_sync=True, sync_batch_size=100) as a:
        b = manager(d, "memory", auto_sync=True, sync_batch_size=100)
        b.update_embeddings([2], torch.full((1, DIM), 2.0))
        with pytest.raises(RuntimeError):
            with b:
                raise RuntimeError("boom")  # b's block raised: b closes without committing, a keeps the update
        assert (rows(a, [2]) == 2.0).all()
    assert (committed(d)[0][2] == 2.0).all()  # a's close (auto_sync) committed it


def test_new_sample_ids_of_a_second_manager_are_added_to_the_shared_store(tmp_path):
    d = tmp_path / "embeddings"
    first = manager(d, "disk")
    grown = manager(d, "memory", sample_ids=list(range(N + 10)))
    assert len(grown) == N + 10 and len(first) == N  # the first keeps the rows it was opened with
    grown.update_embeddings([N + 9], torch.full((1, DIM), 9.0))
    assert (first.store.get([N + 9]) == 9.0).all()
    with pytest.raises(ValueError, match="dim"):
        manager(d, "disk", embedding_dim=DIM + 1)
    grown.close()
    first.close()
    table, _ = committed(d)
    assert len(table) == N + 10 and (table[N + 9] == 9.0).all()


# ------------------------------------------------------------------ other processes, the last close
def test_another_process_is_refused_naming_our_pid_until_the_last_manager_closes(tmp_path):
    d = tmp_path / "embeddings"
    code = textwrap.dedent(f"""
        import sys, lmdb_embeddings as le
        try:
            m = le.TrainableEmbeddingManager(sample_ids=list(range({N})), embedding_dim={DIM}, device="cpu",
                                             storage_mode="disk", embeddings_dir=sys.argv[1], chunk_size={CHUNK})
        except le.WriterLockedError as exc:
            print("REFUSED", exc.holder_pid, exc)
        else:
            print("OPENED")
            m.close()
    """)
    first, second = manager(d), manager(d, "memory")
    first.close()
    out = run_python(code, str(d)).stdout
    assert out.startswith(f"REFUSED {os.getpid()}") and f"pid {os.getpid()}" in out, out
    second.close()
    assert run_python(code, str(d)).stdout.startswith("OPENED")


def test_unreachable_managers_release_the_store_with_the_last_one(tmp_path):
    import gc

    d = tmp_path / "embeddings"
    gc.disable()  # the finalizers run when the last reference goes, not at a later collection
    try:
        first = manager(d, "memory", sync_batch_size=100)
        second = manager(d, "disk", sync_batch_size=100)
        first.update_embeddings([1], torch.full((1, DIM), 1.0))
        with torch.no_grad():
            first.embeddings[2] = 2.0
        del first  # not the last: released, its update and Parameter write left for the last close
        assert (rows(second, [1]) == 1.0).all()
        second.update_embeddings([3], torch.full((1, DIM), 3.0))
        del second  # the last: commits everything pending and closes the store
        table, _ = committed(d)
        assert table[[1, 2, 3]].tolist() == [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]
        with le.EmbeddingStore.open(os.path.join(d, "embeddings.lmdb")):  # the writer lock was given back
            pass
    finally:
        gc.enable()


def test_signature_lists_every_upstream_keyword_with_its_default():
    sig = inspect.signature(le.TrainableEmbeddingManager)
    expected = {"device": None, "initialization_strategy": "normal", "storage_mode": "memory",
                "embeddings_dir": None, "chunk_size": None, "feature_manager": None, "auto_sync": True,
                "cache_l1_size_mb": 256, "cache_l2_size_mb": 512, "enable_l3_cache": True, "sync_batch_size": 10,
                "mode": None, "seed": None}
    params = sig.parameters
    assert list(params)[:2] == ["sample_ids", "embedding_dim"]
    assert all(params[name].default is inspect.Parameter.empty for name in ("sample_ids", "embedding_dim"))
    assert {name: params[name].default for name in expected} == expected
    assert "embedding_dim" in str(inspect.signature(le.TrainableEmbeddingManager.__init__))


# ------------------------------------------------------------------ crash
def test_kill_9_with_two_managers_leaves_the_last_commit(tmp_path):
    """Two managers (memory and disk) take turns: each round rewrites every row through one of them and syncs
    through the OTHER. Killed at a random moment, the store holds exactly one whole round, at least the last
    one whose sync returned and at most the one after it."""
    d = tmp_path / "embeddings"
    child = textwrap.dedent(f"""
        import sys, torch, lmdb_embeddings as le
        ms = [le.TrainableEmbeddingManager(sample_ids=list(range({N})), embedding_dim={DIM}, device="cpu",
                                           storage_mode=mode, embeddings_dir=sys.argv[1], chunk_size={CHUNK},
                                           auto_sync=False, initialization_strategy="zeros")
              for mode in ("memory", "disk")]
        for r in range(1, 100000):
            writer, syncer = ms[r % 2], ms[(r + 1) % 2]
            for lo in range(0, {N}, 50):
                writer.update_embeddings(list(range(lo, lo + 50)), torch.full((50, {DIM}), float(r)))
            syncer.force_sync_all_chunks()
            print("SYNCED", r, flush=True)
    """)
    rng = np.random.default_rng(21)
    for _ in range(3):
        shutil.rmtree(d, ignore_errors=True)
        target = int(rng.integers(3, 12))
        lines = kill_9_once(child, str(d), ready=lambda seen, target=target: len(seen) >= target,
                            pause=float(rng.uniform(0, 0.05)))  # somewhere inside the next round or its commit
        acked = max(int(line.split()[1]) for line in lines if line.startswith("SYNCED"))
        table, _ = committed(d)
        values = np.unique(table)
        assert len(values) == 1, f"a mix of rounds after the kill: {values}"
        assert acked <= values[0] <= acked + 1, (acked, values)
        m = manager(d, "memory")
        assert (rows(m, list(range(N))) == values[0]).all()
        m.close()
