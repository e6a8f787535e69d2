"""Child processes of the guarantee races (run as ``python guarantees_child.py ROLE ARGS``).

Each role prints its result as one JSON line on stdout (events as plain lines, flushed).

* ``creators``: per trial, PROCS forked processes pass a barrier and ``create`` the same
  fresh path at once, each with its own values, then put a marker row and commit.
* ``forkbusy``: a thread keeps calling get/put/commit on a writable handle while the main
  thread forks; each child reads through the inherited handle; a child that does not
  finish within the time limit is counted as hung (and killed).
* ``dataloader``: the same with a torch DataLoader (fork workers) over a map-style dataset.
* ``forkspill``: a thread's put spills from a small cache (its write transaction stays open),
  the thread ends, then the main thread forks readers.
* ``busyreader``: a read-only handle reading the whole table in a loop (to be killed -9).
* ``openloop``: open a writer and close it, again and again, counting refusals.
* ``probeloop``: ``python -m lmdb_embeddings info PATH`` in-process, in a loop (the lock probe).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import runpy
import sys
import threading
import time
import warnings

import numpy as np
import numpy.random  # noqa: F401  numpy imports it lazily: never let a thread import it while we fork

import lmdb_embeddings as le


def say(*parts) -> None:
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------- creators
def _creator(path: str, rank: int, rows: int, dim: int, barrier, results) -> None:
    """One racing creator: its own values (rank + 1), then a marker row 100 + rank committed."""
    values = np.full((rows, dim), rank + 1, np.float32)
    barrier.wait(timeout=60)
    try:
        store = le.EmbeddingStore.create(path, rows, dim, init=values, chunk_rows=64)
    except le.EmbeddingStoreError as exc:
        kind = "exists" if isinstance(exc, FileExistsError) else (
            "locked" if isinstance(exc, le.WriterLockedError) else "other-refusal")
        results.put({"rank": rank, "outcome": kind, "error": f"{type(exc).__name__}: {exc}"})
        return
    except BaseException as exc:  # a raw error escaping create is a failure of the race
        results.put({"rank": rank, "outcome": "raw", "error": f"{type(exc).__name__}: {exc}"})
        return
    seen = np.unique(store.get(store.ids)).tolist()
    try:
        store.put(store.ids[:1], np.full((1, dim), 100 + rank, np.float32))
        store.commit()
        store.close()
    except BaseException as exc:
        results.put({"rank": rank, "outcome": "commit-failed", "seen": seen, "error": f"{type(exc).__name__}: {exc}"})
        return
    results.put({"rank": rank, "outcome": "created", "seen": seen})


def role_creators(args) -> None:
    ctx = mp.get_context("fork")
    trials = []
    for trial in range(args.trials):
        path = f"{args.prefix}{trial}"
        barrier, results = ctx.Barrier(args.procs), ctx.Queue()
        procs = [ctx.Process(target=_creator, args=(path, r, args.rows, args.dim, barrier, results))
                 for r in range(args.procs)]
        for p in procs:
            p.start()
        outcomes = []
        for _ in procs:
            try:
                outcomes.append(results.get(timeout=60))
            except Exception:
                outcomes.append({"rank": None, "outcome": "hung"})
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
        final = None
        try:
            with le.EmbeddingStore.open(path, readonly=True) as store:
                rows = store.get(store.ids)
                final = {"rows": len(store), "marker": float(rows[0, 0]), "rest": np.unique(rows[1:]).tolist()}
        except Exception as exc:
            final = {"error": f"{type(exc).__name__}: {exc}"}
        trials.append({"trial": trial, "outcomes": sorted(outcomes, key=lambda o: str(o["rank"])), "final": final})
    say(json.dumps({"trials": trials}))


# ---------------------------------------------------------------------------- forkbusy
def _busy(store: le.EmbeddingStore, stop: threading.Event, started: threading.Event, errors: list) -> None:
    rng = np.random.default_rng(0)
    n, dim, k = len(store), store.dim, 0
    try:
        while not stop.is_set():
            if k == 3:
                started.set()
            ids = np.unique(rng.integers(0, n, 256))
            store.get(ids)
            store.put(ids, np.full((len(ids), dim), k % 7, store.dtype))
            k += 1
            if k % 20 == 0:
                store.commit()
    except BaseException as exc:  # the parent's own use must keep working
        errors.append(f"{type(exc).__name__}: {exc}")


def _start_busy(store: le.EmbeddingStore):
    """Start the busy thread and wait until it is in its steady loop (every import done)."""
    stop, started, errors = threading.Event(), threading.Event(), []
    thread = threading.Thread(target=_busy, args=(store, stop, started, errors), daemon=True)
    thread.start()
    if not started.wait(60):
        raise RuntimeError(f"the busy thread did not start: {errors}")
    return thread, stop, errors


def role_forkbusy(args) -> None:
    warnings.simplefilter("ignore", DeprecationWarning)  # "fork() with threads": exactly the scenario
    store = le.EmbeddingStore.open(args.path)
    thread, stop, errors = _start_busy(store)
    forks = hung = failed = 0
    try:
        for _ in range(args.forks):
            time.sleep(0.005)
            outcome = _fork_and_read(store, args.child_timeout)
            forks += 1
            hung += outcome == "hung"
            failed += outcome != "ok"
            if hung and args.stop_at_first:
                break
    finally:
        stop.set()
        thread.join(timeout=30)
    store.close()
    say(json.dumps({"forks": forks, "hung": hung, "failed": failed, "parent_errors": errors}))


def _fork_and_read(store: le.EmbeddingStore, timeout: float) -> str:
    """Fork a child that reads through the inherited handle: 'ok', 'refused' (a one-line
    EmbeddingStoreError), 'failed' or 'hung' (then killed)."""
    pid = os.fork()
    if pid == 0:
        try:
            rows = store.get(np.arange(8))
            os._exit(0 if rows.shape == (8, store.dim) else 3)
        except le.EmbeddingStoreError as exc:  # a clear refusal (one line)
            os.write(2, f"child refused: {type(exc).__name__}: {exc}\n".encode())
            os._exit(5 if "\n" not in str(exc).strip() else 4)
        except BaseException as exc:
            os.write(2, f"child error: {type(exc).__name__}: {exc}\n".encode())
            os._exit(4)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {0: "ok", 5: "refused"}.get(os.waitstatus_to_exitcode(status), "failed")
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return "hung"
        time.sleep(0.005)


def role_forkspill(args) -> None:
    """A worker thread's put spills changes from a small cache (LMDB write transaction left open
    by that thread); the thread ends; then the main thread forks readers."""
    warnings.simplefilter("ignore", DeprecationWarning)
    store = le.EmbeddingStore.open(args.path, cache_mb=1)
    ids = store.ids

    def train():
        store.put(ids, np.full((len(ids), store.dim), 2.0, store.dtype))

    thread = threading.Thread(target=train)
    thread.start()
    thread.join()
    spilled = store.stats()["spilled_chunks"]
    outcomes = [_fork_and_read(store, args.child_timeout) for _ in range(args.forks)]
    store.commit()
    committed = bool((store.get(ids[:: max(1, len(ids) // 50)]) == 2.0).all())
    store.close()
    say(json.dumps({"spilled": spilled, "outcomes": outcomes, "committed": committed}))


class _RowsDataset:
    """A map-style dataset over a store handle (what a user writes for a DataLoader)."""

    def __init__(self, store: le.EmbeddingStore):
        self.store, self.ids = store, store.ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.store.get(self.ids[i : i + 1])[0]  # the default collate makes the batch a tensor


def role_dataloader(args) -> None:
    import torch  # only this role needs torch (the others start faster without it)
    from torch.utils.data import DataLoader

    warnings.simplefilter("ignore", DeprecationWarning)
    torch.set_num_threads(1)
    store = le.EmbeddingStore.open(args.path)
    thread, stop, errors = _start_busy(store)
    loader = DataLoader(_RowsDataset(store), batch_size=64, num_workers=2, multiprocessing_context="fork",
                        timeout=args.child_timeout)
    epochs = hung = 0
    try:
        for _ in range(args.epochs):
            epochs += 1
            try:
                for _batch in loader:
                    pass
            except RuntimeError as exc:  # "DataLoader timed out after N seconds": a worker hangs
                hung += 1
                say("hung", json.dumps(str(exc)))
                if args.stop_at_first:
                    break
    finally:
        stop.set()
        thread.join(timeout=30)
    store.close()
    say(json.dumps({"epochs": epochs, "hung": hung, "parent_errors": errors}))


# ------------------------------------------------------------------------- busyreader
def role_busyreader(args) -> None:
    store = le.EmbeddingStore.open(args.path, readonly=True, cache_mb=1)
    ids = store.ids
    store.get(ids)
    say("ready")
    while True:
        store.get(ids)


# ------------------------------------------------------------------ openloop/probeloop
def role_openloop(args) -> None:
    """Open and close a writer for ``seconds``; a refusal ends the loop (unless --keep-going)."""
    opens = refused = 0
    message = None
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        try:
            le.EmbeddingStore.open(args.path).close()
            opens += 1
        except le.WriterLockedError as exc:
            refused += 1
            message = str(exc)
            if not args.keep_going:
                break
    say(json.dumps({"opens": opens, "refused": refused, "message": message}))


def role_probeloop(args) -> None:
    """``python -m lmdb_embeddings info PATH`` run in this process until the stop file appears."""
    probes = 0
    # info probes the lock to report the writer; restore --force of a non-dump probes it (is a writer
    # holding the target?) and then stops at the input's bad header, changing nothing
    command = ["info", "--json", args.path] if args.garbage is None else ["restore", "--force", args.garbage,
                                                                           args.path]
    say("ready")
    while not os.path.exists(args.stop):
        sys.argv = ["lmdb_embeddings", *command]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            with contextlib.suppress(SystemExit):
                runpy.run_module("lmdb_embeddings", run_name="__main__", alter_sys=True)
        probes += 1
    say(json.dumps({"probes": probes}))


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="role", required=True)
    p = sub.add_parser("creators")
    p.add_argument("prefix")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--procs", type=int, default=4)
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--dim", type=int, default=8)
    p.set_defaults(func=role_creators)
    for name, func in (("forkbusy", role_forkbusy), ("dataloader", role_dataloader), ("forkspill", role_forkspill)):
        p = sub.add_parser(name)
        p.add_argument("path")
        p.add_argument("--forks", type=int, default=16)
        p.add_argument("--epochs", type=int, default=8)
        p.add_argument("--child-timeout", type=float, default=5.0)
        p.add_argument("--stop-at-first", action="store_true")
        p.set_defaults(func=func)
    p = sub.add_parser("busyreader")
    p.add_argument("path")
    p.set_defaults(func=role_busyreader)
    p = sub.add_parser("openloop")
    p.add_argument("path")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--keep-going", action="store_true")
    p.set_defaults(func=role_openloop)
    p = sub.add_parser("probeloop")
    p.add_argument("path")
    p.add_argument("stop")
    p.add_argument("--garbage", default=None, help="probe with restore --force GARBAGE PATH instead of info")
    p.set_defaults(func=role_probeloop)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
