"""``info``: describe a store (table, last commit, LMDB's own figures, the writer) from one snapshot."""

from __future__ import annotations

import datetime
import os

from ..format.chunks import ID_DTYPE
from ..format.records import DATA_FILE, check_store_dir, read_format
from ..format.snapshot import Snapshot
from ..fsutil import allocated_bytes, dir_size
from ..processes.writer_lock import holder_pid
from ..results import StoreInfo


def store_info(path: str) -> StoreInfo:
    """What ``info`` prints: the table, its last commit, LMDB's own figures and the writer."""
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
            "last_commit": (datetime.datetime.fromtimestamp(when, datetime.timezone.utc).isoformat()
                            if isinstance(when, (int, float)) else None),
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

