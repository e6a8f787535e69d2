"""The readers run: one writer training on the store while reader processes read it.

The writer runs the medium workload on ours, committing every ``commit_every`` batches
and at epoch ends. Reader processes (separate interpreters, read-only handles) get random
batches until the writer is done. Torn-read check: the writer publishes the initial table
and, per row and epoch, the batch that updates the row; a row's value then tells how many
updates it has seen, which bounds the commit it came from. One ``get`` is consistent iff
some commit point satisfies every row's bounds at once; otherwise it is counted as torn.

``python -m benchmarks.readers writer SPEC_JSON`` prints one ``RESULT`` JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

import lmdb_embeddings as le

from .worker import STEP

_POLL = 0.01


def _schedule(n: int, batch: int, epochs: int, seed: int) -> np.ndarray:
    """(epochs, n) global index of the batch that updates each row in each epoch."""
    rng = np.random.default_rng([seed, 1])
    per_epoch = (n + batch - 1) // batch
    out = np.empty((epochs, n), np.int64)
    for e in range(epochs):
        order = rng.permutation(n)
        out[e, order] = e * per_epoch + np.arange(n) // batch
    return out


def _commit_points(n: int, batch: int, epochs: int, every: int) -> np.ndarray:
    per_epoch = (n + batch - 1) // batch
    points = {0}
    for e in range(epochs):
        points.update(range(e * per_epoch + every, (e + 1) * per_epoch, every))
        points.add((e + 1) * per_epoch)
    return np.array(sorted(points), np.int64)


def train(store, n: int, batch: int, epochs: int, every: int, seed: int) -> tuple[float, float]:
    """The writer's loop (same order as ``_schedule``); returns (total s, commit s)."""
    rng = np.random.default_rng([seed, 1])
    commit_s, start = 0.0, time.perf_counter()
    for _ in range(epochs):
        order = rng.permutation(n).astype(np.int64)
        per_epoch = (n + batch - 1) // batch
        for b in range(per_epoch):
            ids = order[b * batch : (b + 1) * batch]
            store.put(ids, store.get(ids) + STEP)
            if (b + 1) % every == 0 or b + 1 == per_epoch:
                t = time.perf_counter()
                store.commit()
                commit_s += time.perf_counter() - t
    return time.perf_counter() - start, commit_s


def writer(spec: dict) -> dict:
    n, dim, batch, epochs = spec["n"], spec["dim"], spec["batch"], spec["epochs"]
    every, seed, work = spec["commit_every_batches"], spec.get("seed", 0), spec["dir"]
    os.makedirs(work, exist_ok=True)
    path = os.path.join(work, "store")
    result = {}
    for phase in ("alone", "with_readers"):
        store = le.EmbeddingStore.create(path, n, dim, seed=seed, overwrite=True)
        initial = store.get(np.arange(n))
        procs = []
        if phase == "with_readers":
            np.save(os.path.join(work, "initial.npy"), initial)
            np.save(os.path.join(work, "schedule.npy"), _schedule(n, batch, epochs, seed))
            np.save(os.path.join(work, "points.npy"), _commit_points(n, batch, epochs, every))
            for i in range(spec["readers"]):
                reader_spec = dict(spec, index=i, store=path)
                procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.readers", "reader",
                                               json.dumps(reader_spec)], stdout=subprocess.PIPE, text=True))
            deadline = time.time() + 120
            while sum(os.path.exists(os.path.join(work, f"ready{i}")) for i in range(len(procs))) < len(procs):
                if time.time() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError("reader processes did not start")
                time.sleep(_POLL)
        total, commit_s = train(store, n, batch, epochs, every, seed)
        result[f"writer_{phase}_s"] = total
        result[f"writer_{phase}_commit_s"] = commit_s
        if phase == "with_readers":
            open(os.path.join(work, "done"), "w").close()
            outs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
            result["reader_gets"] = sum(o["gets"] for o in outs)
            result["torn_reads"] = sum(o["torn"] for o in outs)
            result["reader_rows_per_s"] = sum(o["rows"] / o["seconds"] for o in outs if o["seconds"] > 0)
            result["reader_errors"] = [o["error"] for o in outs if o.get("error")]
            expected = initial.copy()
            for _ in range(epochs):
                expected += STEP
            store.close()
            with le.EmbeddingStore.open(path, readonly=True) as check:
                result["verified"] = bool(np.array_equal(check.get(np.arange(n)), expected))
        else:
            store.close()
    result["writer_slowdown"] = result["writer_with_readers_s"] / result["writer_alone_s"]
    return result


def reader(spec: dict) -> dict:
    work, batch, epochs = spec["dir"], spec["reader_batch"], spec["epochs"]
    pause = spec.get("reader_pause_s", 0.0)  # >0: a DataLoader-like worker feeding a trainer, not a busy loop
    initial = np.load(os.path.join(work, "initial.npy"), mmap_mode="r")
    schedule = np.load(os.path.join(work, "schedule.npy"), mmap_mode="r")
    points = np.load(os.path.join(work, "points.npy"))
    candidates = [np.asarray(initial)]
    for _ in range(epochs):
        candidates.append(candidates[-1] + STEP)
    rng = np.random.default_rng([spec.get("seed", 0), 1000 + spec["index"]])
    store = le.EmbeddingStore.open(spec["store"], readonly=True)
    open(os.path.join(work, f"ready{spec['index']}"), "w").close()
    gets = rows = torn = 0
    error = None
    start = time.perf_counter()
    try:
        while not os.path.exists(os.path.join(work, "done")):
            ids = rng.integers(0, len(initial), batch)
            got = store.get(ids)
            gets += 1
            rows += len(ids)
            torn += not _consistent(got, ids, candidates, schedule, points)
            if pause:
                time.sleep(pause)
    except Exception as exc:  # reported, not hidden: the run then fails its check
        error = f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - start
    store.close()
    return {"gets": gets, "rows": rows, "torn": torn, "seconds": seconds, "error": error}


def _consistent(got, ids, candidates, schedule, points) -> bool:
    """True iff one commit point explains every row of ``got`` (see the module docstring)."""
    k = np.full(len(ids), -1)
    for count, table in enumerate(candidates):
        match = (got.view(np.uint32) == table[ids].view(np.uint32)).all(axis=1)
        k[match & (k < 0)] = count
    if (k < 0).any():
        return False
    epochs = len(candidates) - 1
    u = np.asarray(schedule[:, ids]).T  # (rows, epochs)
    rows = np.arange(len(ids))
    lower = np.where(k > 0, u[rows, np.maximum(k - 1, 0)] + 1, 0).max()
    upper = np.where(k < epochs, u[rows, np.minimum(k, epochs - 1)], np.iinfo(np.int64).max).min()
    return bool(((points >= lower) & (points <= upper)).any())


def main(argv=None) -> None:
    mode, spec = (argv or sys.argv[1:])[:2]
    spec = json.loads(spec)
    out = writer(spec) if mode == "writer" else reader(spec)
    print(("RESULT " if mode == "writer" else "") + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
