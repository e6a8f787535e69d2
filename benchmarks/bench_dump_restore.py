"""dump / restore throughput and peak memory of the CLI, against np.save / np.load.

Builds a ROWS x DIM float32 store (default 2M x 128 = 1 GB), then in the same run:

* ``np.save`` / ``np.load`` of the same array (in this process), MB/s;
* ``lmdb-embeddings dump`` (native and ``--format npy``) and ``restore`` each in its own
  subprocess, MB/s of wall time (interpreter start included) and the child's peak RSS
  (``VmHWM``: anonymous AND file-backed pages, so LMDB's memory map counts too),
  reported beyond the peak RSS of a child that only imports the same modules.

Targets (issue 4): CLI MB/s >= 0.5x numpy's; peak RSS < 300 MB beyond the baseline.
The ratios use plain np.save (no fsync) and np.load of a file the page cache holds (a
memory copy); ``context`` adds np.save + fsync and a cold-cache np.load, because dump
and restore fsync their output (restore swaps a store in only once it is durable).
Usage: python benchmarks/bench_dump_restore.py [--rows N] [--dim D] [--dir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import lmdb_embeddings as le  # noqa: E402
from benchmarks.scratch import scratch_dir  # noqa: E402

_WRAPPER = r"""
import json, sys
report, argv = sys.argv[1], sys.argv[2:]
if argv == ["--baseline"]:
    import lmdb_embeddings.cli, lmdb_embeddings.backup, lmdb_embeddings.store_check  # noqa: F401
    import numpy, lmdb, tqdm, msgpack, xxhash  # noqa: F401
    rc = 0
else:
    from lmdb_embeddings.cli import main
    rc = main(argv)
with open("/proc/self/status") as status:  # VmHWM: this process's peak RSS (ru_maxrss survives exec)
    hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
with open(report, "w") as f:
    json.dump({"rc": rc, "maxrss_kib": hwm}, f)
sys.exit(rc)
"""


def run_cli_measured(args: list[str], workdir: str) -> dict:
    """Run the CLI in a fresh interpreter; wall seconds and peak RSS (MiB)."""
    report = os.path.join(workdir, "rss.json")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, report, "--quiet", *args] if args != ["--baseline"]
                          else [sys.executable, "-c", _WRAPPER, report, *args],
                          capture_output=True, text=True, env=env, timeout=1800)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{args} failed ({proc.returncode}): {proc.stderr}")
    with open(report) as f:
        rss = json.load(f)["maxrss_kib"] / 1024
    return {"seconds": wall, "peak_rss_mib": rss}


def drop_from_page_cache(path: str) -> None:
    """Best effort: evict a file's pages so a read starts cold (needs no privileges)."""
    paths = [path] if os.path.isfile(path) else [os.path.join(path, f) for f in os.listdir(path)]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    with scratch_dir("bench_dump_restore-", keep=args.dir) as work:  # removed on any exit, SIGTERM too
        results = run(work, args.rows, args.dim)
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def run(work: str, rows: int, dim: int) -> dict:
    store_path, dump_path = os.path.join(work, "store"), os.path.join(work, "table.lemb")
    npy_dir, restored = os.path.join(work, "npy"), os.path.join(work, "restored")
    npy_file = os.path.join(work, "numpy.npy")
    t = time.perf_counter()
    le.EmbeddingStore.create(store_path, rows, dim, init="normal", seed=0).close()
    build = time.perf_counter() - t
    with le.EmbeddingStore.open(store_path, readonly=True, cache_mb=64) as s:
        array = s.get(np.arange(rows))
    mb = array.nbytes / 1e6

    t = time.perf_counter()
    np.save(npy_file, array)
    np_save = time.perf_counter() - t
    del array
    t = time.perf_counter()
    drop_from_page_cache(npy_file)  # (its fsync) np.save + fsync: what a durable save costs
    np_save_durable = np_save + time.perf_counter() - t
    t = time.perf_counter()
    loaded = np.load(npy_file)  # cold: read from the disk
    np_load_cold = time.perf_counter() - t
    del loaded
    t = time.perf_counter()
    loaded = np.load(npy_file)  # hot: the page cache holds the file now (a memory copy)
    np_load = time.perf_counter() - t
    del loaded

    baseline = run_cli_measured(["--baseline"], work)
    dump = run_cli_measured(["dump", store_path, dump_path], work)
    dump_npy = run_cli_measured(["dump", store_path, npy_dir, "--format", "npy"], work)
    restore = run_cli_measured(["restore", dump_path, restored], work)
    shutil.rmtree(restored)
    restore_npy = run_cli_measured(["restore", npy_dir, restored], work)

    def summary(name: str, m: dict, numpy_seconds: float) -> dict:
        mbs = mb / m["seconds"]
        numpy_mbs = mb / numpy_seconds
        return {"op": name, "seconds": round(m["seconds"], 3), "MB_per_s": round(mbs, 1),
                "numpy_MB_per_s": round(numpy_mbs, 1), "ratio_vs_numpy": round(mbs / numpy_mbs, 3),
                "peak_rss_mib": round(m["peak_rss_mib"], 1),
                "peak_rss_beyond_baseline_mib": round(m["peak_rss_mib"] - baseline["peak_rss_mib"], 1)}

    return {
        "table": f"{rows} x {dim} float32 ({mb:.0f} MB)", "store_build_seconds": round(build, 2),
        "np_save": {"seconds": round(np_save, 3), "MB_per_s": round(mb / np_save, 1)},
        "np_load": {"seconds": round(np_load, 3), "MB_per_s": round(mb / np_load, 1)},
        "context": {"np_save_plus_fsync_MB_per_s": round(mb / np_save_durable, 1),
                    "np_load_cold_cache_MB_per_s": round(mb / np_load_cold, 1)},
        "interpreter_baseline_rss_mib": round(baseline["peak_rss_mib"], 1),
        "results": [summary("dump (native)", dump, np_save), summary("dump --format npy", dump_npy, np_save),
                    summary("restore (native)", restore, np_load), summary("restore (npy)", restore_npy, np_load)],
        "dump_file_bytes": os.path.getsize(dump_path),
    }


if __name__ == "__main__":
    main()
