"""What each rank runs in tests/distributed/test_distributed_failures.py (started by dist_worker.py as
``dist_failures:NAME``).

``group_failure``: rank 0 survives; every other rank k shares a 2-rank process group with it and a store over
that group, and dies (SIGKILL) or hangs (SIGSTOP) at one point of one collective call; rank 0 makes that call
and reports what it raised, and whether the handle then fails fast and closes. ``shard_identity``: 2 ranks
open a store whose shard directories were swapped, then one whose manifest was edited.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import signal
import time

import numpy as np
import torch.distributed as dist

import lmdb_embeddings as le
from lmdb_embeddings.distributed import ShardedEmbeddingStore
from lmdb_embeddings.processes.writer_lock import holder_pid
from lmdb_embeddings.sharding.manifest import read_manifest, write_manifest

DIM, ROWS = 4, 200
HANG_TIMEOUT_S = 4  # the process-group timeout of the group whose peer hangs
GROUP_TIMEOUT_S = 240  # the others: a peer waits in create until rank 0 reaches its group


def _outcome(call) -> dict:
    started = time.monotonic()
    try:
        call()
    except Exception as exc:
        return {"classes": [c.__name__ for c in type(exc).__mro__], "message": str(exc),
                "seconds": time.monotonic() - started}
    return {"classes": [], "message": "no error", "seconds": time.monotonic() - started}


def _die(how: str) -> None:
    os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    time.sleep(600)  # SIGSTOP: the test kills this process after rank 0 is done


def _die_at_gather(store: ShardedEmbeddingStore, number: int) -> None:
    """Die right before the ``number``-th all-gather this store makes from now on (inside a commit)."""
    c, original, count = store.collective, store.collective.all_gather_ints, [0]

    def gather(values):
        count[0] += 1
        if count[0] == number:
            _die("kill")
        return original(values)

    c.all_gather_ints = gather


def _one_case(rank: int, workdir: str, k: int, call: str, group) -> dict | None:
    path = os.path.join(workdir, f"store-{k}-{call}")
    peer = rank != 0
    if call == "create":
        if peer:
            _die("kill")
        return {"error": _outcome(lambda: ShardedEmbeddingStore.create(path, ROWS, DIM, group=group))}
    store = ShardedEmbeddingStore.create(path, ROWS, DIM, chunk_rows=16, init="zeros", group=group, cache_mb=8)
    mine = np.arange(ROWS, dtype=np.int64)[int(peer)::2]
    store.put(mine, np.full((len(mine), DIM), 1.0, np.float32))
    store.commit()  # commit 1: 1.0 everywhere
    store.put(mine, np.full((len(mine), DIM), 2.0, np.float32))  # pending on both ranks
    if call == "open":
        store.rollback()
        store.close()
    if peer:
        if call == "commit_prepared":
            _die_at_gather(store, 2)  # after its shard prepared commit 2, before telling rank 0
            store.commit()
        elif call == "commit_decided":
            _die_at_gather(store, 3)  # after every shard prepared, before hearing rank 0's decision
            store.commit()
        _die("stop" if call == "commit_hang" else "kill")
    actions = {
        "get": lambda: store.get(mine), "put": lambda: store.put(mine, np.zeros((len(mine), DIM))),
        "add": lambda: store.add([10_000]), "rollback": store.rollback, "commit": store.commit,
        "commit_prepared": store.commit, "commit_decided": store.commit, "commit_hang": store.commit,
        "close": store.close, "open": lambda: ShardedEmbeddingStore.open(path, group=group),
    }
    out = {"error": _outcome(actions[call])}
    if call != "open":
        out["next_call"] = _outcome(lambda: store.get(mine))  # refused at once, no collective attempted
        out["close"] = _outcome(store.close)
        out["close_again"] = _outcome(store.close)
    out["lock_released"] = holder_pid(read_manifest(path).shard_path(path, 0)) is None
    return out


def group_failure(rank: int, world: int, workdir: str, calls: list) -> dict:
    """Rank 0 and rank k (k = 1..world-1) form group k; rank k fails at ``calls[k-1]``."""
    groups = [dist.new_group([0, k], timeout=datetime.timedelta(
        seconds=HANG_TIMEOUT_S if calls[k - 1] == "commit_hang" else GROUP_TIMEOUT_S)) for k in range(1, world)]
    if rank != 0:
        _one_case(rank, workdir, rank, calls[rank - 1], groups[rank - 1])
        return {}
    return {call: _one_case(0, workdir, k, call, groups[k - 1]) for k, call in enumerate(calls, start=1)}


def shard_identity(rank: int, world: int, workdir: str) -> dict:
    """Open with the shard directories swapped, then with the manifest's dim edited: refused on every rank."""
    path = os.path.join(workdir, "sharded")
    store = ShardedEmbeddingStore.create(path, ROWS, DIM, chunk_rows=16, cache_mb=8)
    rows = store.get(np.arange(ROWS))
    store.close()
    manifest = read_manifest(path)
    shards = [manifest.shard_path(path, r) for r in range(world)]
    out = {}

    def attempt(name: str, **kwargs) -> None:
        dist.barrier()
        def open_and_add():
            with ShardedEmbeddingStore.open(path, **kwargs) as opened:
                opened.add([10_000 + rank])
        out[name] = _outcome(open_and_add)
        dist.barrier()

    if rank == 0:  # copied back from two nodes under each other's names
        os.rename(shards[0], shards[0] + ".x")
        os.rename(shards[1], shards[0])
        os.rename(shards[0] + ".x", shards[1])
    attempt("swapped")
    attempt("swapped_readonly", readonly=True)
    if rank == 0:
        os.rename(shards[0], shards[0] + ".x")
        os.rename(shards[1], shards[0])
        os.rename(shards[0] + ".x", shards[1])
        write_manifest(path, dataclasses.replace(manifest, dim=8))  # a hand edit, checksum recomputed
    attempt("dim_edited")
    if rank == 0:
        write_manifest(path, manifest)
    dist.barrier()
    with ShardedEmbeddingStore.open(path, readonly=True) as store:
        out["intact"] = bool(np.array_equal(store.get(np.arange(ROWS)), rows)) and len(store) == ROWS
    for r, shard in enumerate(shards):
        with le.EmbeddingStore.open(shard, readonly=True) as s:
            out[f"rows_of_shard_{r}"] = len(s)
    return out
