"""``verify``: check every chunk and the metadata of a store, without opening it for writing.

It reads one consistent snapshot, so it is safe while a writer trains. It reads every
chunk of every column and of the IDs, checks checksums, row counts, chunk versions, that
no chunk lies beyond the last row, that the IDs are unique, and that the metadata parses;
it keeps going after a bad chunk so the report lists all of them. Memory: one chunk at a
time, plus the IDs (8 bytes per row) for the uniqueness check.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from ..errors import CorruptionError
from ..format.chunks import ID_DTYPE, chunk_key, key_index
from ..format.records import MAIN, check_store_dir
from ..format.snapshot import Snapshot
from ..results import VerifyReport
from .progress import bar

_SHOWN_DUPLICATES = 10


def new_report(path: str, **fields) -> tuple[dict, Callable[[str, int | None, str], None]]:
    """An empty verify report for ``path`` and the function that records a problem in it."""
    report = {"path": path, "ok": True, "problems": [], "bad_chunks": [], "chunks_checked": 0, **fields}

    def problem(part: str, chunk: int | None, error: str) -> None:
        report["problems"].append({"part": part, "chunk": chunk, "error": error})

    return report, problem


def verify_store(path: str, *, progress: bool = False) -> VerifyReport:
    """Check the whole store; returns a report with ``ok`` and the list of ``problems``."""
    path = os.path.abspath(path)
    check_store_dir(path)
    report, problem = new_report(path)
    try:
        snap = Snapshot(path)
    except CorruptionError as exc:
        problem("metadata", None, str(exc))
        report["ok"] = False
        return report
    with snap:
        layout = snap.layout
        report.update(rows=layout.rows, dim=layout.dim, dtype=layout.dtype.name, chunk_rows=layout.chunk_rows,
                      chunks=layout.n_chunks, commit=layout.commit, columns=[c.name for c in layout.columns])
        all_ids = np.empty(layout.rows, ID_DTYPE)
        with bar(layout.rows * layout.row_bytes, "verify", progress) as pbar:
            for chunk in range(layout.n_chunks):
                n = layout.chunk_len(chunk)
                start = chunk * layout.chunk_rows
                ids = _check_value(snap, problem, "ids", snap.ids_db, chunk, 1, ID_DTYPE, n, True, layout.commit)
                if ids is not None:
                    all_ids[start : start + n] = ids[:, 0]
                else:
                    all_ids[start : start + n] = np.iinfo(np.int64).min  # unknown: excluded below
                for column in layout.columns:
                    _check_value(snap, problem, f"column {column.name!r}", snap.db_of(column), chunk, column.width,
                                 column.dtype, n, column.name == MAIN, layout.commit)
                snap.release_pages()
                report["chunks_checked"] += 1
                pbar.update(n * layout.row_bytes)
        _check_extra_chunks(snap, problem, layout.n_chunks)
        _check_unique(all_ids[all_ids != np.iinfo(np.int64).min], problem)
    report["ok"] = not report["problems"]
    report["bad_chunks"] = sorted({p["chunk"] for p in report["problems"] if p["chunk"] is not None})
    return report


def _check_value(snap, problem, part, db, chunk, width, dtype, n, required, commit):
    """Decode one chunk value; record what is wrong with it; return its rows or None."""
    try:
        found = snap.read(db, chunk, width, dtype)
    except CorruptionError as exc:
        problem(part, chunk, str(exc).split(": ", 1)[-1])
        return None
    if found is None:
        if required:
            problem(part, chunk, "missing")
        return None
    header, rows = found
    if len(rows) > n or (required and len(rows) != n):
        problem(part, chunk, f"holds {len(rows)} rows, expected {n}")
        return None
    if header.version > commit:
        problem(part, chunk, f"written by commit {header.version}, after the store's last commit {commit}")
    if not np.isfinite(rows).all() and dtype.kind == "f":
        problem(part, chunk, "holds NaN or inf values")
    return rows


def _check_extra_chunks(snap, problem, n_chunks: int) -> None:
    dbs = [("ids", snap.ids_db)] + [(f"column {c.name!r}", snap.db_of(c)) for c in snap.layout.columns]
    for part, db in dbs:
        if db is None:
            continue
        with snap.txn.cursor(db=db) as cursor:
            if not cursor.set_range(chunk_key(n_chunks)):
                continue
            for key in cursor.iternext(values=False):
                try:
                    index = key_index(key)
                except Exception:
                    problem(part, None, f"unexpected key {bytes(key)!r}")
                    continue
                problem(part, index, "lies beyond the last row")


def _check_unique(ids: np.ndarray, problem) -> None:
    if len(ids) < 2:
        return
    ordered = np.sort(ids)
    dup = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if len(dup):
        shown = ", ".join(str(int(x)) for x in dup[:_SHOWN_DUPLICATES])
        problem("ids", None, f"{len(dup)} id(s) appear more than once: {shown}")
