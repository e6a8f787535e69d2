"""Sharded stores whose process group fails, and whose directory was put together wrongly (issue 18, items 5, 13).

Real gloo ranks on 127.0.0.1 (tests/_support/dist_harness.py); the scenarios are in tests/_support/dist_failures.py.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from checkout import run_cli
from cli_helpers import assert_one_line_error, ok
from dist_harness import launch, start

import lmdb_embeddings as le
from lmdb_embeddings.distributed.shard import recover_sharded
from lmdb_embeddings.sharding.manifest import read_manifest, write_manifest

CALLS = ["get", "put", "add", "rollback", "commit", "commit_prepared", "commit_decided", "close", "open", "create",
         "commit_hang"]
COMMIT_CALLS = {"commit", "commit_prepared", "commit_decided", "commit_hang", "close"}


@pytest.fixture(scope="module")
def group_failures(tmp_path_factory):
    """ONE launch: rank 0 plus one peer per case, each pair with its own group and store (a process start per
    rank costs seconds on 2 cores). Returns (rank 0's report per case, workdir)."""
    workdir = str(tmp_path_factory.mktemp("group-failures"))
    procs = start("dist_failures:group_failure", len(CALLS) + 1, workdir, calls=CALLS)
    try:
        out, err = procs[0].communicate(timeout=400)
        assert procs[0].returncode == 0, f"rank 0 failed:\n{out[-3000:]}\n{err[-6000:]}"
    finally:
        for proc in procs:  # the peers died by SIGKILL, or wait stopped (SIGSTOP): kill what is left
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    with open(os.path.join(workdir, "result-dist_failures:group_failure-0.json")) as f:
        return json.load(f), workdir


def _values_on_disk(workdir: str, call: str) -> set:
    """Every value in the store after an offline recovery (what the next collective open would find)."""
    path = os.path.join(workdir, f"store-{CALLS.index(call) + 1}-{call}")
    recovered = recover_sharded(path)
    manifest = read_manifest(path)
    values = set()
    for rank in range(manifest.world_size):
        with le.EmbeddingStore.open(manifest.shard_path(path, rank), readonly=True) as shard:
            values |= set(np.unique(shard.get(shard.ids)).tolist())
    return {"commit": recovered["commit"], "values": values}


@pytest.mark.parametrize("call", CALLS)
def test_a_peer_that_dies_or_hangs_fails_the_call_with_a_clear_error_that_says_where_the_store_stands(
        group_failures, call):
    report, workdir = group_failures
    case = report[call]
    error = case["error"]
    assert "ProcessGroupError" in error["classes"] and "EmbeddingStoreError" in error["classes"], error
    if call in COMMIT_CALLS:
        assert "CommitError" in error["classes"], error
    message = error["message"]
    assert "RuntimeError" not in error["classes"] and "process group failed" in message, message
    assert "consistent" in message or "commit 2 was made" in message or "was not made" in message \
        or "manifest" in message, message
    assert "again" in message, message  # what to do: open it again
    if call == "commit_hang":
        assert error["seconds"] < 60, error  # the group's timeout (4 s), not a hang
    if call not in ("open", "create"):
        assert "ProcessGroupError" in case["next_call"]["classes"] and case["next_call"]["seconds"] < 5
        assert case["close"]["classes"] == [] and case["close_again"]["classes"] == []
    if call != "create":
        assert case["lock_released"]
        on_disk = _values_on_disk(workdir, call)
        expected = 2 if call == "commit_decided" else 1
        assert on_disk == {"commit": expected, "values": {float(expected)}}, on_disk  # one commit, every shard


def test_commit_says_which_commit_the_store_is_at(group_failures):
    report, _ = group_failures
    for call in ("commit", "commit_prepared", "commit_hang", "close"):
        assert "commit 2 was not made: the store is at commit 1" in report[call]["error"]["message"], call
    assert "commit 2 was made (rank 0 wrote its manifest): the store is at commit 2" in \
        report["commit_decided"]["error"]["message"]
    assert "consistent at commit 2" in report["commit_decided"]["next_call"]["message"]
    for call in ("get", "put", "add", "rollback"):
        assert "consistent at commit 1" in report[call]["error"]["message"], call


# ------------------------------------------------------------- item 5: shards that are not their rank's
def test_a_collective_open_refuses_swapped_shards_or_an_edited_manifest_on_every_rank(tmp_path):
    """Before: the open worked; gets failed with "983 unknown sample id(s)" and ``add`` wrote into the other
    rank's shard. Now every rank raises CorruptionError naming the mismatch, and nothing is written."""
    results = launch("dist_failures:shard_identity", 2, str(tmp_path), timeout=240)
    for case, needle in (("swapped", "swapped"), ("swapped_readonly", "swapped"), ("dim_edited", "dim 8")):
        outcomes = [r[case] for r in results]
        assert all("CorruptionError" in o["classes"] for o in outcomes), outcomes  # every rank, no hang
        assert all(needle in o["message"] for o in outcomes), outcomes
    assert "holds the rows of rank 1" in results[0]["swapped"]["message"]
    for r in results:
        assert r["intact"] and r["rows_of_shard_0"] + r["rows_of_shard_1"] == 200  # nothing was added


@pytest.fixture
def sharded_copy(tmp_path):
    """A store sharded for 2 ranks (restore --shards 2, no process group): (path, manifest)."""
    plain, dump, path = (str(tmp_path / n) for n in ("plain", "d.lemb", "sharded"))
    le.EmbeddingStore.create(plain, 300, 4, chunk_rows=16).close()
    ok("dump", plain, dump)
    ok("restore", dump, path, "--shards", "2")
    return path, read_manifest(path)


@pytest.mark.parametrize("damage", ["swapped", "dim_edited"])
def test_the_offline_readers_refuse_swapped_shards_or_an_edited_manifest(tmp_path, sharded_copy, damage):
    """Before: ``verify`` of the edited manifest said OK and ``dump`` wrote it; ``info`` showed it."""
    path, manifest = sharded_copy
    if damage == "swapped":
        a, b = (manifest.shard_path(path, r) for r in (0, 1))
        os.rename(a, a + ".x")
        os.rename(b, a)
        os.rename(a + ".x", b)
    else:
        write_manifest(path, dataclasses.replace(manifest, dim=8))
    needle = "swapped" if damage == "swapped" else "dim 8"
    for args in (("info", path), ("dump", path, str(tmp_path / "out.lemb"))):
        proc = run_cli(*args)
        assert_one_line_error(proc, needle)
        assert proc.returncode == 1
    assert not os.path.exists(tmp_path / "out.lemb")
    proc = run_cli("verify", path)
    assert proc.returncode == 1 and proc.stdout.startswith("FAILED:") and needle in proc.stdout, proc.stdout


@pytest.mark.parametrize("edit", [{"shards": "reversed"}, {"buckets": 0}, {"commit": -1},
                                  {"init": {"kind": "bogus"}}, {"dtype": "int8"}, {"rows": "300"}])
def test_a_hand_edited_manifest_that_no_store_could_have_written_is_refused(tmp_path, sharded_copy, edit):
    path, manifest = sharded_copy
    if edit.get("shards") == "reversed":
        edit = {"shards": manifest.shards[::-1]}
    write_manifest(path, dataclasses.replace(manifest, **edit))
    proc = run_cli("info", path)
    assert_one_line_error(proc, "manifest is damaged")
    assert proc.returncode == 1
