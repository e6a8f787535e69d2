"""Real multi-process behaviour: readers during commits, one writer per store, pickling and
fork, DataLoader workers, kill -9 of a committing writer, bounded file growth."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from checkout import ROOT, run_python, subprocess_env

import lmdb_embeddings as le
from lmdb_embeddings import EmbeddingStore
from lmdb_embeddings.fsutil import allocated_bytes


def _popen(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=ROOT)


def _read_line(proc: subprocess.Popen, timeout: float = 60) -> str:
    """One line of the child's stdout, failing (not hanging) if it does not come."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        proc.kill()
        raise AssertionError(f"no output from child within {timeout}s")
    line = proc.stdout.readline()
    if not line:
        proc.wait(10)
        raise AssertionError(f"child exited ({proc.returncode}): {proc.stderr.read()}")
    return line.strip()


# ------------------------------------------------------------ readers during commits
_READER = """
import sys, time, numpy as np, lmdb_embeddings as le
path, cache_mb, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
store = le.EmbeddingStore.open(path, readonly=True, cache_mb=cache_mb)
rng = np.random.default_rng(int(cache_mb * 1000))
n = len(store)
seen, last, gets = set(), -1.0, 0
print("ready", flush=True)
end = time.time() + seconds
while time.time() < end:
    ids = store.ids if gets % 3 == 0 else rng.integers(0, n, 700)
    rows = store.get(ids)
    values = np.unique(rows)
    if len(values) != 1:
        print("MIXED", values[:5].tolist(), flush=True); sys.exit(1)
    v = float(values[0])
    if v != int(v) or v < last:
        print("BAD", v, last, flush=True); sys.exit(1)
    seen.add(v); last = v; gets += 1
print("ok", gets, len(seen), flush=True)
"""


