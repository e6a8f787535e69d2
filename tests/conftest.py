"""Shared fixtures: every test gets real LMDB stores in its own temporary directory."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import lmdb_embeddings as le

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def store_path(tmp_path):
    return str(tmp_path / "store")


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


def rows_like(n: int, dim: int, value: float = 0.0, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, dim)) * 0.1 + value).astype(np.float32)


def subprocess_env() -> dict:
    """Environment for child Python processes: this checkout first on the import path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_python(code: str, *args: str, timeout: float = 120, check: bool = True):
    """Run ``code`` in a fresh interpreter (a real subprocess) and return the CompletedProcess."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(), cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_cli(*args: str, timeout: float = 300, stdin=None):
    """Run ``python -m lmdb_embeddings ARGS`` in a subprocess (stderr is not a TTY)."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "lmdb_embeddings", *args], capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(), cwd=ROOT, stdin=stdin)
