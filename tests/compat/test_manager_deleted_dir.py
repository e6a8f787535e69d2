"""A manager whose ``embeddings_dir`` is deleted while it is open (found by running the real upstream scripts).

Upstream CoSiR's test scripts put their managers in directories they delete while the managers are
still alive: ``tempfile.TemporaryDirectory()`` blocks (``tests/test_template_embedding.py``,
``test_backward_compatibility``), a ``finally: shutil.rmtree(TMPDIR)`` before the interpreter exits
(``src/test/20260406_feature_embedding_test``), and ``shutil.rmtree(dir)`` before a new manager on the
same directory. Upstream wrote every update at once, so each of these ended quietly, and a new
manager on a re-created directory started a new table. Ours must too: a directory deleted under a
store is a new directory for the next manager, not the deleted store; the end of a manager whose
store was deleted drops what was pending without an error; and a sync on it says what happened.
"""

from __future__ import annotations

import shutil
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from checkout import run_python  # noqa: E402
from upstream_managers import CHUNK, DIM, MODES, N, committed, manager  # noqa: E402

import lmdb_embeddings as le  # noqa: E402


@pytest.mark.parametrize("mode", MODES)
def test_a_new_manager_on_a_deleted_and_recreated_directory_gets_a_new_table(tmp_path, mode):
    """``for strategy in ...: shutil.rmtree(d); em = Manager(..., d, strategy)``: the old manager is still alive
    while the new one is built. Before the fix the new one joined the deleted store (zeros instead of its
    ``normal`` init, nothing in the directory) and its first sync failed asking to free disk space."""
    d = tmp_path / "em"
    em = None
    for strategy in ("zeros", "normal"):
        shutil.rmtree(d, ignore_errors=True)
        em = manager(d, mode, initialization_strategy=strategy, auto_sync=False)
        _, table = em.get_all_embeddings()
        assert (table.abs().max() > 0) == (strategy == "normal"), strategy
        assert (d / "embeddings.lmdb").is_dir()
    em.update_embeddings([7], torch.full((1, DIM), 3.0))
    em.force_sync_all_chunks()
    on_disk = committed(d)[0]
    assert on_disk[7].tolist() == [3.0, 3.0]
    assert np.abs(on_disk).max() > 0 and np.abs(np.delete(on_disk, 7, axis=0)).max() < 0.1  # the normal init
    em.close()


@pytest.mark.parametrize("mode", MODES)
def test_the_end_of_a_manager_whose_temporary_directory_was_deleted_is_quiet(tmp_path, mode):
    """``with tempfile.TemporaryDirectory() as d: m = Manager(...); m.update_embeddings(...)``, the manager alive
    at exit (and another one garbage-collected before): the pending updates went with the directory. Before
    the fix each ended in an ERROR log 'could not commit ... free space and call commit() again'."""
    code = textwrap.dedent(f"""
        import gc, logging, sys, tempfile, torch
        import lmdb_embeddings as le
        logging.basicConfig(level=logging.WARNING, format="LOG %(levelname)s %(message)s")
        def make(d):
            return le.TrainableEmbeddingManager(sample_ids=list(range({N})), embedding_dim={DIM}, device="cpu",
                                                storage_mode="{mode}", embeddings_dir=d, chunk_size={CHUNK})
        with tempfile.TemporaryDirectory(dir=sys.argv[1]) as d:
            collected = make(d + "/a")
            collected.update_embeddings([1, 2], torch.ones(2, {DIM}))
            alive = make(d + "/b")
            alive.update_embeddings([3], torch.ones(1, {DIM}))
        del collected
        gc.collect()
        print("done")
    """)
    proc = run_python(code, str(tmp_path))
    assert proc.stdout.strip().endswith("done")
    assert "LOG" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("mode", MODES)
def test_a_sync_after_the_directory_was_deleted_says_so_and_close_releases(tmp_path, mode, caplog):
    """A sync of a manager whose directory is gone raises a CommitError naming the deletion (not a full disk);
    ``close()`` then releases the store (before the fix it raised the same commit error every time)."""
    d = tmp_path / "em"
    m = manager(d, mode, auto_sync=True, sync_batch_size=100)
    m.update_embeddings([1], torch.ones(1, DIM))
    shutil.rmtree(d)
    with pytest.raises(le.CommitError, match="was deleted") as caught:
        m.force_sync_all_chunks()
    assert "free space" not in str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    assert m.get_embeddings([1]).tolist() == [[1.0, 1.0]]  # nothing changed: the pending row is still served
    with caplog.at_level("INFO", logger="lmdb_embeddings"):
        m.close()
    assert "1 uncommitted update" in caplog.text
    assert not d.exists()  # nothing re-created
    m2 = manager(d, mode)
    assert not m2.get_embeddings([1]).any()  # a new table
    m2.close()
