"""IdIndex: sample ID -> row slot, checked against a plain dict on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdb_embeddings.core.ids import IdIndex


def _reference(ids):
    return {int(x): i for i, x in enumerate(ids)}


def _check(index: IdIndex, ids: np.ndarray, probes: np.ndarray) -> None:
    ref = _reference(ids)
    slots, found = index.find(probes)
    assert found.tolist() == [int(p) in ref for p in probes]
    assert slots[found].tolist() == [ref[int(p)] for p in probes[found]]
    assert np.array_equal(index.ids, ids) and len(index) == len(ids)


def test_contiguous_fast_path():
    index = IdIndex(np.arange(100))
    assert index._contiguous
    _check(index, np.arange(100), np.array([0, 99, 100, -1, 50, 2**62]))
    index.append(np.arange(100, 150))  # still 0..N-1: stays on the fast path
    assert index._contiguous
    _check(index, np.arange(150), np.array([149, 150, 0]))
    index.append(np.array([7000]))
    assert not index._contiguous
    _check(index, np.append(np.arange(150), 7000), np.array([7000, 149, 150, 0]))


def test_slots_names_missing_ids():
    index = IdIndex(np.array([10, -5, 3]))
    assert index.slots(np.array([3, 10, 3])).tolist() == [2, 0, 2]
    with pytest.raises(KeyError, match=r"2 unknown sample id\(s\): -6, 4"):
        index.slots(np.array([4, 3, -6, 4]))
    with pytest.raises(KeyError, match="and 5 more"):
        index.slots(np.arange(100, 115))


def test_check_new_changes_nothing_on_error():
    index = IdIndex(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="already in the store: 2"):
        index.check_new(np.array([9, 2]))
    with pytest.raises(ValueError, match="duplicates"):
        index.check_new(np.array([9, 9]))
    index.check_new(np.array([9, 10]))
    assert index.ids.tolist() == [1, 2, 3]


def test_empty_index():
    index = IdIndex(np.empty(0, np.int64))
    _check(index, np.empty(0, np.int64), np.array([0, 1]))
    index.append(np.array([5, -5]))
    _check(index, np.array([5, -5]), np.array([5, -5, 0]))


def test_truncate_forgets_appended_ids():
    index = IdIndex(np.array([4, 8]))
    index.append(np.array([1, 100]))
    index.truncate(2)
    _check(index, np.array([4, 8]), np.array([1, 100, 4, 8]))
    index.append(np.array([100]))
    _check(index, np.array([4, 8, 100]), np.array([1, 100]))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(-(2**63), 2**63 - 1), unique=True, max_size=60),
    st.lists(st.lists(st.integers(-1000, 1000), unique=True, max_size=20), max_size=4),
    st.lists(st.integers(-1000, 1000), max_size=30),
)
def test_matches_a_dict_under_appends(initial, batches, probes):
    ids = np.array(initial, dtype=np.int64)
    index = IdIndex(ids)
    for batch in batches:
        new = np.array([b for b in batch if b not in set(ids.tolist())], dtype=np.int64)
        index.append(new)
        ids = np.concatenate([ids, new])
    _check(index, ids, np.array(probes + ids[:5].tolist(), dtype=np.int64))


def test_ids_0_to_n_minus_1_are_held_as_a_count_not_an_array():
    """The common case costs no memory per row, however large the table (the cache bound)."""
    index = IdIndex.from_chunks(np.arange(lo, lo + 1000) for lo in range(0, 10_000_000, 1000))
    assert index._buf is None and len(index) == 10_000_000
    assert np.array_equal(index.slice(9_999_998, 10**8), [9_999_998, 9_999_999])
    assert np.array_equal(index.slots(np.array([5, 9_999_999])), [5, 9_999_999])
    index.append(np.array([10_000_000, 10_000_001]))  # appending the next IDs keeps it a count
    assert index._buf is None and len(index) == 10_000_002
    index.append(np.array([-4]))  # any other ID needs the array from then on
    assert index._buf is not None and np.array_equal(index.slots(np.array([-4, 0])), [10_000_002, 0])
    index.truncate(10_000_002)  # rolled back: a count again
    assert index._buf is None and index.ids_copy()[-1] == 10_000_001
