"""ShardedSnapshot: one decided global commit of a sharded store, read as ONE table in single-store row order.

Each shard is read in one read transaction (``processes.snapshot.Snapshot``); the shards are
checked to hold the same global commit as the manifest read after them (a writer job
between its two phases is waited for, briefly). The rows come out in the order a plain
store with the same history would hold them: every shard keeps its rows in ascending
global position (its ``dist.row`` column), so each global chunk is a merge of the shards'
next rows. It is a ``format.layout.TableSource``, so ``dump`` of a sharded directory is the
same ``copy_table`` into the same sinks as a plain store's, and writes the same dump: a dump
restores into any world size or a plain store, bit-exact. No torch, no process group.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import numpy as np

from ..errors import CorruptionError, EmbeddingStoreError
from ..format.layout import ColumnSpec, TableLayout
from ..format.records import check_store_dir
from ..processes.snapshot import Snapshot
from ..processes.writer_lock import holder_pid
from .manifest import COMMIT_ATTR, RESERVED_PREFIX, ROW_COLUMN, Manifest, read_manifest
from .ownership import owner_of

WAIT_S = 10.0  # a snapshot waits this long for a commit in progress (a training job) to be decided


class ShardedSnapshot:
    """The committed global table of the sharded store at ``path`` (a ``TableSource``; context manager).

    Raises:
        EmbeddingStoreError: a shard holds a commit that is not decided and nobody is
            committing (a crashed job: open the store writable once to recover it).
    """

    def __init__(self, path: str, wait_s: float = WAIT_S):
        self.path = os.path.abspath(path)
        self._snaps: list[Snapshot] = []
        deadline = time.monotonic() + wait_s
        while True:
            manifest = read_manifest(self.path)
            self._open_all(manifest)
            held = [held_commit(s) for s in self._snaps]
            decided = read_manifest(self.path)
            if all(h == decided.commit for h in held):
                break
            self.close()
            undecided = [r for r, h in enumerate(held) if h != decided.commit]
            writers = [holder_pid(manifest.shard_path(self.path, r)) for r in undecided]
            if all(w is None for w in writers) or time.monotonic() > deadline:
                raise EmbeddingStoreError(
                    f"{self.path}: shard(s) of rank(s) {undecided} hold commit(s) {[held[r] for r in undecided]}, "
                    f"the manifest commit {decided.commit}: "
                    + ("a commit is in progress; retry" if any(w is not None for w in writers) else
                       "a commit was interrupted; open the store with ShardedEmbeddingStore.open (writable) once "
                       "to recover it"))
            time.sleep(0.1)
        self.manifest = decided
        for rank, snap in enumerate(self._snaps):
            problem = shard_mismatch(snap, decided, self.path, rank)
            if problem is not None:
                self.close()
                raise CorruptionError(problem)
        self.layout = _global_layout(self.path, decided, self._snaps)

    @property
    def shards(self) -> list[Snapshot]:
        """Each rank's shard snapshot (all at the same global commit)."""
        return list(self._snaps)

    def _open_all(self, manifest: Manifest) -> None:
        try:
            for rank in range(manifest.world_size):
                self._snaps.append(Snapshot(manifest.shard_path(self.path, rank)))
        except BaseException:
            self.close()
            raise

    def id_chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(global chunk, IDs) for every chunk, in order."""
        for chunk, ids, _ in _merged(self._snaps, self.manifest, self.layout, ()):
            yield chunk, ids

    def chunks(self) -> Iterator[tuple[int, list[np.ndarray]]]:
        """(global chunk, one array per column in layout order) for every chunk, in order."""
        for chunk, _, parts in _merged(self._snaps, self.manifest, self.layout, self.layout.columns):
            yield chunk, parts

    def close(self) -> None:
        for snap in self._snaps:
            snap.close()
        self._snaps = []

    def __enter__(self) -> ShardedSnapshot:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shard_mismatch(snap: Snapshot, manifest: Manifest, root: str, rank: int) -> str | None:
    """Why the shard read by ``snap`` does not belong under rank ``rank`` of ``manifest`` (None if it does).

    The shape, the shard's own column and attr, and the owner of the IDs of its first and last
    chunks (a swapped shard holds only another rank's IDs; ``verify`` and ``dump`` check every chunk).
    """
    layout = snap.layout
    sample = [snap.ids_chunk(c) for c in sorted({0, layout.n_chunks - 1})] if layout.n_chunks else []
    return manifest.shard_problem(root, rank, layout.dim, layout.dtype.name, layout.chunk_rows,
                                  [c.name for c in layout.columns], layout.attrs, sample)


def shard_mismatch_at(root: str, manifest: Manifest, rank: int) -> str | None:
    """:func:`shard_mismatch` of rank ``rank``'s shard directory, read in a snapshot of its own."""
    shard_path = manifest.shard_path(root, rank)
    check_store_dir(shard_path)
    with Snapshot(shard_path) as snap:
        return shard_mismatch(snap, manifest, root, rank)


def held_commit(snap: Snapshot) -> int:
    """The global commit a shard's snapshot holds (its ``dist.commit`` attr)."""
    return int(snap.layout.attrs.get(COMMIT_ATTR, 0))


def row_column(layout: TableLayout) -> ColumnSpec:
    """A shard's ``dist.row`` column (global row positions)."""
    return next(c for c in layout.columns if c.name == ROW_COLUMN)


def _global_layout(path: str, manifest: Manifest, snaps: list[Snapshot]) -> TableLayout:
    """The table the shards hold together, as a plain store of it would describe itself."""
    first = snaps[0].layout
    columns = tuple(c for c in first.columns if c.name != ROW_COLUMN)
    for rank, snap in enumerate(snaps):
        if tuple(c for c in snap.layout.columns if c.name != ROW_COLUMN) != columns:
            raise CorruptionError(f"{path}: the shard of rank {rank} has other columns than rank 0's")
        if snap.layout.chunk_rows != manifest.chunk_rows or ROW_COLUMN not in [c.name for c in snap.layout.columns]:
            raise CorruptionError(f"{path}: the shard of rank {rank} does not match the manifest (chunking or "
                                  f"the {ROW_COLUMN!r} column)")
    rows = sum(s.layout.rows for s in snaps)
    if rows != manifest.rows:
        raise CorruptionError(f"{path}: the shards hold {rows} rows, the manifest says {manifest.rows}")
    config = {**first.config, "init": manifest.init, "seed": manifest.seed}
    attrs = {k: v for k, v in first.attrs.items() if not k.startswith(RESERVED_PREFIX)}
    return TableLayout(chunk_rows=manifest.chunk_rows, rows=rows, columns=columns, config=config, attrs=attrs,
                       commit=manifest.commit, committed_at=manifest.committed_at)


class _ShardRows:
    """A cursor over one shard's rows in its row order (= ascending global position)."""

    def __init__(self, snap: Snapshot, columns: tuple[ColumnSpec, ...], rank: int, manifest: Manifest):
        self.snap, self.columns, self.rank, self.manifest = snap, columns, rank, manifest
        self.chunk, self.offset = 0, 0
        self._load()

    def _load(self) -> None:
        layout = self.snap.layout
        if self.chunk >= layout.n_chunks:
            self.positions = np.empty(0, np.int64)
            return
        self.positions = self.snap.column_chunk(self.chunk, row_column(layout))[:, 0].astype(np.int64)
        self.ids = self.snap.ids_chunk(self.chunk)
        owners = owner_of(self.ids, self.manifest.world_size, self.manifest.buckets)
        if (owners != self.rank).any():
            raise CorruptionError(f"{self.snap.path}: chunk {self.chunk} of the shard of rank {self.rank} holds ids "
                                  f"of rank(s) {np.unique(owners[owners != self.rank]).tolist()}")
        self.parts = [self.snap.column_chunk(self.chunk, c) for c in self.columns]

    def take_below(self, limit: int) -> list[tuple]:
        """The next rows whose global position is below ``limit``, as (positions, ids, parts) pieces."""
        pieces = []
        while len(self.positions):
            stop = self.offset + int(np.searchsorted(self.positions[self.offset:], limit))
            if stop > self.offset:
                sl = slice(self.offset, stop)
                pieces.append((self.positions[sl], self.ids[sl], [p[sl] for p in self.parts]))
            if stop < len(self.positions):
                self.offset = stop
                break
            self.chunk, self.offset = self.chunk + 1, 0
            self._load()
        return pieces


def _merged(snaps: list[Snapshot], manifest: Manifest, layout: TableLayout,
            columns: tuple[ColumnSpec, ...]) -> Iterator[tuple]:
    """(chunk, ids, parts) of every global chunk, merged from every shard's rows by global position."""
    cursors = [_ShardRows(s, columns, rank, manifest) for rank, s in enumerate(snaps)]
    for chunk in range(layout.n_chunks):
        lo, n = chunk * layout.chunk_rows, layout.chunk_len(chunk)
        pieces = [p for cursor in cursors for p in cursor.take_below(lo + n)]
        positions = np.concatenate([p[0] for p in pieces]) if pieces else np.empty(0, np.int64)
        order = np.argsort(positions, kind="stable")
        if len(positions) != n or not np.array_equal(positions[order], np.arange(lo, lo + n)):
            raise CorruptionError(f"sharded store: the global row positions of chunk {chunk} are not "
                                  f"{lo}..{lo + n - 1} (shards out of step or damaged)")
        ids = np.concatenate([p[1] for p in pieces])[order]
        parts = [np.concatenate([p[2][i] for p in pieces])[order] for i in range(len(columns))]
        yield chunk, ids, parts
        for snap in snaps:
            snap.release_pages()
