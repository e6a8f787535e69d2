"""Memory is bounded by the cache: a writer's anonymous memory does not grow with the table.

A child process rewrites, then grows, a table to 8x its cache budget between two commits
(ONE commit at the end), sampling its own peak RssAnon in a thread; with ``writemap`` the
pending transaction lives in the file's shared mapping, not in private copies. The same
pass with ``writemap=False`` (LMDB's malloc'd dirty pages) is the control: it must exceed
the bound, or this test would prove nothing.
"""

from __future__ import annotations

import json

from checkout import run_python

CACHE_MB, TABLE_MB = 16, 128  # the table ends 8x larger than the cache
OVERHEAD_MB = 110  # interpreter + numpy + lmdb + msgpack, measured ~60 MiB, with room

CHILD = r"""
import json, sys, threading, time
import numpy as np
import lmdb_embeddings as le

def anon_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

peak = [anon_kib()]
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], anon_kib())
        time.sleep(0.005)

path, writemap, cache_mb, table_mb = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3]), int(sys.argv[4])
dim, chunk_rows = 128, 256
rows = table_mb * (1 << 20) // (dim * 4)
store = le.EmbeddingStore.create(path, rows // 8, dim, chunk_rows=chunk_rows, init="zeros", cache_mb=cache_mb,
                                 writemap=writemap)
base = anon_kib()
threading.Thread(target=sample, daemon=True).start()
batch = 8192
for start in range(0, rows // 8, batch):  # rewrite what is there ...
    ids = np.arange(start, min(start + batch, rows // 8))
    store.put(ids, np.full((len(ids), dim), 1.0, np.float32))
for start in range(rows // 8, rows, batch):  # ... then grow it to 8x the cache, no commit in between
    store.add(np.arange(start, min(start + batch, rows)), np.full((min(batch, rows - start), dim), 2.0, np.float32))
spilled = store.stats()["spilled_chunks"]  # the changes went into the pending transaction, not the cache
store.commit()
stop.set()
peak[0] = max(peak[0], anon_kib())
store.close()
with le.EmbeddingStore.open(path, readonly=True, cache_mb=cache_mb) as reader:
    ok = len(reader) == rows and float(reader.get([0])[0, 0]) == 1.0 and float(reader.get([rows - 1])[0, 0]) == 2.0
print(json.dumps({"base_mb": base / 1024, "peak_mb": peak[0] / 1024, "spilled": spilled, "ok": ok}))
"""


def _run(tmp_path, writemap: bool) -> dict:
    proc = run_python(CHILD, str(tmp_path / f"store-{int(writemap)}"), "1" if writemap else "0", str(CACHE_MB),
                      str(TABLE_MB), timeout=300)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_rss_anon_stays_within_the_cache_while_the_table_grows_8x_past_it(tmp_path):
    seen = _run(tmp_path, writemap=True)
    assert seen["ok"] and seen["spilled"] > 0, seen
    assert seen["peak_mb"] <= CACHE_MB + OVERHEAD_MB, seen


def test_the_control_without_writemap_does_exceed_the_bound(tmp_path):
    seen = _run(tmp_path, writemap=False)
    assert seen["ok"], seen
    assert seen["peak_mb"] > CACHE_MB + OVERHEAD_MB, seen
