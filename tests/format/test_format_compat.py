"""Stores and dumps written by lmdb_embeddings 0.1.0 before the package was restructured open bit-exact.

``tests/data/format_v1/`` holds a store (``data.mdb``: float16 rows, an optimizer-state column,
attrs, two commits, IDs added after create) and a native dump of it, both written by the
0.1.0 code of commit 1812c82, and the rows, IDs and state that code read back from it.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from checkout import FIXTURES, run_cli

import lmdb_embeddings as le

DATA = os.path.join(FIXTURES, "format_v1")
COLUMN = "opt.SparseAdam.exp_avg"


@pytest.fixture
def old_store(tmp_path):
    path = tmp_path / "store_v1"
    path.mkdir()
    shutil.copy(os.path.join(DATA, "data.mdb"), path / "data.mdb")
    return str(path)


def _expected(name: str) -> np.ndarray:
    return np.load(os.path.join(DATA, f"expected_{name}.npy"))


def _check(store: le.EmbeddingStore) -> None:
    assert np.array_equal(store.ids, _expected("ids"))
    assert store.get(store.ids).tobytes() == _expected("rows").tobytes()
    assert store.get_column(COLUMN, store.ids).tobytes() == _expected("state").tobytes()
    assert store.attrs["opt.SparseAdam.step"] == 3 and store.commit_count == 2 and store.dtype == np.float16


@pytest.mark.parametrize("readonly", [True, False])
def test_an_old_store_opens_bit_exact(old_store, readonly):
    with le.EmbeddingStore.open(old_store, readonly=readonly) as store:
        _check(store)


def test_an_old_store_keeps_working_and_verifies(old_store):
    with le.EmbeddingStore.open(old_store) as store:
        ids = store.ids[:5]
        store.put(ids, np.ones((5, 8), np.float16))
    assert run_cli("verify", old_store).returncode == 0
    with le.EmbeddingStore.open(old_store, readonly=True) as store:
        assert np.all(store.get(ids) == 1.0) and store.commit_count == 3


def test_an_old_dump_restores_bit_exact(tmp_path):
    target = str(tmp_path / "restored")
    proc = run_cli("restore", os.path.join(DATA, "store_v1.lemb"), target)
    assert proc.returncode == 0, proc.stderr
    with le.EmbeddingStore.open(target, readonly=True) as store:
        _check(store)
