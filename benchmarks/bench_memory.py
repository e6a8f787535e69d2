"""Peak anonymous memory of a writer: one pass over a table larger than its cache, then ONE commit.

``python -m benchmarks.bench_memory --rows 10000000 --cache-mb 512`` creates a rows x 128
float32 store, opens it with ``cache_mb``, gets/puts every row in row order (batches of
1024, ``+ 0.01``) and commits once at the end, sampling its own RssAnon every 5 ms. It prints
the RssAnon at open (the process: interpreter, numpy, LMDB), the peak during the pass and
the commit, and the cache bytes: the store's promise is peak <= open + cache, whatever the
table size (``tests/processes/test_memory_bound.py`` asserts it at a size CI can afford).
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np

import lmdb_embeddings as le
from lmdb_embeddings.processes.memory import rss_anon_bytes

from .scratch import scratch_dir


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--cache-mb", type=float, default=128)
    parser.add_argument("--chunk-rows", type=int, default=1024)
    args = parser.parse_args(argv)
    with scratch_dir("bench-memory-") as work:  # removed on any exit, SIGTERM and Ctrl-C included
        path = os.path.join(work, "s")
        le.EmbeddingStore.create(path, args.rows, 128, chunk_rows=args.chunk_rows).close()
        store = le.EmbeddingStore.open(path, cache_mb=args.cache_mb)
        at_open = rss_anon_bytes()
        peak, done = [at_open], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_anon_bytes())
                time.sleep(0.005)

        threading.Thread(target=sample, daemon=True).start()
        start = time.perf_counter()
        for lo in range(0, args.rows, 1024):
            ids = np.arange(lo, min(args.rows, lo + 1024))
            store.put(ids, store.get(ids) + np.float32(0.01))
        pass_s = time.perf_counter() - start
        start = time.perf_counter()
        store.commit()
        commit_s = time.perf_counter() - start
        done.set()
        peak[0] = max(peak[0], rss_anon_bytes())
        cache = store.stats()["cache_bytes"]
        store.close()
    mib = 1 << 20
    result = {"rows": args.rows, "table_mb": args.rows * 128 * 4 / mib, "cache_mb": args.cache_mb,
              "anon_at_open_mb": at_open / mib, "peak_anon_mb": peak[0] / mib, "cache_bytes_mb": cache / mib,
              "pass_s": pass_s, "commit_s": commit_s}
    print(", ".join(f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v:,}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
