"""The undo log (``StoreOptions.undo_log``, internal: the sharded store sets it on its shards) and
``revert_last_commit``: the shard-side half of the sharded store's two-phase commit. A commit made with
the log can be undone exactly, whatever it changed: rows, added IDs, new columns, attrs, chunks spilled
from the cache before the commit."""

from __future__ import annotations

import numpy as np
import pytest
from checkout import rows_like

import lmdb_embeddings as le
from lmdb_embeddings.core import undo
from lmdb_embeddings.core.undo import revert_last_commit
from lmdb_embeddings.ops.verify import verify_store
from lmdb_embeddings.options import open_option_names


def _logged(path, **options) -> le.EmbeddingStore:
    """A writable handle whose commits keep the undo log (``undo_log`` is internal: the sharded store sets it)."""
    return le.EmbeddingStore.open_with_options(path, le.StoreOptions(undo_log=True, **options))


def _create_logged(path, ids, dim, **kwargs) -> le.EmbeddingStore:
    """``create``, then the handle reopened with the undo log (the open options given stay with it)."""
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in open_option_names()}
    le.EmbeddingStore.create(path, ids, dim, **kwargs, **options).close()
    return _logged(path, **options)


def _table(store) -> dict:
    """Everything a commit can change, as plain values."""
    ids = store.ids
    return {"ids": ids, "rows": store.get(ids), "attrs": store.attrs, "columns": store.columns,
            "aux": {name: store.get_column(name, ids) for name in store.columns}}


def _assert_same(a: dict, b: dict) -> None:
    np.testing.assert_array_equal(a["ids"], b["ids"])
    np.testing.assert_array_equal(a["rows"], b["rows"])
    assert a["attrs"] == b["attrs"] and a["columns"] == b["columns"]
    for name in a["aux"]:
        np.testing.assert_array_equal(a["aux"][name], b["aux"][name])


def test_revert_undoes_puts_adds_columns_and_attrs(store_path):
    store = _create_logged(store_path, np.arange(100, 300), 8, chunk_rows=16, seed=3)
    store.put(np.arange(100, 140), rows_like(40, 8, 1.0))
    store.set_attr("step", 1)
    store.commit()
    before = _table(store)
    commit_before = store.commit_count
    store.put(np.arange(120, 200), rows_like(80, 8, 2.0))  # rewrites chunks of the previous commit
    store.add(np.arange(-50, 0), rows_like(50, 8, 3.0))  # new rows: a partial chunk rewritten, new chunks
    store.ensure_column("moments", 8, "float32", fill=0.5)
    store.put_column("moments", np.r_[-10:0, 100:110], rows_like(20, 8, 4.0))
    store.set_attr("step", 2)
    store.commit()
    store.close()

    result = revert_last_commit(store_path)
    assert result["undone"] == commit_before + 1 and result["restored"] == commit_before
    assert result["commit"] == commit_before + 2  # a new number, so readers notice the change
    with le.EmbeddingStore.open(store_path, readonly=True) as reader:
        _assert_same(before, _table(reader))
        assert reader.commit_count == commit_before + 2
        assert -5 not in reader
    assert verify_store(store_path)["ok"]
    with le.EmbeddingStore.open(store_path) as again:  # the undone column can be declared again
        again.ensure_column("moments", 4, "float16")
        again.add([-1])
        again.commit()
        assert again.columns["moments"]["width"] == 4 and len(again) == 201


def test_revert_restores_the_committed_value_of_chunks_spilled_before_the_commit(store_path):
    n, dim, cr = 4096, 32, 64  # 64 chunks of 8 KiB; a 0.1 MiB cache holds a few, so dirty chunks spill
    store = _create_logged(store_path, n, dim, chunk_rows=cr, seed=5, cache_mb=0.1)
    store.commit()
    before = store.get(np.arange(n))
    for value in (1.0, 2.0):  # every chunk is spilled twice into the same pending transaction
        for start in range(0, n, 512):
            store.put(np.arange(start, start + 512), np.full((512, dim), value, np.float32))
    assert store.stats()["spilled_chunks"] > n // cr
    store.commit()
    np.testing.assert_array_equal(store.get(np.arange(n)), np.full((n, dim), 2.0, np.float32))
    store.close()
    revert_last_commit(store_path)
    with le.EmbeddingStore.open(store_path, readonly=True) as reader:
        np.testing.assert_array_equal(reader.get(np.arange(n)), before)


def test_a_rolled_back_transaction_keeps_the_undo_log_of_the_last_commit(store_path):
    store = _create_logged(store_path, 2048, 16, chunk_rows=64, cache_mb=0.05)
    before = store.get(np.arange(2048))
    store.put(np.arange(10), rows_like(10, 16, 1.0))
    store.commit()
    for start in range(0, 2048, 256):  # spills: the pending transaction (and its undo log) is started
        store.put(np.arange(start, start + 256), rows_like(256, 16, 9.0))
    assert store.stats()["spilled_chunks"] > 0
    store.rollback()
    store.close()
    revert_last_commit(store_path)
    with le.EmbeddingStore.open(store_path, readonly=True) as reader:
        np.testing.assert_array_equal(reader.get(np.arange(2048)), before)


