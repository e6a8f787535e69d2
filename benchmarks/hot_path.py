"""CPU time per call of the store's hot path, piece by piece, next to numpy in RAM.

``python -m benchmarks.hot_path [--rows 100000] [--batch 256]`` prints microseconds of the
calling thread's CPU time (``time.thread_time``, the best of three runs of ``--calls``
calls): CPU time moves far less than wall time when other processes share the machine.
A resident table (its whole L1 in place), random batches; a read-only handle's
``get([i])`` next to a memmap row read.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import lmdb_embeddings as le
from lmdb_embeddings.inputs import as_ids, as_values, check_unique

from .scratch import scratch_dir


def best_us(fn, calls: int) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.thread_time()
        for i in range(calls):
            fn(i)
        best = min(best, (time.thread_time() - start) / calls * 1e6)
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)
    n, dim, b, calls = args.rows, args.dim, args.batch, args.calls
    with scratch_dir("bench-hot-") as work:  # removed on any exit, SIGTERM and Ctrl-C included
        store = le.EmbeddingStore.create(os.path.join(work, "s"), n, dim)
        store.get(np.arange(n))
        rng = np.random.default_rng(0)
        batches = [rng.choice(n, b, replace=False) for _ in range(calls)]
        values = [rng.random((b, dim), dtype=np.float32) for _ in range(8)]
        table = store._session.table
        ram = rng.random((n, dim), dtype=np.float32)
        dtype = np.dtype("float32")
        rows = {
            "get": lambda i: store.get(batches[i]),
            "put": lambda i: store.put(batches[i], values[i % 8]),
            "get + 0.01 + put": lambda i: store.put(batches[i], store.get(batches[i]) + 0.01),
            "  as_ids": lambda i: as_ids(batches[i]),
            "  check_unique": lambda i: check_unique(batches[i], "put"),
            "  as_values": lambda i: as_values(values[i % 8], b, dim, dtype, "put"),
            "  index.slots": lambda i: table.index.slots(batches[i]),
            "numpy get (fancy index)": lambda i: ram[batches[i]],
            "numpy get + 0.01 + put": lambda i: ram.__setitem__(batches[i], ram[batches[i]] + 0.01),
        }
        for name, fn in rows.items():
            print(f"{name:28s} {best_us(fn, calls):8.2f} us")
        store.close()
        np.save(os.path.join(work, "m.npy"), ram)
        mm = np.load(os.path.join(work, "m.npy"), mmap_mode="r")
        picks = rng.integers(0, n, calls).tolist()
        with le.EmbeddingStore.open(os.path.join(work, "s"), readonly=True) as reader:
            reader.get(np.arange(n))
            print(f"{'reader get([i])':28s} {best_us(lambda i: reader.get([picks[i]]), calls):8.2f} us")
            print(f"{'reader get(batch)':28s} {best_us(lambda i: reader.get(batches[i]), calls):8.2f} us")
        print(f"{'memmap mm[[i]]':28s} {best_us(lambda i: mm[[picks[i]]], calls):8.2f} us")


if __name__ == "__main__":
    main()
