"""Concurrency: one writer, four readers and repeated dumps running together.

The writer puts the whole table to round ``r`` and commits, ROUNDS times. Readers (other
processes, two with a small cache that keeps reloading chunks, two with a cache that
holds the table and must revalidate it) check that every get holds ONE round (no torn
read), that rounds never go backwards, and that they never fail. Meanwhile ``dump``
snapshots the store again and again; every dump must hold one round for every row.
The data file must stop growing: readers may not pin old pages.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torture_lib as tl

import lmdb_embeddings as le

pytestmark = pytest.mark.torture

ROUNDS = tl.knob("concurrency_rounds", 30, 300)
ROWS, DIM = tl.knob("concurrency_rows", 100_000, 100_000), 32


def check_dump(npy_dir: str) -> int | None:
    """The round a dump holds, or None if its rows mix rounds or its IDs are wrong."""
    ids = np.load(os.path.join(npy_dir, "ids.npy"))
    rows = np.load(os.path.join(npy_dir, "embeddings.npy"))
    values = np.unique(rows)
    if not np.array_equal(ids, np.arange(ROWS)) or len(values) != 1:
        return None
    return int(values[0])


def test_writer_readers_and_dumps_together(tmp_path):
    path = str(tmp_path / "store")
    le.EmbeddingStore.create(path, ROWS, DIM, init="zeros", chunk_rows=512).close()
    stop = str(tmp_path / "stop")
    readers = [tl.spawn_child("reader", path, stop, "--seed", k, "--cache-mb", 2 if k < 2 else 64)
               for k in range(4)]
    writer = tl.spawn_child("rounds", path, "--max-rounds", ROUNDS, "--pause", "0.02")
    lines = tl.LineReader(writer)
    dumps, torn_dumps, dump_rounds, dump_errors = 0, 0, [], []
    try:
        while writer.poll() is None:
            target = str(tmp_path / f"dump{dumps}")
            proc = tl.cli("--quiet", "dump", "--format", "npy", path, target, timeout=300)
            lines.poll(0)
            if proc.returncode != 0:
                dump_errors.append(proc.stderr)
                continue
            dumps += 1
            held = check_dump(target)
            torn_dumps += held is None
            dump_rounds.append(held)
            shutil.rmtree(target, ignore_errors=True)
        lines.drain()
        assert writer.wait(timeout=600) == 0, tl.stderr_of(writer)
    finally:
        open(stop, "w").close()
        results = []
        for proc in readers:
            out, err = proc.communicate(timeout=300)
            results.append((proc.returncode, out, err))
        tl.kill9(writer)
    acks = [line.split() for line in lines.lines if line.startswith("ack")]
    sizes = [int(a[3]) for a in acks]
    stats = [json.loads(out.strip().splitlines()[-1]) for rc, out, _ in results if rc == 0]
    torn = sum(s["torn"] for s in stats)
    errors = sum(s["errors"] for s in stats) + sum(rc != 0 for rc, _, _ in results)
    tl.record("concurrency: 1 writer + 4 readers + dumps", rounds=len(acks), reader_gets=sum(s["gets"] for s in stats),
              torn_reads=torn, reader_errors=errors, backwards=sum(s["backwards"] for s in stats),
              dumps=dumps, torn_dumps=torn_dumps, dump_errors=len(dump_errors),
              table_mb=round(ROWS * DIM * 4 / 2**20, 1),
              file_mb_after_5=round(sizes[min(4, len(sizes) - 1)] / 2**20, 1),
              file_mb_final=round(sizes[-1] / 2**20, 1), file_mb_max=round(max(sizes) / 2**20, 1),
              file_mb_by_quarter=[round(sizes[len(sizes) * q // 4 - 1] / 2**20, 1) for q in (1, 2, 3, 4)])
    assert len(acks) == ROUNDS
    assert errors == 0, [err[-1500:] for _, _, err in results]
    assert torn == 0 and sum(s["backwards"] for s in stats) == 0
    assert all(s["gets"] > 0 for s in stats), stats
    assert not dump_errors, dump_errors[:3]
    assert dumps > 0 and torn_dumps == 0, dump_rounds
    assert dump_rounds == sorted(dump_rounds), f"dumps went back in time: {dump_rounds}"
    # the file stops growing: after the first rounds free pages are reused. A dump's read
    # transaction (about a second) pins the pages of the commits made meanwhile, so the
    # plateau is a few table copies higher -- bounded, whatever the number of rounds
    # (300 rounds without reuse would need 300 copies).
    assert max(sizes) <= max(sizes[:5]) + 4 * ROWS * DIM * 4, sizes
