"""StoreEmbedding + the Sparse* optimizers on a sharded store, on real gloo ranks: each step equals a
single-store step over the concatenation of all ranks' batches with their losses summed (rtol 1e-5),
optimizer state and step counts included, across a commit and reopen; a NaN on one rank fails the step
on every rank and writes nothing."""

from __future__ import annotations

import os
import subprocess
import sys

from dist_harness import DIST_TRAINING, ROOT, worker_env

from lmdb_embeddings.sharding.manifest import read_manifest

EXAMPLE = os.path.join(ROOT, "examples", "train_sharded.py")


def test_sharded_training_equals_the_single_store_run(dist_suite):
    world, results, _ = dist_suite
    training = [r["training"] for r in results]
    optimizers = DIST_TRAINING[world]
    for rank, per_rank in enumerate(training):
        assert sorted(per_rank) == sorted(optimizers)
        for name, r in per_rank.items():
            where = f"{name} on rank {rank}"
            assert r["trained"] and r["rows_close"] and r["state_close"] and r["attrs_equal"], (where, r)
            assert r["step_count"][0] == r["step_count"][1] == (3 if name != "SparseSGD" else 0), where
            assert r["resumed"]["rows_close"] and r["resumed"]["state_close"], (where, r["resumed"])
            assert r["nan_step"].startswith("InvalidInputError|ValueError") and r["nan_step_wrote_nothing"], where
    assert sum(r[optimizers[0]]["remote_lookups"] for r in training) > 0  # gradients did travel to owners


def test_store_embedding_habits_hold_on_a_sharded_store(dist_suite):
    """zero_grad through a parent drops a backward, padding_idx is never written, freezing, checkpoints of the
    module (its uuid is the shards' token) and the optimizer; max_norm and deepcopy are refused on every rank."""
    _, results, _ = dist_suite
    for rank, r in enumerate(r["habits"] for r in results):
        assert r["trained"] and r["rows_close"] and r["state_close"] and r["attrs_equal"], (rank, r)
        assert r["padding_unchanged"] and not r["frozen_output_requires_grad"], (rank, r)
        assert r["state_uuid_is_the_token"] and r["opt_state_step"] == 1, (rank, r)
        assert r["max_norm"] == "InvalidInputError|ValueError|ESE", (rank, r)
        assert r["deepcopy"] == "InvalidTypeError|TypeError|ESE", (rank, r)


def test_the_example_runs_under_torchrun(tmp_path):
    path = str(tmp_path / "sharded")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", EXAMPLE,
                           "--path", path, "--rows", "3000", "--dim", "8", "--batch-size", "256", "--epochs", "2"],
                          env=worker_env(), cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 ranks, 3000 rows x 8" in proc.stdout and "epoch 1:" in proc.stdout
    assert read_manifest(path).commit == 2  # one collective commit per epoch
