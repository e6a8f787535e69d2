"""``verify``: check every chunk and the metadata of a store, without opening it for writing.

It reads one consistent snapshot, so it is safe while a writer trains. It reads every
chunk of every column and of the IDs, checks checksums, row counts, chunk versions, that
no chunk lies beyond the last row, that the IDs are unique, and that the metadata parses;
it keeps going after a bad chunk so the report lists all of them (the first
``MAX_LISTED`` problems, and how many more). Work and memory follow the data, not what the
metadata claims: it walks the chunks that are there (a run of missing chunks is one
problem), and holds one chunk at a time plus the IDs found (8 bytes per row) for the
uniqueness check.

A sharded store's directory: every shard is verified so, then what ties them together (the
manifest, the commit each shard holds, the same columns everywhere, every ID on its owner, the
global row positions a permutation); a bad chunk is named "shard R chunk C".
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Callable, Iterator

import numpy as np

from ..errors import CorruptionError, EmbeddingStoreError
from ..format.chunks import ID_DTYPE, chunk_key, key_index
from ..format.records import MAIN, check_store_dir, is_store
from ..inputs import repeated_ids, shown_ids
from ..processes.snapshot import Snapshot
from ..progress import bar
from ..results import Problem, VerifyReport
from ..sharding.manifest import RESERVED_PREFIX, Manifest, is_sharded, read_manifest
from ..sharding.ownership import owner_of
from ..sharding.snapshot import ShardedSnapshot, row_column, shard_mismatch_at

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
    """Check the whole store, plain or sharded; returns a report with ``ok`` and the list of ``problems``."""
    return _verify_sharded(path, progress) if is_sharded(path) else _verify_plain(path, progress)


def _verify_plain(path: str, progress: bool) -> VerifyReport:
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


# ------------------------------------------------------------------ a sharded store
def _verify_sharded(path: str, progress: bool) -> VerifyReport:
    """``verify`` every shard, then what ties them together: the manifest, the commit each shard holds,
    the same columns everywhere, every ID on its owner, the global row positions a permutation."""
    path = os.path.abspath(path)
    report, problem = new_report(path, sharded=True)
    try:
        manifest = read_manifest(path)
    except CorruptionError as exc:
        problem("manifest", None, str(exc))
        return report
    report.rows, report.dim, report.dtype = manifest.rows, manifest.dim, manifest.dtype
    report.chunk_rows, report.commit, report.world_size = manifest.chunk_rows, manifest.commit, manifest.world_size
    report.columns = []
    for rank in range(manifest.world_size):
        shard_path = manifest.shard_path(path, rank)
        if not is_store(shard_path):
            problem(f"shard {rank}", None, f"{shard_path} is missing or not a store")
            continue
        shard = _verify_plain(shard_path, progress)
        report.chunks_checked += shard.chunks_checked
        report.columns = report.columns or [c for c in shard.columns or [] if not c.startswith(RESERVED_PREFIX)]
        for p in shard.problems:
            problem(f"shard {rank} {p.part}", p.chunk, p.error)
        report.problems_not_listed += shard.problems_not_listed
        if shard.ok and (mismatch := shard_mismatch_at(path, manifest, rank)) is not None:
            problem(f"shard {rank}", None, mismatch)
    if not report.problems:
        _check_shards_together(path, manifest, problem)
    return finish_report(report, lambda p: f"shard {p.part.split()[1]} chunk {p.chunk}"
                         if p.part.startswith("shard ") else None)


def _check_shards_together(path: str, manifest: Manifest, problem) -> None:
    try:
        snap = ShardedSnapshot(path, wait_s=0.0)
    except EmbeddingStoreError as exc:
        problem("shards", None, str(exc))
        return
    with snap:
        positions = np.zeros(manifest.rows, bool)
        for rank, shard in enumerate(snap.shards):
            layout = shard.layout
            rows_spec = row_column(layout)
            for chunk in range(layout.n_chunks):
                ids = shard.ids_chunk(chunk)
                wrong = ids[owner_of(ids, manifest.world_size, manifest.buckets) != rank]
                if len(wrong):
                    problem(f"shard {rank} ids", chunk, f"{len(wrong)} id(s) of other ranks: {wrong[:5].tolist()}")
                rows = shard.column_chunk(chunk, rows_spec)[:, 0]
                pos = rows.astype(np.int64)
                if ((pos != rows).any() or (pos < 0).any() or (pos >= manifest.rows).any()
                        or len(np.unique(pos)) != len(pos) or positions[pos].any()):
                    problem(f"shard {rank} column {rows_spec.name!r}", chunk, "global row positions out of range or "
                                                                              "given twice")
                    continue
                positions[pos] = True
                shard.release_pages()
        if not positions.all():
            problem("shards", None, f"{int((~positions).sum())} global row position(s) held by no shard")
