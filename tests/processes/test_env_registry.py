"""The per-process environment registry and its one close policy (issue 18, items 4 and 6, finalizers).

* A dump reading a snapshot in one thread survives another thread opening the store writable:
  nothing closes an environment something still reads (``SharedEnv.why_not_closable``).
* The first get after a ``compact`` serves one commit, in the process and in persistent
  DataLoader workers (fork and spawn).
* A finalizer run by a garbage-collector pass on a thread that is inside the registry already
  cannot deadlock (``Registry.release`` never waits for the registry lock).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from checkout import ROOT, subprocess_env
from guarantees_lib import cli_ok, py

import lmdb_embeddings as le

ROWS, DIM = 2000, 16


def build(path: str, rows: int = ROWS) -> None:
    """A store whose rows are all 3.0 after three whole-table commits (free pages for compact to drop)."""
    store = le.EmbeddingStore.create(path, rows, DIM, chunk_rows=64, init="zeros")
    for r in range(1, 4):
        store.put(store.ids, np.full((rows, DIM), float(r), np.float32))
        store.commit()
    store.close()


def commit_in_another_process(path: str, value: float) -> None:
    py("s = le.EmbeddingStore.open(sys.argv[1])\n"
       "s.put(s.ids, np.full((len(s), s.dim), float(sys.argv[2]), np.float32))\ns.close()", path, str(value))


# ------------------------------------------------------------------------------- item 6
_DUMP_WHILE_OPENING_WRITABLE = """
import json, sys, threading
import lmdb_embeddings as le
from lmdb_embeddings.processes.snapshot import Snapshot

path, out = sys.argv[1:3]
reader = le.EmbeddingStore.open(path, readonly=True)
reader.get(reader.ids[:10])
inside, go_on = threading.Event(), threading.Event()

def paused_snapshot(p):  # a real snapshot whose reading pauses after its first chunk
    snap = Snapshot(p)
    chunks = snap.chunks

    def pausing():
        for i, item in enumerate(chunks()):
            if i == 1:
                inside.set()
                go_on.wait(60)
            yield item

    snap.chunks = pausing
    return snap

result = {}

def dump():
    try:
        le.dump_store(path, out, open_source=paused_snapshot)
        result["dump"] = "ok"
    except BaseException as exc:
        result["dump"] = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"

thread = threading.Thread(target=dump)
thread.start()
assert inside.wait(60), "the dump never started"
try:
    le.EmbeddingStore.open(path).close()
    result["open"] = "opened"
except le.EmbeddingStoreError as exc:
    result["open"] = str(exc)
go_on.set()
thread.join(60)
with le.EmbeddingStore.open(path) as writer:  # the dump is done: it opens now
    writer.put(writer.ids[:5], writer.get(writer.ids[:5]) * 0 + 9)
