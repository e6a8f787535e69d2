"""A put or add that fails part way changes nothing (issue 12, item 9): the undo paths one by one.

``tests/store/test_hostile_inputs.py`` and ``tests/processes/test_full_and_read_only_filesystems.py`` show the
faults as a user meets them (a damaged chunk, a full disk); these tests drive each way back deterministically.
"""

from __future__ import annotations

import numpy as np
import pytest
from guarantees_lib import damage_stored_row

import lmdb_embeddings as le


def test_add_that_meets_a_damaged_chunk_forgets_its_ids_and_keeps_earlier_changes(tmp_path):
    """An add whose first rows go into a damaged, partly filled last chunk fails (before any
    spill): exactly its IDs are forgotten, the handle's earlier uncommitted put is kept."""
    path = str(tmp_path / "store")
    rows, dim, cr = 100, 4, 64  # chunk 1 holds rows 64..99 and has room up to row 127
    values = np.arange(rows * dim, dtype=np.float32).reshape(rows, dim)
    le.EmbeddingStore.create(path, rows, dim, init=values, chunk_rows=cr).close()
    damage_stored_row(path, values[80].tobytes())
    store = le.EmbeddingStore.open(path)
    try:
        store.put([5], np.full((1, dim), -1.0, np.float32))
        with pytest.raises(le.CorruptionError):
            store.add(np.arange(1000, 1010), np.full((10, dim), 7.0, np.float32))
        assert len(store) == rows and len(store.ids) == rows
        assert not any(int(i) in store for i in range(1000, 1010)), "the failed add's IDs stayed"
        assert store.get([5]).tolist() == [[-1.0] * dim]
        assert store.stats()["dirty_chunks"] == 1
        store.commit()
    finally:
        store.close()
    with le.EmbeddingStore.open(path, readonly=True) as reader:
        assert len(reader) == rows and reader.commit_count == 1
        assert reader.get([5]).tolist() == [[-1.0] * dim]


def test_multi_group_put_puts_back_the_rows_of_earlier_groups_when_a_later_group_fails(tmp_path):
    """A put over more chunks than the cache holds, whose third spill is refused (as for a full
    disk): the rows the groups before had overwritten are back, earlier changes are kept."""
    path = str(tmp_path / "store")
    rows, dim, cr = 16384, 16, 256
    values = np.arange(rows * dim, dtype=np.float32).reshape(rows, dim)
    le.EmbeddingStore.create(path, rows, dim, init=values, chunk_rows=cr).close()
    store = le.EmbeddingStore.open(path, cache_mb=0.25)  # a quarter of the table: the put goes in groups
    try:
        assert store.stats()["cache_budget_bytes"] < values.nbytes
        store.put([5], np.full((1, dim), -1.0, np.float32))  # an earlier change, uncommitted
        session = store._session
        real_spill, calls = session.spill, []

        def spill_refused_once(spec, chunk, chunk_rows):
            calls.append(chunk)
            if len(calls) == 3:
                raise le.CommitError("spill refused (injected: the disk is full)")
            return real_spill(spec, chunk, chunk_rows)

        session.spill = spill_refused_once
        with pytest.raises(le.CommitError, match="injected"):
            store.put(store.ids, values + 0.5)
        session.spill = real_spill
        assert len(calls) >= 3, "the scenario needs the put to spill"
        want = values.copy()
        want[5] = -1.0
        assert store.get(store.ids).tobytes() == want.tobytes(), "the failed put left rows behind"
        store.commit()
    finally:
        store.close()
    with le.EmbeddingStore.open(path, readonly=True) as reader:
        assert reader.get(reader.ids).tobytes() == want.tobytes()
