"""Training throughput and commit time of a ShardedEmbeddingStore on 1, 2 and 4 local ranks.

For each world size W, W processes join a gloo group (NCCL with ``--backend nccl``: one GPU
per rank, the rows' gradients and the head on CUDA) and share one table of ``--rows`` x
``--dim``. Each rank runs ``--steps`` training steps (forward, loss, backward, SparseAdam
step) of ``--batch-size`` rows in two modes:

* ``sampler``: batches from ShardedSampler, i.e. the IDs the rank owns (lookups stay local);
* ``random``: uniformly random global IDs (lookups and gradients go through all_to_all).

Then it commits (the two-phase commit over W shards) and, for comparison, the same number
of changed rows is committed on a plain EmbeddingStore of the same table in the same run.
Figures: rows/s per rank (median over ranks) and aggregate (sum), commit seconds, and the
commit time as a ratio to the single store's. Absolute numbers depend on the machine (and
on whoever else uses its cores): compare ratios within one run.

    python benchmarks/bench_sharded.py                                  # 1, 2, 4 ranks, 200k x 64
    python benchmarks/bench_sharded.py --rows 4000 --steps 3 --worlds 1 2 --json out.json   # smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import lmdb_embeddings as le  # noqa: E402
from benchmarks.scratch import scratch_dir  # noqa: E402
from lmdb_embeddings.distributed import ShardedEmbeddingStore, ShardedSampler  # noqa: E402
from lmdb_embeddings.torch import SparseAdam, StoreEmbedding  # noqa: E402


def _steps(emb, opt, batches, device) -> float:
    """Seconds for the training steps over ``batches`` (lists of IDs)."""
    target = torch.zeros(emb.embedding_dim, device=device)
    began = time.perf_counter()
    for ids in batches:
        out = emb(torch.as_tensor(ids, dtype=torch.int64))
        ((out - target) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - began


def worker(args) -> None:
    rank, world = args.rank, args.world
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    path = os.path.join(args.workdir, f"sharded-{world}")
    store = ShardedEmbeddingStore.create(path, args.rows, args.dim, chunk_rows=1024, overwrite=True,
                                         cache_mb=args.cache_mb)
    emb = StoreEmbedding(store).to(device)
    opt = SparseAdam(emb, lr=1e-3)
    sampler = ShardedSampler(store, args.batch_size, seed=0)
    owned = [b for _, b in zip(range(args.steps), sampler, strict=False)]
    rng = np.random.default_rng(rank)
    random_ids = [rng.integers(0, args.rows, args.batch_size).tolist() for _ in range(len(owned))]
    _steps(emb, opt, owned[:1], device)  # warm-up: caches, column declarations
    figures = {}
    for mode, batches in (("sampler", owned), ("random", random_ids)):
        dist.barrier()
        seconds = _steps(emb, opt, batches, device)
        figures[f"{mode}_rows_per_s"] = sum(len(b) for b in batches) / seconds
    changed = len(store.local)  # rows each shard may have changed: bounded by what it owns
    dist.barrier()
    began = time.perf_counter()
    store.commit()
    figures["commit_s"] = time.perf_counter() - began
    figures["local_rows"] = changed
    store.close()
    gathered = [None] * world
    dist.all_gather_object(gathered, figures)
    dist.destroy_process_group()
    if rank == 0:
        with open(os.path.join(args.workdir, f"result-{world}.json"), "w") as f:
            json.dump(gathered, f)


def single_store_commit(workdir: str, rows: int, dim: int, touched: int, cache_mb: float) -> float:
    """Commit time of a plain store after a put of ``touched`` random rows (and Adam-sized state)."""
    path = os.path.join(workdir, "single")
    store = le.EmbeddingStore.create(path, rows, dim, chunk_rows=1024, overwrite=True, cache_mb=cache_mb)
    ids = np.random.default_rng(0).choice(rows, min(touched, rows), replace=False)
    store.put(ids, np.zeros((len(ids), dim), np.float32))
    for name in ("exp_avg", "exp_avg_sq"):
        store.ensure_column(name, dim)
        store.put_column(name, ids, np.ones((len(ids), dim), np.float32))
    began = time.perf_counter()
    store.commit()
    seconds = time.perf_counter() - began
    store.close()
    return seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(args, world: int, workdir: str) -> list[dict]:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # as a module from the checkout (not as a script: benchmarks/profile.py would shadow the stdlib's profile,
    # which torch's optimizers import)
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.bench_sharded", "--worker", "--rank", str(r),
                               "--world", str(world), "--port", str(port), "--workdir", workdir,
                               "--rows", str(args.rows), "--dim", str(args.dim), "--batch-size", str(args.batch_size),
                               "--steps", str(args.steps), "--cache-mb", str(args.cache_mb),
                               "--backend", args.backend], env=env, cwd=ROOT)
             for r in range(world)]
    codes = [p.wait(timeout=args.timeout) for p in procs]
    if any(codes):
        raise SystemExit(f"{world} ranks: a rank failed (exit codes {codes})")
    with open(os.path.join(workdir, f"result-{world}.json")) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cache-mb", type=float, default=512)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--workdir", help="directory for the stores (default: a temporary one, removed)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with scratch_dir("bench_sharded-", keep=args.workdir) as workdir:  # removed on any exit, SIGTERM too
        report = {"rows": args.rows, "dim": args.dim, "batch_size": args.batch_size, "steps": args.steps,
                  "backend": args.backend, "worlds": {}}
        for world in args.worlds:
            ranks = run_world(args, world, workdir)
            touched = sum(r["local_rows"] for r in ranks)
            single = single_store_commit(workdir, args.rows, args.dim, touched, args.cache_mb)
            commit = max(r["commit_s"] for r in ranks)
            entry = {"commit_s": commit, "single_store_commit_s": single, "commit_ratio": commit / single}
            for mode in ("sampler", "random"):
                per_rank = [r[f"{mode}_rows_per_s"] for r in ranks]
                entry[mode] = {"rows_per_s_per_rank": statistics.median(per_rank), "aggregate": sum(per_rank)}
            report["worlds"][str(world)] = entry
            print(f"{world} rank(s): sampler {entry['sampler']['rows_per_s_per_rank']:.0f} rows/s per rank, "
                  f"{entry['sampler']['aggregate']:.0f} in all | random ids "
                  f"{entry['random']['rows_per_s_per_rank']:.0f} per rank, {entry['random']['aggregate']:.0f} in all"
                  f" | commit {commit:.3f} s = {entry['commit_ratio']:.2f}x a single store's", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
