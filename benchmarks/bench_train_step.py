"""Steps/s of a full training step with the store vs an in-memory sparse embedding.

A step is: forward (look up B random rows), a loss, backward, optimizer step, and for the
store the write-back of rows and Adam moments into the store's cache (``put``/
``put_column``; durable at the next commit, timed separately). The baseline is
``nn.Embedding(N, D, sparse=True)`` + ``torch.optim.SparseAdam`` with the whole table and
its moments in RAM. Target from the issue: store step time <= 2x the baseline's.

Both run in one process, interleaved in rounds (the machine is shared: compare the ratio of
the same round, not absolute numbers from different runs). The store's cache is sized to
hold the table and both moments (random IDs over 1M rows touch most chunks every step;
a cache smaller than the working set turns every step into chunk loads and spills).

    python benchmarks/bench_train_step.py                       # N=1M, D=128, B=1024
    python benchmarks/bench_train_step.py --rows 100000 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lmdb_embeddings as le  # noqa: E402
from benchmarks.scratch import scratch_dir  # noqa: E402
from lmdb_embeddings.torch import SparseAdam, StoreEmbedding  # noqa: E402


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Phases:
    """Accumulated seconds per phase of the step."""

    def __init__(self):
        self.seconds = {"forward": 0.0, "backward": 0.0, "step": 0.0}

    def timed(self, phase, fn, device):
        t = time.perf_counter()
        out = fn()
        _sync(device)
        self.seconds[phase] += time.perf_counter() - t
        return out


def run_steps(module, opt, batches, target, device, phases: Phases) -> float:
    """Run the steps; return the wall time per step (seconds)."""
    _sync(device)
    start = time.perf_counter()
    for ids in batches:
        out = phases.timed("forward", lambda ids=ids: module(ids.to(device, non_blocking=True)), device)
        opt.zero_grad()
        phases.timed("backward", lambda out=out: _loss(out, target).backward(), device)
        phases.timed("step", opt.step, device)
    _sync(device)
    return (time.perf_counter() - start) / len(batches)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50, help="timed steps per round and implementation")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (load the store's chunks)")
    p.add_argument("--chunk-rows", type=int, default=1024)
    p.add_argument("--cache-mb", type=float, default=None, help="default: table + 2 moments + 10%%")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu", help="cpu or cuda (rows reach CUDA through pinned memory)")
    p.add_argument("--no-commit", action="store_true", help="skip timing the final commit")
    p.add_argument("--path", default=None, help="store directory (default: a temporary one, removed)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n, d, b = args.rows, args.dim, args.batch
    table_mb = n * d * 4 / 2**20
    cache_mb = args.cache_mb if args.cache_mb is not None else table_mb * 3 * 1.1
    gen = torch.Generator().manual_seed(0)
    total = args.warmup + args.rounds * args.steps
    batches = [torch.randint(0, n, (b,), generator=gen) for _ in range(total)]
    target = torch.randn(b, d, generator=gen).to(device)

    with scratch_dir("bench_train_step_", keep=args.path) as workdir:  # removed on any exit, SIGTERM too
        path = os.path.join(workdir, "store")
        t = time.perf_counter()
        store = le.EmbeddingStore.create(path, n, d, chunk_rows=args.chunk_rows, seed=0, overwrite=True,
                                         cache_mb=cache_mb, l1_fraction=0.95)
        create_s = time.perf_counter() - t
        emb = StoreEmbedding(store).to(device)
        store_opt = SparseAdam(emb, lr=1e-3)

        ref = torch.nn.Embedding(n, d, sparse=True)
        with torch.no_grad():
            ref.weight.normal_(0, 0.01, generator=gen)
        ref = ref.to(device)
        ref_opt = torch.optim.SparseAdam(ref.parameters(), lr=1e-3)

        warm = batches[: args.warmup]
        t = time.perf_counter()
        run_steps(emb, store_opt, warm, target, device, Phases())
        warm_store_s = time.perf_counter() - t
        run_steps(ref, ref_opt, warm, target, device, Phases())

        mem_times, store_times = [], []
        mem_phases, store_phases = Phases(), Phases()
        for r in range(args.rounds):
            part = batches[args.warmup + r * args.steps : args.warmup + (r + 1) * args.steps]
            mem_times.append(run_steps(ref, ref_opt, part, target, device, mem_phases))
            store_times.append(run_steps(emb, store_opt, part, target, device, store_phases))
            print(f"round {r}: in-memory {mem_times[-1] * 1e3:.2f} ms/step, store {store_times[-1] * 1e3:.2f} ms/step, "
                  f"ratio {store_times[-1] / mem_times[-1]:.2f}", flush=True)

        ratios = [s / m for s, m in zip(store_times, mem_times, strict=True)]
        timed_steps = args.rounds * args.steps
        result = {
            "rows": n, "dim": d, "batch": b, "device": str(device), "threads": args.threads,
            "chunk_rows": args.chunk_rows, "cache_mb": round(cache_mb), "rounds": args.rounds, "steps": args.steps,
            "create_s": round(create_s, 2), "store_warmup_s": round(warm_store_s, 2),
            "in_memory_ms_per_step": round(statistics.median(mem_times) * 1e3, 3),
            "store_ms_per_step": round(statistics.median(store_times) * 1e3, 3),
            "in_memory_steps_per_s": round(1 / statistics.median(mem_times), 1),
            "store_steps_per_s": round(1 / statistics.median(store_times), 1),
            "ratio_median": round(statistics.median(ratios), 3),
            "ratio_per_round": [round(x, 3) for x in ratios],
            "in_memory_phase_ms": {k: round(v / timed_steps * 1e3, 3) for k, v in mem_phases.seconds.items()},
            "store_phase_ms": {k: round(v / timed_steps * 1e3, 3) for k, v in store_phases.seconds.items()},
            "store_stats": {k: store.stats()[k] for k in ("hit_rate", "chunks_loaded", "dirty_chunks", "cache_bytes")},
        }
        if not args.no_commit:
            steps_since_commit = args.warmup + timed_steps
            t = time.perf_counter()
            store.commit()
            commit_s = time.perf_counter() - t
            result["commit_s"] = round(commit_s, 2)
            result["commit_ms_per_step_amortized"] = round(commit_s / steps_since_commit * 1e3, 3)
        store.close()
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
