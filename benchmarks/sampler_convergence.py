"""Does a locality-aware shuffle (``le.BlockShuffleBatchSampler``) train as well as a full shuffle?

Two measurements, written to ``benchmarks/results/sampler_convergence.{jsonl,md}``:

1. **Convergence on a real task** (no download): Generative Latent Optimization (GLO,
   Bojanowski et al. 2018) on scikit-learn's bundled handwritten digits. Every image gets its
   own trainable 16-d code in an ``EmbeddingStore`` (``StoreEmbedding`` + ``SparseAdam``); a
   shared decoder (16-128-64 MLP, ``torch.optim.Adam``) maps a code to the image's 64 pixels;
   the loss is the pixels' MSE. The 1,797 images and their four one-pixel shifts (as
   scikit-learn's RBM example "nudges" them) give 8,985 rows, in chunks of 8 rows (1,124 chunks),
   batches of 32. Same seeds for both samplers (store init, decoder init, sampler). Reported
   after the last epoch: the MSE over all images, and a linear probe (logistic regression on
   the standardized codes, 2/3 train, 1/3 test) for the digit's label, which the training never
   sees. Three table orders: ``natural`` (``load_digits`` order, then the shifted copies),
   ``sorted`` by label (every chunk, hence every block, holds one digit), and ``sorted-rows-shuffled``:
   the sorted images, but the store created with their IDs in a random order (``create(path,
   ids=permutation)``: row order is creation order), the remedy for a table written in label order.
2. **Locality** (deterministic counts, no timing): distinct chunks per batch and per span of a
   window's rows, and the chunk loads of one epoch through an LRU cache of C chunks, full shuffle
   vs blocks of one chunk.

    python -m benchmarks.sampler_convergence                       # about 15 min of CPU here
    python -m benchmarks.sampler_convergence --seeds 2 --epochs 5 --out /tmp/sc   # a quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import OrderedDict

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lmdb_embeddings as le  # noqa: E402
from benchmarks.report import write_jsonl  # noqa: E402
from benchmarks.run import _git_commit  # noqa: E402
from benchmarks.scratch import scratch_dir  # noqa: E402
from lmdb_embeddings.torch import SparseAdam, StoreEmbedding  # noqa: E402

LATENT, HIDDEN = 16, 128
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ------------------------------------------------------------------------------ the data
def digits(order: str = "natural", nudge: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(pixels in [0, 1] as float32 (n, 64), labels): scikit-learn's bundled digits, and with ``nudge``
    their shifts by one pixel left, right, up and down; ``order="sorted"`` sorts the rows by label."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images, labels = (data.images / 16.0).astype(np.float32), data.target
    if nudge:
        padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
        shifted = [padded[:, 1 + dy : 9 + dy, 1 + dx : 9 + dx] for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0))]
        images, labels = np.concatenate([images, *shifted]), np.tile(labels, 5)
    pixels = images.reshape(len(images), 64)
    if order.startswith("sorted"):
        by_label = np.argsort(labels, kind="stable")
        pixels, labels = pixels[by_label], labels[by_label]
    elif order != "natural":
        raise ValueError(f"order must be 'natural', 'sorted' or 'sorted-rows-shuffled', got {order!r}")
    return np.ascontiguousarray(pixels), labels


# ------------------------------------------------------------------------------ the task
def loader_for(store: le.EmbeddingStore, sampler: str, batch: int, seed: int, window_blocks: int):
    """(DataLoader over the store's IDs, set_epoch): a full shuffle as ``shuffle=True`` gives it, or blocks."""
    ids = TensorDataset(torch.from_numpy(store.ids))
    if sampler == "full":
        generator = torch.Generator()
        loader = DataLoader(ids, batch_size=batch, shuffle=True, generator=generator)
        return loader, lambda epoch: generator.manual_seed(seed * 1000 + epoch)
    blocks = le.BlockShuffleBatchSampler(store, batch, window_blocks=window_blocks, seed=seed)
    return DataLoader(ids, batch_sampler=blocks), blocks.set_epoch


def train_glo(pixels: np.ndarray, labels: np.ndarray, workdir: str, *, sampler: str, seed: int, epochs: int,
              batch: int = 32, chunk_rows: int = 8, window_blocks: int = 16, lr: float = 0.01,
              shuffled_rows: bool = False) -> dict:
    """Train per-image codes and a shared decoder; the MSE after every epoch and the label probe at the end.

    The ID of an image is its index in ``pixels``; ``shuffled_rows`` creates the store with the IDs in a
    random order (fixed, not the seed's), so its rows are not in ``pixels``' order."""
    from sklearn.linear_model import LogisticRegression

    n = len(pixels)
    target = torch.from_numpy(pixels)
    path = os.path.join(workdir, f"glo-{sampler}-{window_blocks}-{seed}")
    ids = np.random.default_rng(12345).permutation(n) if shuffled_rows else n
    store = le.EmbeddingStore.create(path, ids, LATENT, chunk_rows=chunk_rows, seed=seed, overwrite=True)
    try:
        torch.manual_seed(seed)
        codes = StoreEmbedding(store)
        decoder = torch.nn.Sequential(torch.nn.Linear(LATENT, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 64))
        code_opt, decoder_opt = SparseAdam(codes, lr=lr), torch.optim.Adam(decoder.parameters(), lr=1e-3)
        loader, set_epoch = loader_for(store, sampler, batch, seed, window_blocks)
        curve = []
        for epoch in range(epochs):
            set_epoch(epoch)
            for (ids,) in loader:
                loss = torch.nn.functional.mse_loss(decoder(codes(ids)), target[ids])
                code_opt.zero_grad()
                decoder_opt.zero_grad()
                loss.backward()
                code_opt.step()
                decoder_opt.step()
            with torch.no_grad():
                z = torch.from_numpy(store.get(np.arange(n)))  # in ID order, as the pixels
                curve.append(torch.nn.functional.mse_loss(decoder(z), target).item())
        z = z.numpy()
        z = (z - z.mean(0)) / (z.std(0) + 1e-12)
        split = np.random.default_rng(0).permutation(n)
        train, test = split[: 2 * n // 3], split[2 * n // 3 :]
        probe = LogisticRegression(max_iter=2000).fit(z[train], labels[train]).score(z[test], labels[test])
    finally:
        store.close()
    return {"final_mse": curve[-1], "probe_accuracy": float(probe), "curve": curve}


# ------------------------------------------------------------------------------ locality
def chunks_per_batch(order: np.ndarray, chunk_rows: int, batch: int) -> np.ndarray:
    """The number of distinct chunks each batch of ``order`` touches."""
    chunk = order // chunk_rows
    count = -(-len(order) // batch)
    pad = np.full(count * batch - len(order), -1)
    rows = np.sort(np.concatenate([chunk, pad]).reshape(count, batch), axis=1)
    distinct = (np.diff(rows, axis=1) != 0).sum(axis=1) + 1
    distinct[-1] -= int(len(pad) > 0)  # the padding's -1 is not a chunk
    return distinct


def lru_chunk_loads(order: np.ndarray, chunk_rows: int, batch: int, capacity: int) -> int:
    """Chunk loads of one pass in ``order`` through an LRU cache of ``capacity`` chunks, a batch at a time
    (the chunks of a batch must all be resident together: the store serves a batch so)."""
    cache: OrderedDict[int, None] = OrderedDict()
    loads = 0
    for start in range(0, len(order), batch):
        wanted = np.unique(order[start : start + batch] // chunk_rows).tolist()
        missing = [c for c in wanted if c not in cache]
        for c in wanted:  # the batch's resident chunks become the most recent first, then the loads come in
            if c in cache:
                cache.move_to_end(c)
        for c in missing:
            loads += 1
            cache[c] = None
            if len(cache) > capacity:
                cache.popitem(last=False)
    return loads


def locality(num_rows: int, chunk_rows: int, batch: int, window_blocks: int, seed: int = 0) -> dict:
    """Full shuffle vs blocks of one chunk in windows of ``window_blocks``: chunks per batch, per window, LRU loads."""
    full = np.random.default_rng(seed).permutation(num_rows)
    blocks = le.BlockShuffleSampler(num_rows, chunk_rows=chunk_rows, window_blocks=window_blocks, seed=seed).order()
    window_rows = window_blocks * chunk_rows
    chunks = -(-num_rows // chunk_rows)
    out = {"rows": num_rows, "chunk_rows": chunk_rows, "chunks": chunks, "batch": batch,
           "window_blocks": window_blocks}
    for name, order in (("full", full), ("block", blocks)):
        per_batch = chunks_per_batch(order, chunk_rows, batch)
        per_window = chunks_per_batch(order, chunk_rows, window_rows)
        out[name] = {"chunks_per_batch_mean": float(per_batch.mean()), "chunks_per_batch_max": int(per_batch.max()),
                     "chunks_per_window_span_max": int(per_window.max()),
                     "lru_loads": {str(c): lru_chunk_loads(order, chunk_rows, batch, c)
                                   for c in (window_blocks, 2 * window_blocks)}}
    return out


# ------------------------------------------------------------------------------ report
def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.5f} ± {sd:.5f} ({min(values):.5f}-{max(values):.5f})"


def markdown(convergence: list[dict], local: list[dict], meta: dict) -> str:
    lines = [f"# Block shuffle vs full shuffle (commit {meta['commit']}, {meta['seeds']} seeds, "
             f"{meta['epochs']} epochs)", "",
             "`python -m benchmarks.sampler_convergence` (see its docstring). GLO on the nudged digits: "
             "8,985 rows, chunk_rows=8, batch 32. Mean ± sd (min-max) over the seeds; 'x full' is the "
             "mean MSE over the full shuffle's mean MSE.", "",
             "| table order | sampler | final MSE | x full | probe accuracy |", "|---|---|---|---|---|"]
    for order in meta["orders"]:
        runs = [r for r in convergence if r["order"] == order]
        full = statistics.fmean(r["final_mse"] for r in runs if r["sampler"] == "full")
        for label in ["full"] + [f"block w={w}" for w in meta["windows"]]:
            mine = [r for r in runs if r["label"] == label]
            mse = [r["final_mse"] for r in mine]
            lines.append(f"| {order} | {label} | {_spread(mse)} | {statistics.fmean(mse) / full:.3f} | "
                         f"{_spread([r['probe_accuracy'] for r in mine])} |")
    lines += ["", "Locality (deterministic counts; one epoch; LRU loads = chunks read through an LRU cache of "
              "C chunks, a batch's chunks resident together):", "",
              "| rows | chunk_rows | batch | window | sampler | chunks per batch (mean, max) | "
              "chunks per span of window rows (max) | LRU loads, C=window | C=2x window |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in local:
        for name in ("full", "block"):
            s = r[name]
            loads = list(s["lru_loads"].values())
            lines.append(f"| {r['rows']:,} | {r['chunk_rows']} | {r['batch']} | {r['window_blocks']} | {name} | "
                         f"{s['chunks_per_batch_mean']:.1f}, {s['chunks_per_batch_max']} | "
                         f"{s['chunks_per_window_span_max']} | {loads[0]:,} | {loads[1]:,} |")
    sizes = ", ".join(f"{r['chunks']:,}" for r in local)
    lines.append(f"\n(the tables have {sizes} chunks: a chunk read once per epoch is the least possible)\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--windows", default="4,16,64", help="window_blocks values to compare (comma-separated)")
    p.add_argument("--orders", default="natural,sorted,sorted-rows-shuffled")
    p.add_argument("--locality-rows", default="8985,2000000", help="table sizes for the locality counts")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # deterministic and fair on a shared machine
    windows = [int(w) for w in args.windows.split(",")]
    orders = args.orders.split(",")
    meta = {"commit": _git_commit(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seeds": args.seeds, "epochs": args.epochs, "windows": windows, "orders": orders}
    convergence = []
    with scratch_dir("sampler-convergence-") as work:
        for order in orders:
            pixels, labels = digits(order)
            for seed in range(args.seeds):
                for sampler, window in [("full", 0)] + [("block", w) for w in windows]:
                    label = "full" if sampler == "full" else f"block w={window}"
                    result = train_glo(pixels, labels, work, sampler=sampler, seed=seed, epochs=args.epochs,
                                       window_blocks=window or 16, shuffled_rows=order == "sorted-rows-shuffled")
                    convergence.append({"kind": "convergence", "order": order, "sampler": sampler, "label": label,
                                        "window_blocks": window, "seed": seed, **result})
                    print(f"{order} {label} seed {seed}: mse {result['final_mse']:.5f} "
                          f"probe {result['probe_accuracy']:.3f}", file=sys.stderr, flush=True)
    local = []
    for rows in (int(r) for r in args.locality_rows.split(",")):
        chunk_rows, batch = (8, 32) if rows < 100_000 else (512, 1024)
        local.append({"kind": "locality", **locality(rows, chunk_rows, batch, 16)})
    os.makedirs(args.out, exist_ok=True)
    write_jsonl([{**r, "meta": meta} for r in convergence + local], os.path.join(args.out, "sampler_convergence.jsonl"))
    table = markdown(convergence, local, meta)
    with open(os.path.join(args.out, "sampler_convergence.md"), "w") as fh:
        fh.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
