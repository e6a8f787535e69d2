"""Child processes of the torture scenarios (run as ``python torture_child.py ROLE ARGS``).

Each role reports on stdout, one event per line, flushed at once, so a parent that kills
the child with SIGKILL still reads every event written before the kill from the pipe:

* ``rounds``: the crash writer: puts the WHOLE table to the value ``r`` and commits, round
  after round; ``commit r`` before ``commit()``, ``ack r SECONDS`` after it returned. With
  ``--shuffled B`` the table is put in batches of ``B`` IDs in random order (through ``--cache-mb``
  smaller than the table: the write buffer fills and merges); ``--say-merges`` prints ``merge r``
  before each write-buffer merge and ``merged r`` after it.
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
from lmdb_embeddings.fsutil import allocated_bytes


def say(*parts) -> None:
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


def table_round(store: le.EmbeddingStore) -> int:
    return int(store.get(store.ids[:1])[0, 0])


def _say_merges(current_round: list) -> None:
    """Print ``merge r`` / ``merged r`` around every write-buffer merge of this process (``--say-merges``)."""
    from lmdb_embeddings.core.cache import ColumnCache

    merge = ColumnCache.merge_buffer

    def said(cache):
        if not len(cache.buffer):
            return
        say("merge", current_round[0])
        merge(cache)
        say("merged", current_round[0])

    ColumnCache.merge_buffer = said


def role_rounds(args) -> None:
    options = {"cache_mb": args.cache_mb} if args.cache_mb else {}
    store = le.EmbeddingStore.open(args.path, **options)
    ids = store.ids
    r = table_round(store)
    current = [r]
    if args.say_merges:
        _say_merges(current)
    say("open", r)
    data = os.path.join(args.path, "data.mdb")
    rng = np.random.default_rng(os.getpid())
    for _ in range(args.max_rounds or sys.maxsize):
        r += 1
        current[0] = r
        if args.shuffled:
            for batch in np.array_split(rng.permutation(ids), max(1, len(ids) // args.shuffled)):
                store.put(batch, np.full((len(batch), store.dim), r, store.dtype))
        else:
            store.put(ids, np.full((len(ids), store.dim), r, store.dtype))
        say("commit", r)
        t0 = time.perf_counter()
        store.commit()
        say("ack", r, f"{time.perf_counter() - t0:.4f}", allocated_bytes(data))
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
    # the view is taken once the fault is lifted: reading a table larger than the cache may
    # have to spill uncommitted chunks, which needs the disk the fault took away
    assert sys.stdin.readline().strip() == "view"
    say("handle-view", json.dumps(np.unique(store.get(ids)).tolist()))
    assert sys.stdin.readline().strip() == "retry"
    store.commit()
    if not (store.get(ids) == r).all():  # the handle was rolled back (spilled changes): put again
        say("reput", r)
        store.put(ids, np.full((len(ids), store.dim), r, store.dtype))
        store.commit()
    say("retried", r)
    store.close()
    say("closed")


def role_diskfull(args) -> None:
    # the chunk path (no write buffer): the scenario needs L1 to hold part of the changes, so that the commit
    # reserves more than the spills did (a buffering writer keeps only two chunks in L1)
    store = le.EmbeddingStore.open(args.path, cache_mb=args.cache_mb, write_buffer=False)
    say("open", table_round(store))
    _retry_protocol(store, args.round, lambda: say("ballast", _fill_disk(args.fill_dir)))


def role_iofault(args) -> None:
    store = le.EmbeddingStore.open(args.path, writemap=not args.no_writemap)
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


def role_flips(args) -> None:
    """For each byte offset: copy the store, flip that byte, open and read everything.

    Prints one JSON line per case: ``ok`` (every ID and row equals the undamaged store),
    ``error`` (an EmbeddingStoreError, with its message) or ``wrong`` (it opened and
    returned different IDs or numbers: the failure this scenario exists to catch).
    """
    import shutil
    import tempfile

    with le.EmbeddingStore.open(args.path, readonly=True) as store:
        want_ids = store.ids
        want_rows = store.get(want_ids)
    work = tempfile.mkdtemp(prefix="flips-")
    try:
        for offset in json.loads(args.offsets):
            case = os.path.join(work, "store")
            shutil.rmtree(case, ignore_errors=True)
            shutil.copytree(args.path, case, ignore=shutil.ignore_patterns("lock.mdb", "writer.lock"))
            with open(os.path.join(case, "data.mdb"), "r+b") as fh:
                fh.seek(offset)
                byte = fh.read(1)[0]
                fh.seek(offset)
                fh.write(bytes([byte ^ args.xor]))
            try:
                with le.EmbeddingStore.open(case, readonly=True) as store:
                    ids = store.ids
                    rows = store.get(ids)
            except le.EmbeddingStoreError as exc:
                say(json.dumps({"offset": offset, "outcome": "error", "message": f"{type(exc).__name__}: {exc}"}))
                continue
            same = np.array_equal(ids, want_ids) and np.array_equal(rows, want_rows)
            say(json.dumps({"offset": offset, "outcome": "ok" if same else "wrong"}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _mutate(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    kind = ("truncate", "flip", "insert", "flips")[int(rng.integers(4))]
    at = int(rng.integers(len(data)))
    if kind == "truncate":
        return f"truncate@{at}", data[:at]
    if kind == "insert":
        extra = rng.integers(0, 256, int(rng.integers(1, 17)), dtype=np.uint8).tobytes()
        return f"insert{len(extra)}@{at}", data[:at] + extra + data[at:]
    out = bytearray(data)
    spots = [at] if kind == "flip" else rng.integers(len(data), size=int(rng.integers(2, 9))).tolist()
    for spot in spots:
        out[spot] ^= int(rng.integers(1, 256))
    return f"{kind}@{spots[:3]}", bytes(out)


def role_restorefuzz(args) -> None:
    """Restore randomly damaged dumps (in this process, through the CLI's ``main``).

    Each case ends ``exact`` (restored, bit-identical to the source table), ``clean``
    (non-zero exit, one line on stderr, no traceback, nothing left at the target), or a
    failure: ``wrong`` (restored other numbers), ``unclean`` (traceback / exception /
    several lines), ``partial`` (something left at the target or beside it) or ``hang``.
    """
    import contextlib
    import io
    import shutil
    import signal

    from lmdb_embeddings import cli

    with le.EmbeddingStore.open(args.reference, readonly=True) as ref:
        want = (ref.ids, ref.get(ref.ids), ref.dtype, ref.chunk_rows)
    rng = np.random.default_rng(args.seed)
    native = open(args.native, "rb").read()
    npy_files = {name: open(os.path.join(args.npy, name), "rb").read() for name in sorted(os.listdir(args.npy))}
    counts: dict[str, int] = {}
    examples: list[dict] = []

    def on_alarm(signum, frame):
        raise TimeoutError("restore hung")

    signal.signal(signal.SIGALRM, on_alarm)
    os.makedirs(args.work, exist_ok=True)
    for case in range(args.cases):
        src = os.path.join(args.work, f"in{case}")
        if case % 5 == 4:  # the npy directory format: damage one of its files
            os.makedirs(src)
            victim = sorted(npy_files)[int(rng.integers(len(npy_files)))]
            for name, data in npy_files.items():
                if name == victim:
                    how, data = _mutate(data, rng)
                    how = f"{name}:{how}"
                with open(os.path.join(src, name), "wb") as fh:
                    fh.write(data)
        else:
            how, data = _mutate(native, rng)
            with open(src, "wb") as fh:
                fh.write(data)
        out = os.path.join(args.work, f"out{case}")
        err = io.StringIO()
        signal.alarm(args.case_timeout)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = cli.main(["--quiet", "restore", src, out])
            detail = err.getvalue()
        except TimeoutError:
            rc, detail = None, "hang"
        except BaseException as exc:  # an exception escaping the CLI is an unclean failure
            rc, detail = -1, f"{type(exc).__name__}: {exc}"
        finally:
            signal.alarm(0)
        leftovers = [n for n in os.listdir(args.work) if n.startswith(f".out{case}.")]
        if rc is None:
            outcome = "hang"
        elif rc == 0:
            try:
                with le.EmbeddingStore.open(out, readonly=True) as got:
                    have = (got.ids, got.get(got.ids), got.dtype, got.chunk_rows)
                same = all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
                           for a, b in zip(have, want, strict=True))
                outcome = "exact" if same else "wrong"
            except Exception as exc:
                outcome, detail = "wrong", f"restored store unreadable: {exc}"
        else:
            lines = [line for line in detail.splitlines() if line.strip()]
            clean = rc > 0 and len(lines) == 1 and "Traceback" not in detail
            outcome = "clean" if clean else "unclean"
            if os.path.exists(out) or leftovers:
                outcome = "partial"
        if outcome == "partial" or (rc == 0 and leftovers):
            outcome = "partial"
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome not in ("exact", "clean") and len(examples) < 10:
            examples.append({"case": case, "mutation": how, "outcome": outcome, "rc": rc, "detail": detail[-500:],
                             "leftovers": leftovers})
        shutil.rmtree(src, ignore_errors=True) if os.path.isdir(src) else os.remove(src)
        shutil.rmtree(out, ignore_errors=True)
    say(json.dumps({"counts": counts, "examples": examples}))


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="role", required=True)
    p = sub.add_parser("rounds")
    p.add_argument("path")
    p.add_argument("--max-rounds", type=int, default=0)
    p.add_argument("--pause", type=float, default=0.0)
    p.add_argument("--cache-mb", type=float, default=0.0)
    p.add_argument("--shuffled", type=int, default=0)
    p.add_argument("--say-merges", action="store_true")
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
    p.add_argument("--cache-mb", type=float, default=512.0)
    p.set_defaults(func=role_diskfull)
    p = sub.add_parser("iofault")
    p.add_argument("path")
    p.add_argument("flag")
    p.add_argument("mode")
    p.add_argument("--round", type=int, default=2)
    p.add_argument("--no-writemap", action="store_true", help="LMDB writes with pwrite + fdatasync instead")
    p.set_defaults(func=role_iofault)
    p = sub.add_parser("table")
    p.add_argument("path")
    p.set_defaults(func=role_table)
    p = sub.add_parser("tryopen")
    p.add_argument("path")
    p.set_defaults(func=role_tryopen)
    p = sub.add_parser("flips")
    p.add_argument("path")
    p.add_argument("offsets")
    p.add_argument("--xor", type=int, default=0x40)
    p.set_defaults(func=role_flips)
    p = sub.add_parser("restorefuzz")
    p.add_argument("reference")
    p.add_argument("native")
    p.add_argument("npy")
    p.add_argument("work")
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--case-timeout", type=int, default=60)
    p.set_defaults(func=role_restorefuzz)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
