"""Shuffled training over a table larger than the cache, against the memmap trainer (issue 19's training target).

``python -m benchmarks.big_training [--rows 500000] [--cache-mb 64] [--steps 30] [--rounds 3] [--quick]``

A run is ``--steps`` steps of ``StoreEmbedding`` + ``SparseAdam`` (batches of ``--batch`` IDs drawn from
one random permutation of the table, a squared-error loss against a fixed random target) and ONE commit,
on a fresh store of ``--rows`` x ``--dim`` rows opened with ``cache_mb``. Variants: ``buffer`` (the write
buffer, ``write_buffer=True``, the default), ``no_buffer`` (``write_buffer=False``: every row written beyond L1
makes its chunk resident, later spilled whole) and, only when named in ``--variants``, ``prefetch`` (the write
buffer and ``store.prefetch`` of the next batch before each step: issue 19's moonshot). Baselines: the "memmap
trainer" (rows, ``exp_avg`` and ``exp_avg_sq`` in three ``np.memmap`` files, the same batches, the same Adam
arithmetic in torch on the gathered rows (``_sparse_adam``), scattered back, flushed at the end) and
``nn.Embedding(sparse=True)`` + ``torch.optim.SparseAdam`` in RAM on the same batches.

Every variant is timed by wall clock (meaningful on a quiet machine only: ``*_wall`` ratios) and by the calling
thread's CPU time (``time.thread_time``, user + system) of its training loop and commit (or flush), so figures
stay comparable while other processes load the CPUs; the results are ratios of rows per CPU-second against the
memmap trainer of the same round. The prefetch thread's CPU is not the calling thread's: ``process_cpu_s``
(every thread of the process) shows it, and for that variant the wall ratio is the one that counts. Rounds
interleave the variants. Also reported: the data file's allocated blocks over the table's bytes (rows +
moments), and RssAnon after the run. Results: ``benchmarks/results/big_training.jsonl`` with the commit measured.
``--warm-commits N`` (default 0) first trains N untimed runs of ``--steps`` steps on other batches, each
ended by a commit (memmap: a flush), so the timed run meets a store in its steady state, where LMDB reuses
the pages that commits before the last one freed (a fresh store's first commits take new pages of the file,
which the kernel zero-fills when they are first written through the map).
``--quick``: a small table through a small cache, one round (a smoke test,
``tests/project/test_bench_big_training.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

import lmdb_embeddings as le
from lmdb_embeddings.torch import SparseAdam, StoreEmbedding
from lmdb_embeddings.torch.optimizers import _sparse_adam

from .run import RESULTS, ROOT
from .scratch import scratch_dir

DIM, BATCH = 128, 1024
VARIANTS = ("buffer", "no_buffer")  # write_buffer=True / False; "prefetch" (buffer + prefetch) when asked for
KNOWN_VARIANTS = (*VARIANTS, "prefetch")


def _anon_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def _batches(rows: int, steps: int, batch: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(rows)
    return [order[i * batch : (i + 1) * batch] for i in range(steps)]


def store_round(work: str, rows: int, cache_mb: float, batches: list, target: torch.Tensor, write_buffer: bool,
                prefetch: bool = False, warm: tuple = ()) -> dict:
    """One training run + ONE commit on a fresh store; CPU seconds of the loop and the commit. With ``prefetch``
    each step first hints the next batch (``store.prefetch``), as ``BlockShuffleBatchSampler(prefetch=1)`` does."""
    path = os.path.join(work, "store")
    le.EmbeddingStore.create(path, rows, DIM, seed=0, overwrite=True).close()
    store = le.EmbeddingStore.open(path, cache_mb=cache_mb, write_buffer=write_buffer)
    try:
        emb = StoreEmbedding(store)
        opt = SparseAdam(emb, lr=1e-3)
        for earlier in warm:  # untimed runs, each committed: the store's steady state
            for ids in earlier:
                out = emb(ids)
                opt.zero_grad()
                _loss(out, target).backward()
                opt.step()
            store.commit()
        wall, c, every_thread = time.perf_counter(), time.thread_time(), time.process_time()
        for step, ids in enumerate(batches):
            if prefetch and step + 1 < len(batches):
                store.prefetch(batches[step + 1])
            out = emb(ids)
            opt.zero_grad()
            _loss(out, target).backward()
            opt.step()
        loop = time.thread_time() - c
        c = time.thread_time()
        store.commit()
        commit = time.thread_time() - c
        wall, every_thread = time.perf_counter() - wall, time.process_time() - every_thread
        stats = store.stats()
        anon = _anon_mb()
    finally:
        store.close()
    allocated = os.stat(os.path.join(path, "data.mdb")).st_blocks * 512
    table_bytes = rows * DIM * 4 * 3  # rows + exp_avg + exp_avg_sq
    return {"cpu_s": loop + commit, "wall_s": wall, "loop_cpu_s": loop, "commit_cpu_s": commit,
            "process_cpu_s": every_thread,
            "disk_x_table": allocated / table_bytes, "anon_mb": anon,
            "merges": stats.get("buffer_merges", 0), "merged_chunks": stats.get("merged_chunks", 0),
            "chunks_loaded": stats["chunks_loaded"]}


def memmap_round(work: str, rows: int, batches: list, target: torch.Tensor, warm: tuple = ()) -> dict:
    """The memmap trainer: the same batches and Adam arithmetic over three np.memmaps, flushed at the end."""
    names = [os.path.join(work, f"{n}.f32") for n in ("rows", "exp_avg", "exp_avg_sq")]
    maps = []
    for i, name in enumerate(names):
        mm = np.memmap(name, np.float32, "w+", shape=(rows, DIM))
        if i == 0:
            for start in range(0, rows, 65536):
                mm[start : start + 65536] = np.random.default_rng(start).standard_normal(
                    (min(65536, rows - start), DIM), np.float32)
        maps.append(mm)
    group = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}

    def train(run: list, first_step: int) -> None:
        w_mm, m_mm, v_mm = maps
        for step, ids in enumerate(run, first_step):
            order = np.sort(ids)  # the store sees unique IDs too; sorted reads are memmap's best case
            w = torch.from_numpy(w_mm[order]).requires_grad_()
            _loss(w, target).backward()
            rows_t = w.detach().clone()
            grad = torch.sparse_coo_tensor(torch.arange(len(order)).unsqueeze(0), w.grad, rows_t.shape,
                                           check_invariants=False).coalesce()
            m, v = torch.from_numpy(m_mm[order]), torch.from_numpy(v_mm[order])
            _sparse_adam(rows_t, grad, m, v, step, group)
            w_mm[order], m_mm[order], v_mm[order] = rows_t.numpy(), m.numpy(), v.numpy()
        for mm in maps:
            mm.flush()

    try:
        step = 1
        for earlier in warm:  # untimed runs, each flushed (as the store's are committed)
            train(earlier, step)
            step += len(earlier)
        wall, c = time.perf_counter(), time.thread_time()
        train(batches, step)
        cpu, wall = time.thread_time() - c, time.perf_counter() - wall
    finally:
        maps.clear()
        for name in names:
            os.unlink(name)
    return {"cpu_s": cpu, "wall_s": wall}


def ram_round(rows: int, batches: list, target: torch.Tensor) -> dict:
    """``nn.Embedding(sparse=True)`` + ``torch.optim.SparseAdam`` in RAM on the same batches (nothing persisted)."""
    emb = torch.nn.Embedding(rows, DIM, sparse=True)
    opt = torch.optim.SparseAdam(emb.parameters(), lr=1e-3)
    wall, c = time.perf_counter(), time.thread_time()
    for ids in batches:
        out = emb(torch.from_numpy(ids))
        opt.zero_grad()
        _loss(out, target).backward()
        opt.step()
    cpu, wall = time.thread_time() - c, time.perf_counter() - wall
    del emb, opt
    return {"cpu_s": cpu, "wall_s": wall}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=500_000)
    p.add_argument("--cache-mb", type=float, default=64.0)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=BATCH)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"a comma-separated subset of {','.join(KNOWN_VARIANTS)} (default: {','.join(VARIANTS)})")
    p.add_argument("--warm-commits", type=int, default=0,
                   help="untimed runs, each committed (flushed), before the timed one: the store's steady state")
    p.add_argument("--quick", action="store_true", help="60k rows, cache 8 MiB, 12 steps, 1 round")
    p.add_argument("--workdir", default=None, help="parent directory of the scratch data (default: the system's)")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.cache_mb, args.steps, args.rounds = 60_000, 8.0, 12, 1
    torch.set_num_threads(1)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(KNOWN_VARIANTS))
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(KNOWN_VARIANTS)}")
    target = torch.randn(args.batch, DIM, generator=torch.Generator().manual_seed(0))
    per_round: list[dict] = []
    with scratch_dir("big_training_", parent=args.workdir) as work:
        for r in range(args.rounds):
            batches = _batches(args.rows, args.steps, args.batch, seed=r)
            warm = tuple(_batches(args.rows, args.steps, args.batch, seed=10_000 + 100 * r + w)
                         for w in range(args.warm_commits))
            rnd = {"memmap": memmap_round(work, args.rows, batches, target, warm),
                   "ram": ram_round(args.rows, batches, target)}
            for v in variants:
                rnd[v] = store_round(work, args.rows, args.cache_mb, batches, target, v != "no_buffer", v == "prefetch",
                                     warm)
            per_round.append(rnd)
            line = f"round {r}: memmap {rnd['memmap']['cpu_s']:.2f} CPU-s"
            for v in variants:
                line += (f", {v} {rnd[v]['cpu_s']:.2f} CPU-s ({rnd['memmap']['cpu_s'] / rnd[v]['cpu_s']:.3f}x memmap, "
                         f"disk {rnd[v]['disk_x_table']:.2f}x table, RssAnon {rnd[v]['anon_mb']:.0f} MB)")
            print(line, flush=True)
    rows_trained = args.steps * args.batch
    result: dict = {"rows": args.rows, "dim": DIM, "batch": args.batch, "steps": args.steps, "cache_mb": args.cache_mb,
                    "rounds": args.rounds, "warm_commits": args.warm_commits,
                    "measure": "thread_time (loop + ONE commit / flush); *_wall: perf_counter",
                    "memmap_rows_per_cpu_s": round(statistics.median(rows_trained / r["memmap"]["cpu_s"]
                                                                     for r in per_round))}
    for v in variants:
        ratios = [r["memmap"]["cpu_s"] / r[v]["cpu_s"] for r in per_round]
        walls = [r["memmap"]["wall_s"] / r[v]["wall_s"] for r in per_round]
        ram_walls = [r["ram"]["wall_s"] / r[v]["wall_s"] for r in per_round]
        result[v] = {"rows_per_cpu_s": round(statistics.median(rows_trained / r[v]["cpu_s"] for r in per_round)),
                     "x_memmap_wall_median": round(statistics.median(walls), 4),
                     "x_memmap_wall_spread": [round(min(walls), 4), round(max(walls), 4)],
                     "x_ram_wall_median": round(statistics.median(ram_walls), 4),
                     "x_ram_wall_spread": [round(min(ram_walls), 4), round(max(ram_walls), 4)],
                     "x_memmap_median": round(statistics.median(ratios), 4),
                     "x_memmap_spread": [round(min(ratios), 4), round(max(ratios), 4)],
                     "disk_x_table_max": round(max(r[v]["disk_x_table"] for r in per_round), 2),
                     "anon_mb_max": round(max(r[v]["anon_mb"] for r in per_round)),
                     "commit_cpu_s_median": round(statistics.median(r[v]["commit_cpu_s"] for r in per_round), 3),
                     "process_cpu_s_median": round(statistics.median(r[v]["process_cpu_s"] for r in per_round), 3),
                     "merges": per_round[-1][v]["merges"], "merged_chunks": per_round[-1][v]["merged_chunks"]}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    result["commit"] = commit.strip()
    print(json.dumps(result, indent=1))
    if not args.no_record and not args.quick:
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, "big_training.jsonl"), "a") as fh:
            fh.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
