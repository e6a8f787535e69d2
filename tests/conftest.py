"""Shared fixtures: every test gets real LMDB stores in its own temporary directory."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import lmdb_embeddings as le  # noqa: E402


@pytest.fixture
def store_path(tmp_path):
    return str(tmp_path / "store")


@pytest.fixture
def small_store(store_path):
    """A writable 1000 x 16 float32 store with chunk_rows=64, closed after the test."""
    store = le.EmbeddingStore.create(store_path, 1000, 16, chunk_rows=64, seed=1)
    yield store
    store.close()


def rows_like(n: int, dim: int, value: float = 0.0, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, dim)) * 0.1 + value).astype(np.float32)