def test_readers_see_whole_commits_only(store_path):
    n, dim = 24000, 16
    with EmbeddingStore.create(store_path, n, dim, chunk_rows=256, init="zeros") as writer:
        # one reader with a big cache (revalidation path), one whose cache holds a few chunks
        readers = [_popen(_READER, store_path, str(mb), "4") for mb in (64, 0.02)]
        for proc in readers:
            assert _read_line(proc) == "ready"
        ids = np.arange(n)
        r = 0
        end = time.time() + 3.5
        while time.time() < end:
            r += 1
            writer.put(ids, np.full((n, dim), r - 0.5, np.float32))  # never committed
            writer.put(ids[: n // 2], np.full((n // 2, dim), r, np.float32))
            time.sleep(0.005)
            writer.put(ids[n // 2 :], np.full((n - n // 2, dim), r, np.float32))
            writer.commit()
        results = [_read_line(proc, 30).split() for proc in readers]
        for proc in readers:
            proc.wait(30)
    for result in results:
        assert result[0] == "ok", result
        assert int(result[1]) > 20 and int(result[2]) >= 3  # many gets, across several commits
    assert r >= 5


# -------------------------------------------------------------- one writer per store
_HOLD_WRITER = """
import sys, lmdb_embeddings as le
store = le.EmbeddingStore.open(sys.argv[1])
store.put([0], store.get([0]) + 1)
print("holding", flush=True)
sys.stdin.readline()
"""


def test_writer_lock_names_the_holder_and_dies_with_it(small_store):
    path = small_store.path
    small_store.close()
    proc = _popen(_HOLD_WRITER, path)
    try:
        assert _read_line(proc) == "holding"
        start = time.monotonic()
        with pytest.raises(le.WriterLockedError, match=f"pid {proc.pid}"):
            EmbeddingStore.open(path)
        assert time.monotonic() - start < 2  # refused at once, not after a wait
        with EmbeddingStore.open(path, readonly=True) as reader:  # readers are never refused
            assert len(reader) == 1000
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
        proc.wait(30)
    with EmbeddingStore.open(path) as store:  # the kernel dropped the dead writer's lock
        assert store.commit_count == 0  # and its uncommitted put is gone


# --------------------------------------------------------------- pickle, spawn, fork
def _read_in_child(store, ids, queue):
    try:
        rows = store.get(ids)
        queue.put(("ok", rows, store.readonly, os.getpid()))
    except BaseException as exc:  # report, don't hang the parent
        queue.put(("error", repr(exc), None, None))


@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_handle_crosses_process_boundaries(small_store, method):
    small_store.put([3, 4], np.full((2, 16), 7.0))
    small_store.commit()
    small_store.put([3], np.full((1, 16), -1.0))  # uncommitted: children must not see it
    ctx = multiprocessing.get_context(method)
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(small_store, [4, 3], queue))
    child.start()
    try:
        status, rows, readonly, pid = queue.get(timeout=60)
    finally:
        child.join(30)
    assert status == "ok", rows
    assert pid != os.getpid() and readonly is True
    assert np.array_equal(rows, np.full((2, 16), 7.0, np.float32))
    # the parent's writer is untouched: it still sees its own change and commits it
    assert np.array_equal(small_store.get([3]), np.full((1, 16), -1.0, np.float32))
    small_store.commit()
    assert child.exitcode == 0


def test_pickled_handle_reopens_lazily_read_only(small_store):
    clone = pickle.loads(pickle.dumps(small_store))
    assert clone.path == small_store.path and clone.readonly
    assert np.array_equal(clone.get([5]), small_store.get([5]))
    with pytest.raises(PermissionError):
        clone.put([5], np.zeros((1, 16)))
    clone.close()
    small_store.put([5], np.zeros((1, 16)))  # the writer was not disturbed


def test_forked_child_never_touches_the_parents_pending_transaction(store_path):
    # A tiny cache makes the parent spill into an open write transaction before forking.
    with EmbeddingStore.create(store_path, 4096, 32, chunk_rows=64, cache_mb=1 / 16, init="zeros") as store:
        store.put(np.arange(4096), np.ones((4096, 32)))
        assert store.stats()["spilled_chunks"] > 0
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: use the inherited handle, report, exit without cleanup
            try:
                os.close(read_fd)
                rows = store.get(np.arange(4096))
                ok = store.readonly and not rows.any()
                os.write(write_fd, b"ok" if ok else b"bad")
            except BaseException as exc:
                os.write(write_fd, repr(exc).encode()[:200])
            finally:
                os._exit(0)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            answer = pipe.read()
        os.waitpid(pid, 0)
        assert answer == b"ok", answer
        store.commit()  # the parent's pending transaction and lock still work
        assert store.get([4095]).all()
    with EmbeddingStore.open(store_path, readonly=True) as reader:
        assert reader.get(np.arange(4096)).all()


# ------------------------------------------------------------------------- DataLoader
class _RowsDataset:
    """Map-style dataset over a store handle: item i -> (id, row)."""

    def __init__(self, store):
        self.store = store
        self.ids = store.ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        sample_id = int(self.ids[i])
        return sample_id, self.store.get_tensor([sample_id])[0]


def test_dataloader_with_two_workers(small_store):
    import torch
    from torch.utils.data import DataLoader

    table = np.arange(1000 * 16, dtype=np.float32).reshape(1000, 16)
    small_store.put(np.arange(1000), table)
    small_store.commit()
    loader = DataLoader(_RowsDataset(small_store), batch_size=64, num_workers=2, shuffle=True,
                        generator=torch.Generator().manual_seed(0), timeout=60)
    seen_ids, seen_rows = [], []
    for ids, rows in loader:
        seen_ids.append(ids.numpy())
        seen_rows.append(rows.numpy())
    ids = np.concatenate(seen_ids)
    assert sorted(ids.tolist()) == list(range(1000))
    assert np.array_equal(np.concatenate(seen_rows), table[ids])
    small_store.put([0], np.zeros((1, 16)))  # the writer keeps working after its workers exit
    small_store.commit()


# ------------------------------------------------------------ kill -9 while committing
_TRAINER = """
import sys, time, numpy as np, lmdb_embeddings as le
store = le.EmbeddingStore.open(sys.argv[1], cache_mb=256)
n, dim = len(store), store.dim
r = int(store.get([0])[0, 0])
ids = np.arange(n)
print("start", r, flush=True)
while True:
    r += 1
    for part in np.array_split(ids, 4):
        store.put(part, np.full((len(part), dim), r, np.float32))
    print("commit", r, flush=True)
    t = time.perf_counter()
    store.commit()
    print("done", r, time.perf_counter() - t, flush=True)
"""


def test_kill_9_while_committing_leaves_a_committed_state(store_path):
    n, dim = 80000, 64  # ~20 MiB of rows rewritten by every commit
    EmbeddingStore.create(store_path, n, dim, chunk_rows=512, init="zeros").close()
    rng = random.Random(1234)
    commit_seconds = 0.05
    kills = 0
    for _ in range(10):
        proc = _popen(_TRAINER, store_path)
        acked = None
        try:
            start = int(_read_line(proc).split()[1])
            acked = start
            # wait for a random commit to start, then kill within (or just after) it
            for _ in range(rng.randint(1, 2)):
                while True:
                    word, r, *rest = _read_line(proc).split()
                    if word == "done":
                        acked = int(r)
                        commit_seconds = max(commit_seconds, float(rest[0]))
                    elif word == "commit":
                        break
            time.sleep(rng.uniform(0, 1.2 * commit_seconds))
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
            # drain what it acknowledged before it died (a line cut by the kill is not an ack)
            for line in proc.stdout.read().splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[0] == "done":
                    acked = int(parts[1])
        finally:
            proc.kill()
            proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
        with EmbeddingStore.open(store_path) as store:  # lock released, store consistent
            values = np.unique(store.get(np.arange(n)))
            assert len(values) == 1, values[:5]
            assert acked <= values[0] <= acked + 1
            assert store.stats()["commits"] == 0
    assert kills == 10


# -------------------------------------------------------- readers don't grow the file
def test_readers_do_not_make_the_file_grow(store_path):
    n, dim = 4000, 64  # 1 MiB table, rewritten by each of 60 commits
    with EmbeddingStore.create(store_path, n, dim, chunk_rows=256, init="zeros") as writer:
        readers = [_popen(_READER, store_path, str(mb), "3") for mb in (32, 0.1)]
        for proc in readers:
            assert _read_line(proc) == "ready"
        for r in range(1, 61):
            writer.put(np.arange(n), np.full((n, dim), r, np.float32))
            writer.commit()
            time.sleep(0.01)
        for proc in readers:
            assert _read_line(proc, 30).startswith("ok")
            proc.wait(30)
        size = allocated_bytes(os.path.join(store_path, "data.mdb"))
    # pinned snapshots would keep every version alive: ~60 MiB
    assert size < 12 * n * dim * 4, size


def test_reader_processes_are_unlimited(small_store):
    small_store.put([1], np.full((1, 16), 3.0))
    small_store.commit()
    code = (
        "import sys, lmdb_embeddings as le\n"
        "print(float(le.EmbeddingStore.open(sys.argv[1], readonly=True).get([1])[0, 0]))\n"
    )
    procs = [_popen(code, small_store.path) for _ in range(6)]
    for proc in procs:
        assert _read_line(proc) == "3.0"
        proc.wait(30)
    assert run_python(code, small_store.path).stdout.strip() == "3.0"


def test_new_reader_process_is_not_blocked_by_an_open_write_transaction(store_path):
    # Spilled chunks keep the writer's transaction open until commit; a reader process
    # attaching meanwhile must read the committed state at once, not wait for the commit.
    with EmbeddingStore.create(store_path, 4096, 32, chunk_rows=64, cache_mb=1 / 16, init="zeros") as store:
        store.put(np.arange(4096), np.ones((4096, 32)))
        assert store.stats()["spilled_chunks"] > 0
        code = (
            "import sys, lmdb_embeddings as le\n"
            "s = le.EmbeddingStore.open(sys.argv[1], readonly=True)\n"
            "print(float(s.get(s.ids).max()), len(s.columns))\n"
        )
        assert run_python(code, store_path, timeout=30).stdout.split() == ["0.0", "0"]
        store.commit()
    assert run_python(code, store_path, timeout=30).stdout.split() == ["1.0", "0"]
