"""``mypy --strict`` on a user script over the torch-facing API reports nothing that comes from the library."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from checkout import ROOT

pytest.importorskip("mypy", reason="the typing check needs mypy (pip install -e '.[test]')")

USER_SCRIPT = '''
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

import lmdb_embeddings as le
from lmdb_embeddings.torch import (SparseAdagrad, SparseAdam, SparseAdamW, SparseSGD, StoreEmbedding,
                                   StoreOptimizer, TableHandle, clip_grad_norm_)
from lmdb_embeddings.torch.dataset import EmbeddingDataset


def train(path: str) -> float:
    store = le.EmbeddingStore.create(path, 100, 8, overwrite=True)
    handle: TableHandle = store
    emb = StoreEmbedding(handle, padding_idx=0, max_norm=5.0)
    model = torch.nn.Sequential(emb, torch.nn.Linear(8, 1))
    opt: StoreOptimizer = SparseAdam(emb, lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    loss = model(torch.arange(10)).pow(2).mean()
    loss.backward()
    total: torch.Tensor = clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    closure_loss: float = opt.step(lambda: 1.0)
    sched.step()
    opt.zero_grad()
    model.zero_grad()
    steps: int = opt.step_count
    opt.load_state_dict(opt.state_dict())
    model.load_state_dict(model.state_dict())
    rows: torch.Tensor = store.get_tensor([1, 2], device="cpu")
    ds = EmbeddingDataset(store, np.arange(10))
    one: torch.Tensor = ds[0]
    some: torch.Tensor = ds[[1, 2]]
    for batch in DataLoader(ds, batch_size=4):
        print(batch.shape)
    print(SparseSGD, SparseAdagrad, SparseAdamW, total, closure_loss, steps, rows, one, some, emb.dtype)
    store.close()
    return float(loss)
'''

CONFIG = """
[mypy]
strict = True
# the library as an installed package is seen: its types are used, its own code is not checked here
[mypy-lmdb_embeddings.*]
follow_imports = silent
"""


def test_mypy_strict_on_a_user_script_reports_nothing(tmp_path):
    (tmp_path / "user_script.py").write_text(USER_SCRIPT)
    (tmp_path / "mypy.ini").write_text(CONFIG)
    env = dict(os.environ, MYPYPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir",
                           str(tmp_path / "cache"), "user_script.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