def test_a_reader_open_across_a_revert_sees_the_reverted_rows_and_ids(store_path):
    store = _create_logged(store_path, 100, 4, chunk_rows=16)
    before = store.get(np.arange(100))
    store.add(np.arange(100, 130))
    store.put(np.arange(50), rows_like(50, 4, 1.0))
    store.commit()
    reader = le.EmbeddingStore.open(store_path, readonly=True)
    assert len(reader) == 130 and 120 in reader
    reader.get(np.arange(130))  # cached chunks of the commit about to be undone
    store.close()
    revert_last_commit(store_path)
    assert len(reader) == 100 and 120 not in reader
    np.testing.assert_array_equal(reader.get(np.arange(100)), before)
    with pytest.raises(KeyError):
        reader.get([120])
    reader.close()


def test_revert_refuses_without_a_matching_log_and_changes_nothing(store_path):
    store = le.EmbeddingStore.create(store_path, 50, 4, chunk_rows=16)
    store.put([1], rows_like(1, 4, 1.0))
    store.commit()
    store.close()
    with pytest.raises(le.EmbeddingStoreError, match="no undo log"):  # never committed with the log
        revert_last_commit(store_path)

    with _logged(store_path) as logged:
        logged.put([2], rows_like(1, 4, 2.0))
    with le.EmbeddingStore.open(store_path) as unlogged:  # a later commit without the log
        unlogged.put([3], rows_like(1, 4, 3.0))
        unlogged.commit()
        expected = unlogged.get(np.arange(50))
        with pytest.raises(le.WriterLockedError):  # a writer is open: refused
            revert_last_commit(store_path)
    with pytest.raises(le.EmbeddingStoreError, match="belongs to commit"):
        revert_last_commit(store_path)
    with le.EmbeddingStore.open(store_path, readonly=True) as reader:
        np.testing.assert_array_equal(reader.get(np.arange(50)), expected)

    with _logged(store_path) as logged:
        logged.put([4], rows_like(1, 4, 4.0))
    revert_last_commit(store_path)
    with pytest.raises(le.EmbeddingStoreError, match="no undo log to apply"):  # one commit back only
        revert_last_commit(store_path)
    with le.EmbeddingStore.open(store_path, readonly=True) as reader:
        np.testing.assert_array_equal(reader.get(np.arange(50)), expected)


def test_contains_is_vectorized_and_sees_uncommitted_adds(small_store):
    small_store.add([5000, 5001])
    np.testing.assert_array_equal(small_store.contains([0, 999, 1000, 5001, -1]), [True, True, False, True, False])
    assert small_store.contains([]).shape == (0,)


def test_a_reader_that_missed_the_revert_forgets_the_undone_rows_when_later_adds_reuse_their_slots(store_path):
    """The reader never looks while the revert happens; the next commit adds OTHER ids into the same row slots.

    Its row count only grows (130 -> 140), so only the state record's revert history tells it that
    slots 100..129 now hold other IDs and rows.
    """
    store = _create_logged(store_path, 100, 4, chunk_rows=16)
    store.add(np.arange(100, 130), rows_like(30, 4, 1.0))
    store.commit()
    reader = le.EmbeddingStore.open(store_path, readonly=True)
    assert len(reader) == 130
    reader.get(np.arange(130))  # caches the chunks (and IDs) of the commit about to be undone
    store.close()
    revert_last_commit(store_path)
    new_rows = rows_like(40, 4, 7.0, seed=3)
    with _logged(store_path) as writer:
        writer.add(np.arange(500, 540), new_rows)
        expected = writer.get(writer.ids)
    assert len(reader) == 140 and 120 not in reader and 539 in reader
    np.testing.assert_array_equal(reader.ids, np.r_[0:100, 500:540])
    np.testing.assert_array_equal(reader.get(np.arange(500, 540)), new_rows)
    np.testing.assert_array_equal(reader.get(reader.ids), expected)
    with pytest.raises(KeyError):
        reader.get([100])
    reader.close()


def test_revert_history_keeps_the_smallest_row_count_of_merged_entries():
    history = None
    for commit, rows in ((5, 100), (9, 40), (12, 300)):
        history = undo.revert_history(history, commit, rows)
    assert history == [[5, 100], [9, 40], [12, 300]]
    assert undo.rows_kept_after(history, 4) == 40 and undo.rows_kept_after(history, 9) == 300
    assert undo.rows_kept_after(history, 12) is None
    for commit in range(13, 13 + undo.MAX_REVERTS):
        history = undo.revert_history(history, commit, 1000)
    assert len(history) == undo.MAX_REVERTS
    assert undo.rows_kept_after(history, 4) == 40  # merged entries are conservative: never more rows kept


@pytest.mark.parametrize("cache_mb", [64.0, 1.0], ids=["at_commit", "spilled"])
def test_every_block_a_logged_commit_writes_was_reserved_first(store_path, cache_mb):
    """Under writemap a store into an unreserved hole on a full disk is SIGBUS: the reservation must cover
    the pre-images the undo log writes too (a whole-table rewrite writes the table twice)."""
    n, dim = 20_000, 64  # 5 MiB: a fresh store has no free pages, so the rewrite and its log are appended
    le.EmbeddingStore.create(store_path, n, dim, chunk_rows=256).close()
    store = _logged(store_path, cache_mb=cache_mb)
    store.put(np.arange(n), rows_like(n, dim, 1.0))
    store.commit()
    env = store._session.env  # the writer's environment: its data file and LMDB's committed end
    assert env.writemap and env.data_file._reserved >= env.used_bytes()
    store.close()
    revert_last_commit(store_path)
    with le.EmbeddingStore.open(store_path, readonly=True) as reader:
        assert float(np.abs(reader.get(np.arange(n))).max()) < 0.1  # the initial N(0, 0.01) rows again
