"""Shared fixtures: every test gets real LMDB stores in its own temporary directory."""

from __future__ import annotations

import pytest
from dist_harness import DIST_TRAINING, launch

import lmdb_embeddings as le


@pytest.fixture
def store_path(tmp_path):
    return str(tmp_path / "store")


@pytest.fixture(scope="session", params=[2, 4], ids=lambda w: f"{w}ranks")
def dist_suite(request, tmp_path_factory):
    """ONE launch of W real gloo ranks (tests/_support/dist_scenarios.py ``suite``) shared by the distributed tests:
    (world, every rank's report, workdir). A process start per rank costs seconds on 2 cores: start once."""
    world = request.param
    workdir = str(tmp_path_factory.mktemp(f"dist{world}"))
    results = launch("suite", world, workdir, timeout=300, optimizers=DIST_TRAINING[world], two_groups=world == 4)
    return world, results, workdir


@pytest.fixture
def small_store(store_path):
    """A writable 1000 x 16 float32 store with chunk_rows=64, closed after the test."""
    store = le.EmbeddingStore.create(store_path, 1000, 16, chunk_rows=64, seed=1)
    yield store
    store.close()


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: OpenMP fan-out only costs time on a shared 2-core CI machine (numbers are unaffected)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

