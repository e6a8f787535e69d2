"""``verify``: check every chunk and the metadata of a store, without opening it for writing.

It reads one consistent snapshot, so it is safe while a writer trains. It reads every
chunk of every column and of the IDs, checks checksums, row counts, chunk versions, that
no chunk lies beyond the last row, that the IDs are unique, and that the metadata parses;
it keeps going after a bad chunk so the report lists all of them (the first
``MAX_LISTED`` problems, and how many more). Work and memory follow the data, not what the
metadata claims: it walks the chunks that are there (a run of missing chunks is one
problem), and holds one chunk at a time plus the IDs found (8 bytes per row) for the
uniqueness check.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Callable, Iterator

import numpy as np

from ..core.inputs import repeated_ids, shown_ids
from ..errors import CorruptionError
from ..format.chunks import ID_DTYPE, chunk_key, key_index
from ..format.records import MAIN, check_store_dir
from ..format.snapshot import Snapshot
from ..progress import bar
from ..results import Problem, VerifyReport

MAX_LISTED = 100  # problems listed in a report; the rest are counted in ``problems_not_listed``


def new_report(path: str, **fields) -> tuple[VerifyReport, Callable[[str, int | None, str], None]]:
    """An empty verify report for ``path`` and the function that records a problem in it.

    The report lists the first ``MAX_LISTED`` problems and counts the others, so a store that
    is damaged everywhere (or claims far more rows than it holds) gives a bounded report.
    """
    report = VerifyReport(path, **fields)

    def problem(part: str, chunk: int | None, error: str) -> None:
        if len(report.problems) < MAX_LISTED:
            report.problems.append(Problem(part, chunk, error))
        else:
            report.problems_not_listed += 1
        report.ok = False

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
        return report
    with snap:
        layout = snap.layout
        report.rows, report.dim, report.dtype = layout.rows, layout.dim, layout.dtype.name
        report.chunk_rows, report.chunks, report.commit = layout.chunk_rows, layout.n_chunks, layout.commit
        report.columns = [c.name for c in layout.columns]
        found_ids = _Ids()
        main = next(c for c in layout.columns if c.name == MAIN)
        expected = 0  # the next chunk that should be there
        with bar(layout.rows * layout.row_bytes, "verify", progress) as pbar:
            for chunk in _chunks_present(snap, [snap.ids_db, snap.db_of(main)], layout.n_chunks):
                _missing(problem, expected, chunk)
                expected = chunk + 1
                n = layout.chunk_len(chunk)
                ids = _check_value(snap, problem, "ids", snap.ids_db, chunk, 1, ID_DTYPE, n, True, layout.commit)
                if ids is not None:
                    found_ids.add(ids[:, 0])
                for column in layout.columns:
                    _check_value(snap, problem, f"column {column.name!r}", snap.db_of(column), chunk, column.width,
                                 column.dtype, n, column.name == MAIN, layout.commit)
                snap.release_pages()
                report.chunks_checked += 1
                pbar.update(n * layout.row_bytes)
        _missing(problem, expected, layout.n_chunks, f"; the state record claims {layout.rows} rows")
        _check_extra_chunks(snap, problem, layout.n_chunks)
        _check_unique(found_ids.array(), problem)
    return finish_report(report, lambda p: p.chunk)


def finish_report(report: VerifyReport, chunk_of: Callable[[Problem], object]) -> VerifyReport:
    """Set ``ok`` and ``bad_chunks`` (those of the listed problems) from the problems recorded."""
    report.ok = not report.problems
    report.bad_chunks = sorted({c for p in report.problems if p.chunk is not None and (c := chunk_of(p)) is not None})
    return report


def _chunks_present(snap: Snapshot, dbs: list, n_chunks: int) -> Iterator[int]:
    """The chunk indices below ``n_chunks`` that any of ``dbs`` holds a key for, ascending (cursor walks)."""
    def keys(db) -> Iterator[int]:
        if db is None:
            return
        with snap.txn.cursor(db=db) as cursor:
            for key in cursor.iternext(values=False):
                if len(key) == len(chunk_key(0)):
                    index = key_index(key)
                    if index >= n_chunks:
                        return
                    yield index

    last = -1
    for index in heapq.merge(*(keys(db) for db in dbs)):
        if index != last:
            yield index
            last = index


def _missing(problem, first: int, stop: int, why: str = "") -> None:
    """Record chunks ``first..stop-1`` (none of their IDs or rows are there) as one problem per part."""
    if stop <= first:
        return
    what = f"missing (chunks {first} to {stop - 1}: {stop - first} chunks{why})" if stop - first > 1 else "missing"
    for part in ("ids", f"column {MAIN!r}"):
        problem(part, first, what)


class _Ids:
    """The IDs found so far, in one growing buffer (memory follows the IDs actually read)."""

    def __init__(self):
        self._buf, self._n = np.empty(1024, ID_DTYPE), 0

    def add(self, ids: np.ndarray) -> None:
        if self._n + len(ids) > len(self._buf):
            grown = np.empty(max(self._n + len(ids), 2 * len(self._buf)), ID_DTYPE)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n : self._n + len(ids)] = ids
        self._n += len(ids)

    def array(self) -> np.ndarray:
        return self._buf[: self._n]


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
    dup = repeated_ids(ids)
    if len(dup):
        problem("ids", None, f"{len(dup)} id(s) appear more than once: {shown_ids(dup)}")
