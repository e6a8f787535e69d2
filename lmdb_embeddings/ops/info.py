"""``info``: describe a store (table, last commit, LMDB's own figures, the writer) from one snapshot.

A sharded store's directory is described as the table its shards hold together: the same keys,
its figures summed over the shards, plus ``sharded`` (the world size and each shard's figures).
"""

from __future__ import annotations

import datetime
import os

from ..errors import CorruptionError
from ..format.chunks import ID_DTYPE
from ..format.records import DATA_FILE, FORMAT_VERSION, check_store_dir, read_format
from ..fsutil import allocated_bytes, dir_size
from ..processes.snapshot import Snapshot
from ..processes.writer_lock import holder_pid
from ..results import StoreInfo
from ..sharding.manifest import RESERVED_PREFIX, is_sharded, read_manifest
from ..sharding.snapshot import shard_mismatch_at


def store_info(path: str) -> StoreInfo:
    """What ``info`` prints: the table, its last commit, LMDB's own figures and the writer, of a plain store or
    a sharded store's directory."""
    return _sharded_info(path) if is_sharded(path) else _plain_info(path)


def _plain_info(path: str) -> StoreInfo:
    path = os.path.abspath(path)
    check_store_dir(path)
    with Snapshot(path) as snap:
        layout = snap.layout
        env = snap.shared_env.env
        txn = snap.txn
        stats = [env.stat()]
        names = [bytes(k) for k in txn.cursor().iternext(values=False)]
        for name in names:
            handle = snap.shared_env.cached_db(name)
            if handle is not None:
                stats.append(txn.stat(handle))
        lmdb_info = env.info()
        psize = stats[0]["psize"]
        pages_in_use = lmdb_info["last_pgno"] + 1
        table_pages = sum(s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"] for s in stats)
        holder = holder_pid(path)
        when = layout.committed_at
        data_file = os.path.join(path, DATA_FILE)
        fmt = read_format(txn, snap.meta_db, path)
        return {
            "path": path, "rows": layout.rows, "dim": layout.dim, "dtype": layout.dtype.name,
            "chunk_rows": layout.chunk_rows, "chunks": layout.n_chunks,
            "columns": {c.name: c.describe() for c in layout.aux_columns()},
            "format_version": fmt["format_version"], "commit_count": layout.commit,
            "last_commit": _utc_iso(when),
            "last_commit_unix": when,
            "attrs": sorted(layout.attrs),
            "bytes_on_disk": dir_size(path), "data_file_bytes": allocated_bytes(data_file),
            "data_file_size": os.path.getsize(data_file), "committed_bytes": pages_in_use * psize,
            "table_bytes": layout.rows * (layout.row_bytes + ID_DTYPE.itemsize),
            "lmdb": {"page_size": psize, "map_size": lmdb_info["map_size"], "pages_in_use": pages_in_use,
                     "pages_in_tables": table_pages, "free_pages": max(0, pages_in_use - 2 - table_pages),
                     "readers": lmdb_info["num_readers"], "max_readers": lmdb_info["max_readers"],
                     "databases": [n.decode(errors="replace") for n in names]},
            "writer_pid": holder, "writer_active": holder is not None,
            "init": layout.config.get("init"), "seed": layout.config.get("seed"),
        }


def _sharded_info(path: str) -> StoreInfo:
    """The info of a whole sharded store: the same keys, summed over its shards, plus ``sharded``."""
    path = os.path.abspath(path)
    manifest = read_manifest(path)
    for rank in range(manifest.world_size):
        problem = shard_mismatch_at(path, manifest, rank)
        if problem is not None:
            raise CorruptionError(problem)
    shards = [_plain_info(manifest.shard_path(path, r)) for r in range(manifest.world_size)]
    first = shards[0]
    lm = {k: sum(s["lmdb"][k] for s in shards) for k in ("map_size", "pages_in_use", "pages_in_tables",
                                                          "free_pages", "readers")}
    lm["page_size"] = first["lmdb"]["page_size"]
    writers = [s["writer_pid"] for s in shards if s["writer_pid"] is not None]
    when = manifest.committed_at
    summed = {k: sum(s[k] for s in shards) for k in ("bytes_on_disk", "data_file_bytes", "data_file_size",
                                                       "committed_bytes", "table_bytes")}
    return {
        "path": path, "rows": manifest.rows, "dim": manifest.dim, "dtype": manifest.dtype,
        "chunk_rows": manifest.chunk_rows, "chunks": -(-manifest.rows // manifest.chunk_rows),
        "columns": {n: d for n, d in first["columns"].items() if not n.startswith(RESERVED_PREFIX)},
        "format_version": FORMAT_VERSION, "commit_count": manifest.commit,
        "last_commit": _utc_iso(when),
        "last_commit_unix": when, "attrs": sorted(a for a in first["attrs"] if not a.startswith(RESERVED_PREFIX)),
        **summed, "lmdb": lm, "writer_pid": writers[0] if writers else None, "writer_active": bool(writers),
        "init": manifest.init, "seed": manifest.seed,
        "sharded": {"world_size": manifest.world_size, "buckets": manifest.buckets, "hash": "splitmix64",
                    "shards": [{"rank": r, "path": s["path"], "rows": s["rows"], "bytes_on_disk": s["bytes_on_disk"],
                                "writer_pid": s["writer_pid"]} for r, s in enumerate(shards)]},
    }


def _utc_iso(when) -> str | None:
    """A commit's unix time as an ISO 8601 UTC string (None when the store did not record one)."""
    return datetime.datetime.fromtimestamp(when, datetime.timezone.utc).isoformat() if isinstance(when, (int, float)) \
        else None
