"""One rank of a distributed test run (started by dist_harness.py).

    python dist_worker.py SCENARIO RANK WORLD PORT WORKDIR ARGS_JSON

Joins a gloo process group on 127.0.0.1:PORT (with a timeout, so a hang fails; ``DIST_PG_TIMEOUT_S``
overrides it), runs ``dist_scenarios.<SCENARIO>(rank, world, workdir, **args)`` (``MODULE:FUNCTION``:
a scenario of another module of tests/) and writes what it returns to ``WORKDIR/result-SCENARIO-RANK.json``.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import sys

import dist_scenarios
import torch
import torch.distributed as dist
from dist_harness import PG_TIMEOUT_S


def main() -> None:
    scenario, rank, world, port, workdir, spec = sys.argv[1:7]
    rank, world = int(rank), int(world)
    torch.set_num_threads(1)
    timeout = float(os.environ.get("DIST_PG_TIMEOUT_S", PG_TIMEOUT_S))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    module, _, name = scenario.rpartition(":")
    run = getattr(importlib.import_module(module) if module else dist_scenarios, name)
    try:
        result = run(rank, world, workdir, **json.loads(spec))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    tmp = os.path.join(workdir, f".result-{scenario}-{rank}.json")
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, os.path.join(workdir, f"result-{scenario}-{rank}.json"))


if __name__ == "__main__":
    main()