result["reader"] = reader.get([0, 10])[:, 0].tolist()
reader.close()
print(json.dumps(result))
"""


def test_a_dump_in_a_thread_survives_a_writable_open_in_another(tmp_path):
    """Item 6: a read-only handle is open, ``le.dump_store`` runs in a thread, the main thread opens
    the store writable. Before the fix the open reopened the shared environment writable in place,
    closing it under the dump's read transaction: the dump died with a raw
    ``lmdb.Error("Attempt to operate on closed/deleted/dropped object")`` (or the process with a
    segmentation fault). Now the writable open is refused in one line while the snapshot is read,
    the dump completes bit-exact, and the writable open succeeds once it is done."""
    path, out = str(tmp_path / "store"), str(tmp_path / "store.dump")
    build(path)
    proc = subprocess.run([sys.executable, "-c", _DUMP_WHILE_OPENING_WRITABLE, path, out], capture_output=True,
                          text=True, timeout=300, env=subprocess_env(), cwd=ROOT)
    assert proc.returncode == 0, f"the process died ({proc.returncode}): {proc.stderr[-3000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["dump"] == "ok", f"the dump died: {result['dump']}"
    if result["open"] != "opened":
        assert "snapshot" in result["open"] and "writable" in result["open"], result["open"]
        assert "\n" not in result["open"].strip()
    assert result["reader"] == [9.0, 3.0]
    restored = str(tmp_path / "restored")
    cli_ok("restore", out, restored)
    with le.EmbeddingStore.open(restored, readonly=True) as copy:
        assert (copy.get(copy.ids) == 3.0).all()


# ------------------------------------------------------------------------------- item 4
def test_the_first_get_after_a_compact_serves_one_commit(tmp_path):
    """Item 4: a read-only handle has half the table cached; the store is compacted (swapped in
    at the path) and another process commits new values to every row; the reader's FIRST get
    after that must serve that commit. Before the fix ``_gather`` bound the handle's table before
    the read followed the swap: the cached half came back old (3.0), the rest new (7.0)."""
    path = str(tmp_path / "store")
    build(path)
    reader = le.EmbeddingStore.open(path, readonly=True)
    try:
        assert (reader.get(reader.ids[: ROWS // 2]) == 3.0).all()
        assert "compacted" in cli_ok("compact", path).stdout
        commit_in_another_process(path, 7.0)
        rows = reader.get(np.arange(ROWS))
        values = np.unique(rows).tolist()
        assert values == [7.0], f"one get returned rows of two commits ({values})"
        rows, state = reader.get_with_state(np.arange(ROWS))
        assert np.unique(rows).tolist() == [7.0] and state["commit"] == reader.commit_count
    finally:
        reader.close()


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_persistent_dataloader_workers_serve_the_commit_made_after_a_compact(tmp_path, context, one_torch_thread):
    """Item 4 in DataLoader workers: persistent workers cached the whole table in epoch 1; the store
    is compacted and recommitted (7.0) before epoch 2. Before the fix the first batch of epoch 2
    came from the replaced store's cache (3.0)."""
    import torch
    from torch.utils.data import DataLoader

    path = str(tmp_path / "store")
    build(path)
    store = le.EmbeddingStore.open(path, readonly=True)
    loader = DataLoader(le.EmbeddingDataset(store), batch_size=500, num_workers=1, persistent_workers=True,
                        multiprocessing_context=context)
    try:
        assert (torch.cat(list(loader)) == 3.0).all()
        assert "compacted" in cli_ok("compact", path).stdout
        commit_in_another_process(path, 7.0)
        batches = [np.unique(batch.numpy()).tolist() for batch in loader]
    finally:
        del loader  # stops the persistent worker
        store.close()
    assert batches == [[7.0]] * (ROWS // 500), f"epoch 2 after the compact and commit served {batches}"


# --------------------------------------------------------------------------- finalizers
_GC_INSIDE_ACQUIRE = """
import gc, sys
import numpy as np
import lmdb_embeddings as le
from lmdb_embeddings.processes import environment

kind, first, second = sys.argv[1:4]
if kind == "store":
    garbage = le.EmbeddingStore.create(first, 100, 4)
    garbage.put([1], np.ones((1, 4), np.float32))  # uncommitted: the finalizer discards it
elif kind == "manager":
    garbage = le.TrainableEmbeddingManager(sample_ids=list(range(100)), embedding_dim=4, storage_mode="disk",
                                           embeddings_dir=first)
    garbage.update_embeddings([1], np.ones((1, 4), np.float32))
else:  # a sharded store on a one-rank gloo group
    import torch.distributed as dist
    from lmdb_embeddings.distributed import ShardedEmbeddingStore
    dist.init_process_group("gloo", init_method="file://" + first + ".pg", rank=0, world_size=1)
    garbage = ShardedEmbeddingStore.create(first, 100, 4)
garbage.cycle = garbage  # only the garbage collector can free it
del garbage
gc.disable()
opening = environment._open_shared  # runs while this thread holds the registry lock (inside acquire)

def collecting_open(*args, **kwargs):
    gc.collect()  # the finalizer of the garbage runs here, on the thread that holds the lock
    return opening(*args, **kwargs)

environment._open_shared = collecting_open
le.EmbeddingStore.create(second, 10, 4).close()
print("finished")
"""


@pytest.mark.parametrize("kind", ["store", "manager", "sharded"])
def test_a_finalizer_run_inside_the_registry_cannot_deadlock(tmp_path, kind):
    """A garbage-collector pass on a thread inside ``acquire`` (holding the registry's lock) runs the
    finalizer of an unreachable handle (``EmbeddingStore.__del__``, the manager's ``weakref.finalize``,
    ``ShardedEmbeddingStore.__del__``), which releases its environment. Before the fix that release
    waited for the same non-reentrant lock: the process hung for good. Now the release is queued and
    performed by the lock's holder."""
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    try:
        proc = subprocess.run([sys.executable, "-c", _GC_INSIDE_ACQUIRE, kind, first, second], capture_output=True,
                              text=True, timeout=90, env=dict(subprocess_env(), OMP_NUM_THREADS="1"), cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{kind}: the process deadlocked when its finalizer ran inside acquire")
    assert proc.returncode == 0 and proc.stdout.split()[-1:] == ["finished"], proc.stderr[-3000:]
    if kind != "sharded":  # the environment was released: another process can open the store writable
        reopen = "s = le.EmbeddingStore.open(sys.argv[1])\nprint(len(s))\ns.close()"
        assert py(reopen, first if kind == "store" else _manager_store(first)).split() == ["100"]


def _manager_store(directory: str) -> str:
    """The store a manager keeps in its ``embeddings_dir``."""
    for root, _dirs, files in os.walk(directory):
        if "data.mdb" in files:
            return root
    raise AssertionError(f"no store under {directory}")
