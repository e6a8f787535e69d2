"""Experiment behind a recommendation in results/PERF_LOG.md (not part of the suites).

Measures what one large LMDB write transaction costs in anonymous memory and commit
time with and without ``writemap``: without it LMDB mallocs a private copy of every
dirty page until the commit (so an out-of-core pass holds the whole rewritten table in
RssAnon), with it the dirty pages are the file's own shared pages.

``python -m benchmarks.writemap_probe [--mb 1024]`` prints one line per mode.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import lmdb
import numpy as np

from .procstat import status_kib
from .scratch import scratch_dir

VALUE_BYTES = 1024 * 128 * 4  # one default chunk (1024 rows x 128 float32)


def probe(writemap: bool, total_mb: int) -> str:
    with scratch_dir("writemap-probe-") as path:  # removed on any exit, SIGTERM and Ctrl-C included
        env = lmdb.open(path, map_size=(4 * total_mb << 20) + (256 << 20), sync=True, writemap=writemap,
                        meminit=False)
        value = np.random.default_rng(0).random(VALUE_BYTES // 4, dtype=np.float32).tobytes()
        before = status_kib("self", "RssAnon")
        start = time.perf_counter()
        txn = env.begin(write=True)
        for i in range(total_mb * (1 << 20) // VALUE_BYTES):
            txn.put(i.to_bytes(8, "big"), value)
        dirty = status_kib("self", "RssAnon")
        put_s = time.perf_counter() - start
        start = time.perf_counter()
        txn.commit()
        commit_s = time.perf_counter() - start
        env.close()
        return (f"writemap={writemap}: {total_mb} MB in one write txn: RssAnon {before // 1024} MB before, "
                f"{dirty // 1024} MB with the txn open; put {put_s:.2f} s, commit (write + fsync) {commit_s:.2f} s")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--mode", choices=("both", "on", "off"), default="both")
    args = parser.parse_args(argv)
    if args.mode == "both":  # each mode in a fresh process so RssAnon starts clean
        for mode in ("off", "on"):
            subprocess.run([sys.executable, "-m", "benchmarks.writemap_probe", "--mb", str(args.mb), "--mode", mode],
                           check=True, timeout=600)
        return
    print(probe(args.mode == "on", args.mb), flush=True)


if __name__ == "__main__":
    main()
