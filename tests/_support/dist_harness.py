"""Launching real multi-rank runs for the distributed tests: W local processes on a gloo group.

``launch(scenario, world, workdir, **args)`` starts ``dist_worker.py`` once per rank (real
subprocesses, ``OMP_NUM_THREADS=1``, ``init_method=tcp://127.0.0.1:<free port>``, a
process-group timeout), waits for all of them within ``timeout`` seconds (killing them all
if any hangs), and returns every rank's result (the JSON its scenario function returned).
A rank that fails makes the launch fail with every rank's output.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from checkout import ROOT

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dist_worker.py")
DIST_TRAINING = {2: ["SparseAdam", "SparseAdagrad", "SparseSGD", "SparseAdamW"], 4: ["SparseAdam", "SparseAdagrad"]}
PG_TIMEOUT_S = 30  # a rank stuck in a collective fails after this instead of hanging


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def start(scenario: str, world: int, workdir: str, **args) -> list[subprocess.Popen]:
    """Start every rank of a run; the caller waits for (or kills) them."""
    os.makedirs(workdir, exist_ok=True)
    port = free_port()
    spec = json.dumps(args)
    return [subprocess.Popen([sys.executable, WORKER, scenario, str(rank), str(world), str(port), workdir, spec],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=worker_env(), cwd=ROOT)
            for rank in range(world)]


def launch(scenario: str, world: int, workdir: str, timeout: float = 120, **args) -> list[dict]:
    procs = start(scenario, world, workdir, **args)
    deadline = time.monotonic() + timeout
    outputs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            details = [p.communicate()[1][-3000:] for p in procs]
            raise AssertionError(f"{scenario} with {world} ranks did not finish within {timeout} s:\n"
                                 + "\n".join(details)) from None
        outputs.append((proc.returncode, out, err))
    if any(rc != 0 for rc, _, _ in outputs):
        text = "\n".join(f"--- rank {r} exit {rc}\n{out[-2000:]}\n{err[-5000:]}"
                         for r, (rc, out, err) in enumerate(outputs))
        raise AssertionError(f"{scenario} with {world} ranks failed:\n{text}")
    results = []
    for rank in range(world):
        with open(os.path.join(workdir, f"result-{scenario}-{rank}.json")) as f:
            results.append(json.load(f))
    return results
