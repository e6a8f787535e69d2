"""``benchmarks/big_training.py --quick`` runs end to end: the store variants (prefetch included) and the memmap
trainer trained, the buffered run merged its buffer and loaded no chunk, and the scratch data was removed. No timing is
asserted (the machine is shared)."""

from __future__ import annotations

import json
import subprocess
import sys

from checkout import ROOT, subprocess_env


def test_big_training_quick_runs_and_cleans_up(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.big_training", "--quick", "--workdir", str(tmp_path),
                           "--variants", "buffer,no_buffer,prefetch"],
                          capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["memmap_rows_per_cpu_s"] > 0
    for variant in ("buffer", "no_buffer", "prefetch"):
        assert result[variant]["rows_per_cpu_s"] > 0 and result[variant]["disk_x_table_max"] > 0, result
    assert result["buffer"]["merges"] > 0 and result["no_buffer"]["merges"] == 0, result
    assert not list(tmp_path.iterdir()), "the scratch data was left behind"
