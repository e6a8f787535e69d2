"""The atomic commit across shards: SIGKILL one rank of a 2-rank job at random moments of coordinated
commits (inside either phase too), then the others; the next collective open (and, after the last kill,
an offline recovery) must find every shard at the same commit, at least the last one acknowledged.

Round k writes the value k into every row (rows of every owner, from every rank), so a store holding one
commit has a single value everywhere, equal to its commit number; ``dist_scenarios.commit_loop`` checks
that on every rank right after its collective open, before committing on.
"""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torture_lib as tl
from dist_harness import start

import lmdb_embeddings as le
from lmdb_embeddings.distributed.shard import recover_sharded
from lmdb_embeddings.sharding.manifest import read_manifest

pytestmark = pytest.mark.torture

KILLS = tl.knob("dist_commit_kills", 3, 25)
ROWS = tl.knob("dist_commit_rows", 20_000, 100_000)


def _store_values(path: str) -> set:
    manifest = read_manifest(path)
    values = set()
    for rank in range(manifest.world_size):
        with le.EmbeddingStore.open(manifest.shard_path(path, rank), readonly=True) as shard:
            values |= set(np.unique(shard.get(shard.ids)).tolist())
    return values


def test_kill9_of_a_rank_during_commits_reopens_every_shard_at_one_acknowledged_commit(tmp_path):
    rng = random.Random(14)
    path = str(tmp_path / "store")
    acked, undone, opened = 0, 0, []
    for trial in range(KILLS):
        procs = start("commit_loop", 2, str(tmp_path / f"run{trial}"), path=path, min_commit=acked, rows=ROWS,
                      rounds=100_000)
        readers = [tl.LineReader(p) for p in procs]
        try:
            for rank, reader in enumerate(readers):
                line = reader.wait_for("opened", 90)
                assert line is not None, f"trial {trial} rank {rank}: no open: {tl.stderr_of(procs[rank])[-3000:]}"
                undone += int(line.split()[3])
                opened.append(int(line.split()[1]))
            assert readers[0].wait_for("acked", 60) is not None, tl.stderr_of(procs[0])[-3000:]
            time.sleep(rng.uniform(0.0, 0.4))  # somewhere in the commit loop: often inside commit()
            victim = rng.randrange(2)
            tl.kill9(procs[victim])
            time.sleep(rng.uniform(0.0, 0.05))
        finally:
            for proc in procs:
                tl.kill9(proc)
        for reader in readers:
            reader.drain()
        acks = [int(line.split()[1]) for reader in readers for line in reader.lines if line.startswith("acked")]
        acked = max([acked, *acks])
    recovered = recover_sharded(path)
    undone += len(recovered["reverted"])
    values = _store_values(path)
    tl.record("distributed_commit_kills", kills=KILLS, kills_survived=KILLS, last_acked=acked,
              final_commit=recovered["commit"], undone_prepared_commits=undone,
              inconsistent_opens=int(values != {float(recovered["commit"])}))
    assert values == {float(recovered["commit"])}, values  # one commit on every shard
    assert recovered["commit"] >= acked and all(o >= 0 for o in opened)
