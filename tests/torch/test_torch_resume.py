"""kill -9 in the middle of an epoch, rerun, and end with exactly the store of an uninterrupted run.

Runs examples/train_with_store.py end to end (StoreEmbedding + store-backed optimizer +
dense head, DataLoader with 2 worker processes, one commit per epoch) in real
subprocesses, and kills the whole process group (trainer and workers) with SIGKILL.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from checkout import ROOT, subprocess_env

import lmdb_embeddings as le

EXAMPLE = os.path.join(ROOT, "examples", "train_with_store.py")
SMALL = ["--rows", "2000", "--dim", "16", "--hidden", "16", "--batch-size", "50", "--epochs", "3",
         "--threads", "1", "--chunk-rows", "128", "--cache-mb", "64", "--workers", "2"]


def _run(path: str, *extra: str) -> str:
    proc = subprocess.run([sys.executable, EXAMPLE, "--path", path, *SMALL, *extra], capture_output=True, text=True,
                          timeout=180, env=subprocess_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _kill_when(path: str, marker: str, *extra: str) -> list[str]:
    """Start a training run in its own process group; SIGKILL the group once ``marker`` is printed."""
    proc = subprocess.Popen([sys.executable, EXAMPLE, "--path", path, *SMALL, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=subprocess_env(), cwd=ROOT,
                            start_new_session=True)
    lines, deadline = [], time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if not ready:
                continue
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
            if line.strip().startswith(marker):
                os.killpg(proc.pid, signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, lines
    return lines


def _snapshot(path: str) -> dict:
    with le.EmbeddingStore.open(path, readonly=True) as store:
        ids = store.ids
        out = {"rows": store.get(ids), "attrs": store.attrs}
        for column in store.columns:
            out[column] = store.get_column(column, ids)
    return out


@pytest.mark.parametrize("optimizer", ["adamw", "adagrad"])
def test_kill_9_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path, optimizer):
    reference = str(tmp_path / "reference")
    out = _run(reference, "--optimizer", optimizer, "--log-every", "0")
    assert out.count("committed epoch") == 3

    resumed = str(tmp_path / "resumed")
    lines = _kill_when(resumed, "epoch 1 step 12", "--optimizer", optimizer, "--log-every", "1",
                       "--sleep-per-step", "0.03")
    assert any(line.startswith("committed epoch 0") for line in lines)
    assert not any(line.startswith("committed epoch 1") for line in lines)
    killed = _snapshot(resumed)  # exactly the end of epoch 0: the 12+ steps of epoch 1 are gone
    assert killed["attrs"]["example.epochs_done"] == 1
    steps_per_epoch = 2000 // 50
    step_attr = {"adamw": "opt.SparseAdamW.step", "adagrad": "opt.SparseAdagrad.step"}[optimizer]
    assert killed["attrs"][step_attr] == steps_per_epoch

    out = _run(resumed, "--optimizer", optimizer, "--log-every", "0")
    assert f"resuming at epoch 1 (sparse optimizer step {steps_per_epoch})" in out
    assert out.count("committed epoch") == 2

    want, got = _snapshot(reference), _snapshot(resumed)
    assert got["attrs"][step_attr] == 3 * steps_per_epoch
    assert want.keys() == got.keys() and len(want) == (4 if optimizer == "adamw" else 3)
    for key in want:
        if key == "attrs":
            assert got["attrs"] == want["attrs"]  # head weights, dense optimizer, step count, epochs
        else:
            assert np.array_equal(got[key], want[key]), key
    assert not np.array_equal(want["rows"], _initial_rows(tmp_path))


def _initial_rows(tmp_path) -> np.ndarray:
    with le.EmbeddingStore.create(str(tmp_path / "initial"), 2000, 16, chunk_rows=128, seed=0) as store:
        return store.get(store.ids)
