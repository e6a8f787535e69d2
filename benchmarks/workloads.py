"""Workloads and suites.

One epoch: the IDs in batches of ``batch`` (a fresh random permutation per epoch, or in
row order for the chunk-by-chunk pattern of the original training loop); per batch
``get`` -> rows + 0.01 -> ``put``; a durable commit at each epoch end, counted in the
total. ``max_batches`` caps a run (the small workload, and random access beyond RAM
where a full epoch would take hours for every implementation). ``repeats`` times the
pass several times on the same table and reports the median (the small workload's
~5 ms would otherwise be at the mercy of one scheduler hiccup on a shared machine).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

BASELINES = ("numpy_mem", "memmap_epoch", "lmdb_row_per_key", "lmdb_row_batched")


@dataclass(frozen=True)
class Workload:
    name: str
    n: int
    dim: int
    batch: int
    epochs: int = 1
    order: str = "random"  # "random" permutation per epoch, or "sequential" (chunk by chunk)
    max_batches: int | None = None  # total cap over the run
    repeats: int = 1  # timed passes on the same table; the median pass is reported (short workloads)
    # label -> (implementation, options, max_batches override); ours: ours_default/ours_tuned
    runs: dict = field(default_factory=dict)
    seed: int = 0

    def batches_per_epoch(self) -> int:
        return (self.n + self.batch - 1) // self.batch

    def as_dict(self) -> dict:
        return asdict(self)


def epoch_order(workload: Workload, rng: np.random.Generator) -> np.ndarray | None:
    """Row order of one epoch (None = sequential, generated per batch without a big array)."""
    if workload.order == "sequential":
        return None
    return rng.permutation(workload.n).astype(np.int64)


def batch_ids(workload: Workload, order: np.ndarray | None, b: int) -> np.ndarray:
    lo, hi = b * workload.batch, min(workload.n, (b + 1) * workload.batch)
    if order is None:
        return np.arange(lo, hi, dtype=np.int64)
    return order[lo:hi]


def _runs(baselines=BASELINES, default=None, tuned=None, caps=None) -> dict:
    """label -> (implementation, options, max_batches override or None)."""
    caps = caps or {}
    runs = {name: (name, {}, caps.get(name)) for name in baselines}
    runs["ours_default"] = ("ours", dict(default or {}), caps.get("ours_default"))
    runs["ours_tuned"] = ("ours", dict(tuned or {}), caps.get("ours_tuned"))
    return runs


def suite(name: str) -> list[Workload]:
    if name == "quick":
        return [
            Workload("small", 1000, 128, 32, max_batches=30, repeats=15, runs=_runs(tuned={"chunk_rows": 256})),
            Workload("medium_reduced", 20_000, 128, 256, epochs=1,
                     runs=_runs(tuned={"chunk_rows": 4096, "l1_fraction": 1.0})),
        ]
    if name == "full":
        ooc = 10_000_000
        return [
            Workload("small", 1000, 128, 32, max_batches=30, repeats=15, runs=_runs(tuned={"chunk_rows": 256})),
            Workload("medium", 100_000, 128, 256, epochs=2,
                     runs=_runs(tuned={"l1_fraction": 1.0})),
            # ours_default sizes its cache from the table (the whole 1 GB fits in a quarter of RAM)
            Workload("large", 2_000_000, 128, 1024, epochs=1,
                     runs=_runs(tuned={"chunk_rows": 4096, "cache_mb": 1400, "l1_fraction": 1.0})),
            Workload("ooc_chunk", ooc, 128, 1024, order="sequential",
                     runs=_runs(("memmap_epoch",), default={"cache_mb": 512},
                                tuned={"cache_mb": 512, "chunk_rows": 4096, "l1_fraction": 1.0})
                     | {"ours_commit250": ("ours", {"cache_mb": 512, "chunk_rows": 4096, "l1_fraction": 1.0,
                                                    "commit_every": 250}, None)}),
            Workload("ooc_random", ooc, 128, 1024, max_batches=200,
                     runs=_runs(("memmap_epoch",), default={"cache_mb": 512},
                                tuned={"cache_mb": 512, "chunk_rows": 32, "readahead": False},
                                caps={"ours_default": 20})),
        ]
    raise ValueError(f"unknown suite {name!r}: choose quick or full")
