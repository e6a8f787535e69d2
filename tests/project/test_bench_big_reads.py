"""``benchmarks/big_reads.py`` runs end to end at a small scale: every target ran, ours returned memmap's rows,
and no batch the DataLoader workers read beside a committing writer was torn. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys

from checkout import ROOT, subprocess_env


def test_big_reads_runs_at_a_small_scale(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.big_reads", "--rows", "30000", "--rounds", "1",
                           "--scale", "25", "--cache-mb", "2", "--workdir", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=subprocess_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = [json.loads(line) for line in (out / "big_reads.jsonl").read_text().splitlines()]
    assert {r["target"] for r in results} == {"batch", "row", "workers"}
    for r in results:
        assert r["identical"] is True and r["ratio"] > 0 and r["cpu_ratio"] > 0, r
    reads = [r for r in results if r["target"] in ("batch", "row")]
    assert all(r["map_rows"] > 0 and r["chunks_loaded"] == 0 for r in reads)  # read in place, nothing loaded
    (workers,) = [r for r in results if r["target"] == "workers"]
    assert workers["ours_torn"] == 0
    assert "| batch:" in (out / "big_reads.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("bench-big-reads-")]  # the table was removed
