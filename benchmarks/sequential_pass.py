"""A sequential pass over a table larger than the cache, then ONE commit, against ``np.memmap`` (issue 19).

``python -m benchmarks.sequential_pass [--rows 2000000] [--cache-mb 128] [--rounds 3]``

Each round creates a fresh store of ``rows`` x 128 float32 (default options: the store chooses
``chunk_rows``), opens it with ``cache_mb``, reads and writes back every row in row order (batches of
1,024, ``+ 0.01``) and commits once; the baseline does the same pass over an ``np.memmap`` of the same
rows and flushes it. The two run back to back in each round, alternating which goes first. Reported:
wall seconds of the pass + commit (flush), their ratio (memmap's time / ours: >= 1 means ours is
faster), and the thread CPU time beside them. Results: ``benchmarks/results/sequential_pass.jsonl``.

``--warm-commits N`` (default 0) first runs N untimed passes on each side (the store commits after
each, memmap flushes): the timed pass then meets a store in its steady state, where LMDB reuses the
pages that commits before the last one freed (a fresh store's first commits take new pages of the
file, which the kernel must zero-fill when they are first written through the map).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time

import numpy as np

import lmdb_embeddings as le

from .run import RESULTS, ROOT
from .scratch import scratch_dir

DIM, BATCH = 128, 1024


def _timed(fn, warm: int = 0) -> tuple[float, float]:
    """Wall and thread CPU seconds of ``fn()``, after ``warm`` untimed calls of it."""
    for _ in range(warm):
        fn()
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - wall, time.thread_time() - cpu


def ours(work: str, rows: int, cache_mb: float, warm: int = 0) -> tuple[float, float]:
    path = os.path.join(work, "store")
    le.EmbeddingStore.create(path, rows, DIM, seed=0, overwrite=True).close()
    store = le.EmbeddingStore.open(path, cache_mb=cache_mb)

    def run() -> None:
        for lo in range(0, rows, BATCH):
            ids = np.arange(lo, min(rows, lo + BATCH))
            store.put(ids, store.get(ids) + np.float32(0.01))
        store.commit()

    try:
        return _timed(run, warm)
    finally:
        store.close()


def memmap(work: str, rows: int, warm: int = 0) -> tuple[float, float]:
    name = os.path.join(work, "rows.f32")
    mm = np.memmap(name, np.float32, "w+", shape=(rows, DIM))
    for lo in range(0, rows, 65536):
        mm[lo : lo + 65536] = np.random.default_rng(lo).standard_normal((min(65536, rows - lo), DIM), np.float32)
    mm.flush()

    def run(mm: np.memmap = mm) -> None:
        for lo in range(0, rows, BATCH):
            mm[lo : lo + BATCH] = mm[lo : lo + BATCH] + np.float32(0.01)
        mm.flush()

    try:
        return _timed(run, warm)
    finally:
        del mm
        os.unlink(name)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--cache-mb", type=float, default=128.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warm-commits", type=int, default=0, help="untimed passes (+ commit / flush) before the timed one")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results")
    args = p.parse_args(argv)
    rounds = []
    with scratch_dir("sequential_pass_") as work:
        for r in range(args.rounds):
            first_ours = r % 2 == 0
            got = {}
            for side in (("ours", "memmap") if first_ours else ("memmap", "ours")):
                got[side] = (ours(work, args.rows, args.cache_mb, args.warm_commits) if side == "ours"
                             else memmap(work, args.rows, args.warm_commits))
            rounds.append(got)
            print(f"round {r}: ours {got['ours'][0]:.2f} s, memmap {got['memmap'][0]:.2f} s, "
                  f"ratio {got['memmap'][0] / got['ours'][0]:.3f}", flush=True)
    ratios = [g["memmap"][0] / g["ours"][0] for g in rounds]
    result = {"rows": args.rows, "table_mb": round(args.rows * DIM * 4 / 2**20, 1), "cache_mb": args.cache_mb,
              "rounds": args.rounds, "warm_commits": args.warm_commits,
              "ratio_median": round(statistics.median(ratios), 4),
              "ratio_spread": [round(min(ratios), 4), round(max(ratios), 4)],
              "ours_s": [round(g["ours"][0], 3) for g in rounds],
              "memmap_s": [round(g["memmap"][0], 3) for g in rounds],
              "ours_cpu_s": [round(g["ours"][1], 3) for g in rounds],
              "memmap_cpu_s": [round(g["memmap"][1], 3) for g in rounds],
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=ROOT).stdout.strip()}
    print(json.dumps(result))
    if not args.no_record:
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, "sequential_pass.jsonl"), "a") as fh:
            fh.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
