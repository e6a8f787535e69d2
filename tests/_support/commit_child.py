"""Child processes of the commit tests (run as ``python commit_child.py ROLE ARGS``): one event per line.

* ``signalled``: a writer that takes signals while it commits, as a training script does: SIGINT
  is Python's ``KeyboardInterrupt``, SIGTERM a handler raising ``SystemExit``, SIGCHLD a handler
  raising ``RuntimeError`` (torch's DataLoader does that when a worker dies). Round r puts the
  whole table to r and commits it as commit r. After an interruption the handle must know
  where it stands: ``commit_count`` is r if LMDB committed, else the changes are still pending
  and ``commit()`` again makes them commit r. Lines: ``commit r``, ``interrupted r EXC count``,
  ``ack r count``, ``wrong ...`` (the handle and LMDB disagree), ``done count``.
* ``lowfd``: commits round after round (changes spilled from a small cache) with the process at
  its open-file limit; a commit that fails must say so (``CommitError``) and keep the changes:
  the limit is raised and the same commit retried. Lines: ``failed r MESSAGE``, ``ack r``,
  ``lost r N`` (rows not at r after the commit), ``raw r ERROR``, ``done``.
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)
# blocked before anything starts a thread (BLAS pools): only the main thread takes them, inside store calls
signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import lmdb_embeddings as le  # noqa: E402

INTERRUPTS = (KeyboardInterrupt, SystemExit, RuntimeError)


def say(*parts) -> None:
    """One line on stdout; a signal may interrupt it, then the line is written again (the parent dedups)."""
    line = " ".join(str(p) for p in parts) + "\n"
    while True:
        try:
            sys.stdout.write(line)
            sys.stdout.flush()
            return
        except INTERRUPTS:
            continue


def _raise_system_exit(signum, frame):
    raise SystemExit(f"signal {signum}")


def _raise_worker_died(signum, frame):
    raise RuntimeError("DataLoader worker (pid(s) 1234) exited unexpectedly")


def role_signalled(args) -> None:
    signal.signal(signal.SIGTERM, _raise_system_exit)
    signal.signal(signal.SIGCHLD, _raise_worker_died)
    store = le.EmbeddingStore.open(args.path, cache_mb=args.cache_mb, writemap=not args.no_writemap)
    ids = store.ids
    count = lambda: _until_done(lambda: store.commit_count)  # noqa: E731
    say("open", count())
    for _ in range(args.rounds or sys.maxsize):
        if args.stop and os.path.exists(args.stop):
            break
        target = count() + 1
        rows = np.full((len(ids), store.dim), target, store.dtype)
        if _call(store.put, ids, rows) is _INTERRUPTED:
            _until_done(store.rollback)  # an interrupted put: start the round again
            continue
        say("commit", target)
        if _call(store.commit) is _INTERRUPTED:
            say("interrupted", target, _last[0], count())
            if args.pause_after_interrupt:
                sys.stdin.readline()
        while (now := count()) != target:
            if now != target - 1:
                say("wrong", target, "count", now)
                return
            _call(store.commit)  # LMDB did not commit: the changes are pending, commit them again
        say("ack", target, target)
        if args.pause:
            time.sleep(args.pause)
    last = count()
    _until_done(store.close)
    say("done", last)


_INTERRUPTED = object()
_last = [""]


def _call(fn, *args):
    """``fn(*args)`` with the signals unblocked; an interruption (or one that surfaces just after) -> _INTERRUPTED."""
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        try:
            return fn(*args)
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    except INTERRUPTS as exc:
        _last[0] = type(exc).__name__
        return _INTERRUPTED


def _until_done(fn):
    """``fn()`` again until no signal interrupts it."""
    while (result := _call(fn)) is _INTERRUPTED:
        pass
    return result


def role_lowfd(args) -> None:
    store = le.EmbeddingStore.open(args.path, cache_mb=args.cache_mb)
    ids = store.ids
    rng = np.random.default_rng(args.seed)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for r in range(store.commit_count + 1, store.commit_count + 1 + args.rounds):
        rows = np.full((len(ids), store.dim), r, store.dtype)
        store.put(ids, rows)
        _limit_fds(int(rng.integers(0, args.max_free + 1)), soft, hard)
        try:
            store.commit()
        except le.CommitError as exc:
            say("failed", r, json.dumps(" ".join(str(exc).split())))
        except Exception as exc:
            say("raw", r, json.dumps(f"{type(exc).__name__}: {exc}"))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        if store.commit_count != r:
            store.commit()  # the retry, with descriptors to spare again
        if not (store.get(ids) == r).all():  # the handle was rolled back (the error said so): put again
            say("rolledback", r)
            store.put(ids, rows)
            store.commit()
        lost = int((_committed_rows(args.path) != r).any(axis=1).sum())
        say("lost" if lost else "ack", r, lost)
    store.close()
    say("done")


def _limit_fds(free: int, soft: int, hard: int) -> None:
    """Lower the open-file limit to what is open now plus ``free`` (descriptors are numbered from 0 up)."""
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, highest + free), hard))


def _committed_rows(path: str) -> np.ndarray:
    with le.EmbeddingStore.open(path, readonly=True, cache_mb=16) as reader:
        return reader.get(reader.ids)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="role", required=True)
    p = sub.add_parser("signalled")
    p.add_argument("path")
    p.add_argument("--rounds", type=int, default=0)
    p.add_argument("--cache-mb", type=float, default=64.0)
    p.add_argument("--pause", type=float, default=0.0)
    p.add_argument("--stop", default=None, help="stop once this file exists")
    p.add_argument("--no-writemap", action="store_true")
    p.add_argument("--pause-after-interrupt", action="store_true", help="read a line from stdin after each")
    p.set_defaults(func=role_signalled)
    p = sub.add_parser("lowfd")
    p.add_argument("path")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cache-mb", type=float, default=1.0)
    p.add_argument("--max-free", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=role_lowfd)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
