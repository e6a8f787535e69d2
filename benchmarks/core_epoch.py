"""Core epoch benchmark: get -> +0.01 -> put over shuffled batches, commit per epoch.

Reports rows/s of the store and of a plain in-memory numpy table doing the same work in
the same run, and their ratio (timings vary with the machine: compare ratios).

    python benchmarks/core_epoch.py [--rows 100000 --dim 128 --batch 256 --epochs 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lmdb_embeddings as le  # noqa: E402
from benchmarks.scratch import scratch_dir  # noqa: E402


def run_epochs(get, put, commit, n: int, batch: int, epochs: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        order = rng.permutation(n)
        for lo in range(0, n, batch):
            ids = order[lo : lo + batch]
            put(ids, get(ids) + np.float32(0.01))
        commit()
    return n * epochs / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--cache-mb", type=float, default=512.0)
    args = parser.parse_args()

    table = np.random.default_rng(0).standard_normal((args.rows, args.dim)).astype(np.float32) * 0.01

    def np_put(ids, values):
        table[ids] = values

    numpy_rate = run_epochs(lambda ids: table[ids], np_put, lambda: None, args.rows, args.batch, args.epochs)

    with scratch_dir("bench-core-epoch-") as tmp:  # removed on any exit, SIGTERM and Ctrl-C included
        path = os.path.join(tmp, "store")
        with le.EmbeddingStore.create(path, args.rows, args.dim, cache_mb=args.cache_mb) as store:
            store_rate = run_epochs(store.get, store.put, store.commit, args.rows, args.batch, args.epochs)
            stats = store.stats()
    print(f"rows={args.rows} dim={args.dim} batch={args.batch} epochs={args.epochs} cache_mb={args.cache_mb}")
    print(f"numpy table: {numpy_rate:,.0f} rows/s")
    print(f"store:       {store_rate:,.0f} rows/s  (commits={stats['commits']}, hit_rate={stats['hit_rate']:.3f})")
    print(f"store/numpy: {store_rate / numpy_rate:.3f}")


if __name__ == "__main__":
    main()
