"""The write buffer under kill -9 and under readers (``core/write_buffer.py``).

A writer with a cache far smaller than its table puts the whole table to round ``r`` in shuffled
batches, so rows go to the row write buffer, which fills and is merged into the pending transaction
again and again before each ONE commit per round. ``--say-merges`` makes the child print ``merge r``
before each merge and ``merged r`` after it, so the kills can be aimed inside merges.

* kill -9 inside a merge: the store opens, verifies, and holds ONE round for every row, the last
  acknowledged one (a merge writes only into the pending transaction: nothing of it is committed).
* readers (other processes) during merges and commits: every get holds one round (0 torn), rounds
  never go backwards, no reader error.
"""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
import torture_lib as tl

import lmdb_embeddings as le

pytestmark = pytest.mark.torture

ROWS, DIM = 40_000, 32  # 5 MiB of rows (20 chunks) through a 2 MiB cache: a 1.5 MiB buffer, ~4 merges per round
CACHE_MB, BATCH = "2", "2048"
KILLS = tl.knob("write_buffer_kills", 6, 60)
READER_ROUNDS = tl.knob("write_buffer_reader_rounds", 8, 60)


def _writer(path: str, *extra: str):
    return tl.spawn_child("rounds", path, "--cache-mb", CACHE_MB, "--shuffled", BATCH, "--say-merges", *extra)


def test_kill9_inside_write_buffer_merges_leaves_the_last_commit(tmp_path):
    path = str(tmp_path / "store")
    le.EmbeddingStore.create(path, ROWS, DIM, init="zeros").close()
    rng = random.Random(19)
    last_ack, inside = 0, 0
    for kill in range(KILLS):
        writer = _writer(path)
        lines = tl.LineReader(writer)
        opened = lines.wait_for("open", 120)
        assert opened is not None, tl.stderr_of(writer)
        assert int(opened.split()[1]) == last_ack, f"kill {kill}: reopened at {opened}, acknowledged {last_ack}"
        for _ in range(rng.randint(1, 20)):  # into the first round or a later one
            if lines.wait_for("merge ", 120) is None:
                break
        lines.sleep(rng.uniform(0, 0.004))
        tl.kill9(writer)
        lines.drain()
        inside += bool(lines.lines) and lines.lines[-1].startswith("merge ")
        acks = [int(line.split()[1]) for line in lines.lines if line.startswith("ack")]
        if acks:
            last_ack = max(acks)
        committing = [int(line.split()[1]) for line in lines.lines if line.startswith("commit")]
        _, rows = tl.read_table(path)
        values = np.unique(rows)
        assert len(values) == 1, f"kill {kill}: rows of several rounds {values[:10]} after a kill"
        # the last acknowledged round, or the one whose commit() had begun when the kill came
        assert last_ack <= values[0] <= max([last_ack, *committing]), (kill, values[0], last_ack, committing)
        last_ack = int(values[0])
        problem = tl.verify_cli(path)
        assert problem is None, f"kill {kill}: {problem}"
    # reached only if every kill left exactly one acknowledged round that verifies
    tl.record("write buffer: kill -9 inside merges", kills=KILLS, kills_survived=KILLS, rows_lost=0,
              inconsistent_opens=0, kills_inside_merge=inside, last_round=last_ack)
    assert inside > 0, "no kill landed inside a merge: the scenario proved nothing"


def test_readers_see_no_torn_rows_while_a_buffered_writer_merges_and_commits(tmp_path):
    path = str(tmp_path / "store")
    le.EmbeddingStore.create(path, ROWS, DIM, init="zeros").close()
    stop = str(tmp_path / "stop")
    readers = [tl.spawn_child("reader", path, stop, "--seed", k, "--cache-mb", 1 if k == 0 else 64)
               for k in range(2)]
    writer = _writer(path, "--max-rounds", READER_ROUNDS)
    lines = tl.LineReader(writer)
    try:
        deadline = time.monotonic() + 600
        while writer.poll() is None and time.monotonic() < deadline:  # read its lines: a full pipe would block it
            lines.poll(0.1)
        lines.drain()
        assert writer.wait(timeout=5) == 0, tl.stderr_of(writer)
    finally:
        open(stop, "w").close()
        results = [proc.communicate(timeout=300) + (proc.returncode,) for proc in readers]
        tl.kill9(writer)
    stats = [json.loads(out.strip().splitlines()[-1]) for out, _, rc in results if rc == 0]
    assert len(stats) == len(readers), [err[-1500:] for _, err, _ in results]
    merges = sum(line.startswith("merged") for line in lines.lines)
    tl.record("write buffer: readers during merges", rounds=READER_ROUNDS, merges=merges,
              reader_gets=sum(s["gets"] for s in stats), torn_reads=sum(s["torn"] for s in stats),
              backwards=sum(s["backwards"] for s in stats), reader_errors=sum(s["errors"] for s in stats))
    assert merges >= READER_ROUNDS, "the writer did not merge its buffer"
    assert sum(s["errors"] for s in stats) == 0
    assert sum(s["torn"] for s in stats) == 0 and sum(s["backwards"] for s in stats) == 0
    assert all(s["gets"] > 0 for s in stats), stats
    with le.EmbeddingStore.open(path, readonly=True) as reader:
        assert np.unique(reader.get(reader.ids)).tolist() == [float(READER_ROUNDS)]
