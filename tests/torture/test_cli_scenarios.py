"""The command-line tool under kills and damaged input (SPEC "Command-line tool").

* ``compact`` and ``restore`` killed with SIGKILL at random moments: the target holds the
  old store, the complete new one, or (fresh restore) nothing -- never a half store.
* ``restore`` fed randomly truncated, flipped and extended dumps (both formats): every
  case ends in a clean one-line error with nothing left behind, or a bit-exact store.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time

import numpy as np
import pytest
import torture_lib as tl

import lmdb_embeddings as le

pytestmark = pytest.mark.torture

KILLS = tl.knob("cli_kills", 6, 60)
FUZZ_CASES = tl.knob("restore_fuzz_cases", 150, 2000)
FUZZ_WORKERS = tl.knob("restore_fuzz_workers", 1, 4)


def leftovers(directory: str, name: str) -> list[str]:
    return [n for n in os.listdir(directory) if n.startswith(f".{name}.")]


def timed_cli(*args: str) -> float:
    t0 = time.monotonic()
    proc = tl.cli(*args)
    assert proc.returncode == 0, proc.stderr
    return time.monotonic() - t0


def kill_at_random(args: list[str], duration: float, rng: random.Random) -> float:
    delay = rng.uniform(0, 1.3 * duration)
    proc = tl.spawn_cli(*args)
    time.sleep(delay)
    tl.kill9(proc)
    return delay


def test_kill9_during_compact(tmp_path):
    path = str(tmp_path / "store")
    rows = tl.knob("compact_rows", 200_000, 100_000)
    le.EmbeddingStore.create(path, rows, 32, init="zeros").close()
    assert tl.run_child("rounds", path, "--max-rounds", "3", timeout=300).returncode == 0  # leaves free pages
    want_ids, want = tl.read_table(path)
    reference = str(tmp_path / "reference")
    assert tl.cli("dump", path, reference + ".led").returncode == 0
    assert tl.cli("restore", reference + ".led", reference).returncode == 0
    tl.run_child("rounds", reference, "--max-rounds", "1", timeout=300)  # free pages in the reference too
    duration = timed_cli("--quiet", "compact", reference)
    rng = random.Random(5)
    bad, kills = [], 0
    for kill in range(KILLS):
        kill_at_random(["--quiet", "compact", path], duration, rng)
        kills += 1
        try:
            ids, got = tl.read_table(path)
        except Exception as exc:
            bad.append(f"kill {kill}: store unreadable after a killed compact: {exc}")
            continue
        if not (np.array_equal(ids, want_ids) and np.array_equal(got, want)):
            bad.append(f"kill {kill}: compact changed the table")
        proc = tl.cli("--quiet", "verify", path)
        if proc.returncode != 0:
            bad.append(f"kill {kill}: verify after a killed compact: {proc.stdout}{proc.stderr}")
        tl.run_child("rounds", path, "--max-rounds", "1", timeout=300)  # new free pages, table value + 1
        want = want + 1
    left = leftovers(str(tmp_path), "store")
    proc = tl.cli("--quiet", "compact", path)  # the next operation removes what killed ones left
    left_after = leftovers(str(tmp_path), "store")
    tl.record("crash: kill -9 during compact", kills=kills, kills_survived=kills - len(bad),
              inconsistent_opens=len(bad), rows_lost=0, leftover_temp_dirs=len(left),
              leftover_after_next_compact=len(left_after))
    assert not bad, "\n".join(bad)
    assert proc.returncode == 0, proc.stderr
    assert left_after == [], f"hidden copies left by killed compacts were not cleaned up: {left_after}"


@pytest.mark.parametrize("over_existing", [False, True], ids=["fresh", "force"])
def test_kill9_during_restore(tmp_path, over_existing):
    src = str(tmp_path / "src")
    rows = tl.knob("restore_rows", 200_000, 100_000)
    values = np.arange(rows * 16, dtype=np.float32).reshape(rows, 16)
    le.EmbeddingStore.create(src, np.arange(rows) * 7 - 3, 16, init=values).close()
    dump = str(tmp_path / "dump.led")
    assert tl.cli("--quiet", "dump", src, dump).returncode == 0
    old_values = np.zeros((1000, 16), np.float32)
    rng = random.Random(11 + over_existing)
    duration = timed_cli("--quiet", "restore", dump, str(tmp_path / "timing"))
    bad, kills, outcomes = [], 0, {"absent": 0, "old": 0, "new": 0}
    target = str(tmp_path / "target")
    left = 0
    for kill in range(KILLS):
        shutil.rmtree(target, ignore_errors=True)
        if over_existing:
            le.EmbeddingStore.create(target, 1000, 16, init="zeros").close()
        args = ["--quiet", "restore", *(["--force"] if over_existing else []), dump, target]
        kill_at_random(args, duration, rng)
        kills += 1
        left += len(leftovers(str(tmp_path), "target"))
        if not os.path.exists(target) or not os.listdir(target):
            outcomes["absent"] += 1
            if over_existing:
                bad.append(f"kill {kill}: the old store vanished")
            continue
        try:
            ids, got = tl.read_table(target)
        except Exception as exc:
            bad.append(f"kill {kill}: a half store at the target: {type(exc).__name__}: {exc}")
            continue
        if np.array_equal(ids, np.arange(rows) * 7 - 3) and np.array_equal(got, values):
            outcomes["new"] += 1
        elif over_existing and np.array_equal(ids, np.arange(1000)) and np.array_equal(got, old_values):
            outcomes["old"] += 1
        else:
            bad.append(f"kill {kill}: the target holds neither the old nor the restored table")
    proc = tl.cli("--quiet", "restore", "--force", dump, target)
    left_after = leftovers(str(tmp_path), "target")
    tl.record(f"crash: kill -9 during restore ({'--force over a store' if over_existing else 'fresh path'})",
              kills=kills, kills_survived=kills - len(bad), inconsistent_opens=len(bad), rows_lost=0,
              leftover_temp_dirs_seen=left, leftover_after_next_restore=len(left_after), **outcomes)
    assert not bad, "\n".join(bad)
    assert proc.returncode == 0, proc.stderr
    assert left_after == [], f"hidden copies left by killed restores were not cleaned up: {left_after}"


def test_restore_fuzz_damaged_dumps(tmp_path):
    src = str(tmp_path / "src")
    rows = 3000
    values = np.random.default_rng(0).standard_normal((rows, 8)).astype(np.float32)
    with le.EmbeddingStore.create(src, np.arange(rows)[::-1] * 11, 8, init=values, chunk_rows=256) as store:
        store.put([11], values[:1] * 2)
    native, npy = str(tmp_path / "dump.led"), str(tmp_path / "dump_npy")
    assert tl.cli("--quiet", "dump", src, native).returncode == 0
    assert tl.cli("--quiet", "dump", "--format", "npy", src, npy).returncode == 0
    per = -(-FUZZ_CASES // FUZZ_WORKERS)
    workers = [tl.spawn_child("restorefuzz", src, native, npy, str(tmp_path / f"work{w}"), "--cases", per,
                              "--seed", w + 1) for w in range(FUZZ_WORKERS)]
    counts: dict[str, int] = {}
    examples, crashed = [], 0
    for proc in workers:
        out, err = proc.communicate(timeout=3000)
        if proc.returncode != 0:
            crashed += 1
            examples.append(f"fuzz worker died (exit {proc.returncode}): {err[-2000:]}")
            continue
        result = json.loads(out.strip().splitlines()[-1])
        for k, v in result["counts"].items():
            counts[k] = counts.get(k, 0) + v
        examples += result["examples"]
    cases = sum(counts.values())
    unclean = cases - counts.get("exact", 0) - counts.get("clean", 0) + crashed
    tl.record("fuzz: restore of damaged dumps", fuzz_cases=cases, clean_errors=counts.get("clean", 0),
              exact_restores=counts.get("exact", 0), unclean_failures=unclean, **{
                  k: v for k, v in counts.items() if k not in ("exact", "clean")})
    assert crashed == 0 and cases == per * FUZZ_WORKERS, examples
    assert unclean == 0, json.dumps(examples, indent=1)[:6000]
