"""Child processes of the torture scenarios (run as ``python torture_child.py ROLE ARGS``).

Each role reports on stdout, one event per line, flushed at once, so a parent that kills
the child with SIGKILL still reads every event written before the kill from the pipe:

* ``rounds``: the crash writer: puts the WHOLE table to the value ``r`` and commits, round
  after round; ``commit r`` before ``commit()``, ``ack r SECONDS`` after it returned.
* ``adds``: appends batches of new IDs (row value = its ID) and commits each batch.
* ``create``: builds a store (to be killed in the middle).
* ``reader``: read-only gets of random IDs until a stop file appears; a get whose rows are
  not all the same round is a torn read; prints a JSON summary.
* ``diskfull`` / ``iofault``: commit on a full disk / under an injected I/O error, then
  retry on the SAME handle (steps driven by the parent through stdin).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time

import numpy as np

import lmdb_embeddings as le


def say(*parts) -> None:
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


def table_round(store: le.EmbeddingStore) -> int:
    return int(store.get(store.ids[:1])[0, 0])


def role_rounds(args) -> None:
    store = le.EmbeddingStore.open(args.path)
    ids = store.ids
    r = table_round(store)
    say("open", r)
    data = os.path.join(args.path, "data.mdb")
    for _ in range(args.max_rounds or sys.maxsize):
        r += 1
        store.put(ids, np.full((len(ids), store.dim), r, store.dtype))
        say("commit", r)
        t0 = time.perf_counter()
        store.commit()
        say("ack", r, f"{time.perf_counter() - t0:.4f}", os.path.getsize(data))
        if args.pause:
            time.sleep(args.pause)
    store.close()
    say("done", r)


def role_adds(args) -> None:
    store = le.EmbeddingStore.open(args.path)
    n = len(store)
    say("open", n)
    while True:
        new = np.arange(n, n + args.batch, dtype=np.int64)
        store.add(new, np.repeat(new.astype(store.dtype)[:, None], store.dim, axis=1))
        n += args.batch
        say("commit", n)
        store.commit()
        say("ack", n)


def role_create(args) -> None:
    say("start")
    values = np.repeat(np.arange(args.rows, dtype=np.float32)[:, None], args.dim, axis=1)
    le.EmbeddingStore.create(args.path, args.rows, args.dim, init=values, chunk_rows=256).close()
    say("done")


def role_reader(args) -> None:
    store = le.EmbeddingStore.open(args.path, readonly=True, cache_mb=args.cache_mb)
    rng = np.random.default_rng(args.seed)
    n = len(store)
    gets = torn = errors = backwards = 0
    last = -1
    rounds_seen = set()
    while not os.path.exists(args.stop):
        ids = rng.integers(0, n, size=args.batch)
        try:
            rows = store.get(ids)
        except Exception as exc:  # a reader error is a failure of the scenario: count and show it
            errors += 1
            sys.stderr.write(f"reader error: {type(exc).__name__}: {exc}\n")
            continue
        gets += 1
        value = rows[0, 0]
        if not (rows == value).all():
            torn += 1
            continue
        r = int(value)
        rounds_seen.add(r)
        if r < last:
            backwards += 1
        last = max(last, r)
    store.close()
    say(json.dumps({"gets": gets, "torn": torn, "errors": errors, "backwards": backwards,
                    "rounds_seen": len(rounds_seen), "last": last}))


def _fill_disk(directory: str) -> int:
    """Write a ballast file until the filesystem is full; return its size."""
    path = os.path.join(directory, "ballast")
    block = b"\0" * (1 << 16)
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                written += os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return written
    finally:
        os.close(fd)


def _retry_protocol(store, r: int, provoke) -> None:
    """Commit round ``r`` under a fault, wait for the parent to lift it, retry on the same handle."""
    ids = store.ids
    store.put(ids, np.full((len(ids), store.dim), r, store.dtype))
    provoke()
    try:
        store.commit()
    except le.EmbeddingStoreError as exc:
        say("failed", type(exc).__name__, int(isinstance(exc, OSError)), json.dumps(str(exc)))
    else:
        say("committed-despite-fault")
        return
    assert sys.stdin.readline().strip() == "retry"
    store.commit()
    say("retried", r)
    store.close()
    say("closed")


def role_diskfull(args) -> None:
    store = le.EmbeddingStore.open(args.path)
    say("open", table_round(store))
    _retry_protocol(store, args.round, lambda: say("ballast", _fill_disk(args.fill_dir)))


def role_iofault(args) -> None:
    store = le.EmbeddingStore.open(args.path)
    say("open", table_round(store))

    def arm():
        with open(args.flag, "w") as fh:
            fh.write(args.mode)
        say("armed", args.mode)

    _retry_protocol(store, args.round, arm)


def role_table(args) -> None:
    """Print the distinct values and row count of the committed table (or the open error)."""
    try:
        with le.EmbeddingStore.open(args.path, readonly=True, cache_mb=64) as store:
            rows = store.get(store.ids)
    except Exception as exc:
        say(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return
    say(json.dumps({"rows": len(rows), "values": np.unique(rows)[:10].tolist()}))


def role_tryopen(args) -> None:
    """Open the store for writing and report whether the writer lock was granted."""
    try:
        store = le.EmbeddingStore.open(args.path)
    except le.WriterLockedError as exc:
        say("locked", json.dumps(str(exc)))
        return
    say("opened")
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="role", required=True)
    p = sub.add_parser("rounds")
    p.add_argument("path")
    p.add_argument("--max-rounds", type=int, default=0)
    p.add_argument("--pause", type=float, default=0.0)
    p.set_defaults(func=role_rounds)
    p = sub.add_parser("adds")
    p.add_argument("path")
    p.add_argument("--batch", type=int, default=1000)
    p.set_defaults(func=role_adds)
    p = sub.add_parser("create")
    p.add_argument("path")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=32)
    p.set_defaults(func=role_create)
    p = sub.add_parser("reader")
    p.add_argument("path")
    p.add_argument("stop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--cache-mb", type=float, default=8.0)
    p.set_defaults(func=role_reader)
    p = sub.add_parser("diskfull")
    p.add_argument("path")
    p.add_argument("fill_dir")
    p.add_argument("--round", type=int, default=2)
    p.set_defaults(func=role_diskfull)
    p = sub.add_parser("iofault")
    p.add_argument("path")
    p.add_argument("flag")
    p.add_argument("mode")
    p.add_argument("--round", type=int, default=2)
    p.set_defaults(func=role_iofault)
    p = sub.add_parser("table")
    p.add_argument("path")
    p.set_defaults(func=role_table)
    p = sub.add_parser("tryopen")
    p.add_argument("path")
    p.set_defaults(func=role_tryopen)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
