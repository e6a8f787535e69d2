"""A sharded directory without a process group: info, verify, dump (one global view), reshard, recover.

* :class:`ShardedSnapshot` reads all shards at ONE global commit (one read transaction per
  shard, checked against the manifest read before and after) and presents them as a plain
  store's snapshot in the single-store row order (the shards' ``dist.row`` positions
  merged, chunk by chunk), so ``dump_store`` writes the same dump as a plain store with
  the same table would: a dump restores into any world size or a plain store, bit-exact.
* :func:`restore_sharded` builds a store sharded for W ranks from any dump: the dump is
  restored (and checked) as a plain store in a hidden temporary directory, split into W
  shard builders by ``owner_of``, verified, and swapped in at ``PATH`` atomically.
* :func:`sharded_info`, :func:`verify_sharded`: ``info`` / ``verify`` for all shards.
* :func:`recover_sharded`: what a writable collective ``open`` does, done by one process.

Nothing here imports torch. Memory: a chunk per shard plus one global chunk, and the IDs
(8 bytes per row) where a check needs them all, as ``verify`` of a plain store.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time

import numpy as np

from ..backup import restore_store
from ..errors import CorruptionError, EmbeddingStoreError, InvalidInputError, StoreExistsError, WriterLockedError
from ..fsutil import remove_stale_temps, replace_dir, sibling_temp
from ..progress import bar
from ..snapshot import Snapshot
from ..store import FORMAT_VERSION, is_store
from ..store_builder import StoreBuilder
from ..store_check import store_info, verify_store
from ..table_layout import ID_DTYPE, ColumnSpec, TableLayout
from ..writer_lock import WriterLock, holder_pid
from .manifest import (
    COMMIT_ATTR,
    RESERVED_PREFIX,
    ROW_COLUMN,
    Manifest,
    is_sharded,
    new_token,
    read_manifest,
    shard_name,
    write_manifest,
)
from .ownership import DEFAULT_BUCKETS, owner_of
from .shard import recover_shard

_WAIT_S = 10.0  # a snapshot waits this long for a commit in progress (a training job) to be decided
_ROW_SPEC = ColumnSpec(ROW_COLUMN, 1, np.dtype("<f8"))


# ------------------------------------------------------------------------- snapshot
class ShardedSnapshot:
    """One consistent global commit of a sharded store, with the interface of ``snapshot.Snapshot``.

    ``layout`` is the global table (rows in single-store order); ``ids_chunk(c)`` and
    ``column_chunk(c, column)`` give global chunk ``c``; chunks must be read in order
    (first the IDs, then the rows: what ``dump_store`` does).

    Raises:
        EmbeddingStoreError: a shard holds a commit that is not decided and nobody is
            committing (a crashed job: open the store writable once to recover it).
    """

    def __init__(self, path: str, wait_s: float = _WAIT_S):
        self.path = os.path.abspath(path)
        self._snaps: list[Snapshot] = []
        deadline = time.monotonic() + wait_s
        while True:
            manifest = read_manifest(self.path)
            self._open_all(manifest)
            held = [_held_commit(s) for s in self._snaps]
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
        self.layout = _global_layout(self.path, decided, self._snaps)
        self._columns = [_ROW_SPEC, *self.layout.columns]  # what each shard chunk is read as
        self._id_merge = _Merge(self._snaps, self.layout.chunk_rows, with_columns=None)
        self._row_merge = _Merge(self._snaps, self.layout.chunk_rows, with_columns=self.layout.columns)

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

    def ids_chunk(self, chunk: int) -> np.ndarray:
        return self._id_merge.chunk(chunk)[0]

    def column_chunk(self, chunk: int, column: ColumnSpec) -> np.ndarray:
        ids, parts = self._row_merge.chunk(chunk)
        return parts[[c.name for c in self.layout.columns].index(column.name)]

    def release_pages(self, force: bool = False) -> None:
        for snap in self._snaps:
            snap.release_pages(force)

    def close(self) -> None:
        for snap in self._snaps:
            snap.close()
        self._snaps = []

    def __enter__(self) -> ShardedSnapshot:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _held_commit(snap: Snapshot) -> int:
    return int(snap.layout.attrs.get(COMMIT_ATTR, 0))


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

    def __init__(self, snap: Snapshot, columns):
        self.snap, self.columns = snap, columns
        self.chunk, self.offset = 0, 0
        self._load()

    def _load(self) -> None:
        layout = self.snap.layout
        if self.chunk >= layout.n_chunks:
            self.positions = np.empty(0, np.int64)
            return
        self.positions = self.snap.column_chunk(self.chunk, _column(layout, ROW_COLUMN))[:, 0].astype(np.int64)
        self.ids = self.snap.ids_chunk(self.chunk)
        self.parts = [self.snap.column_chunk(self.chunk, c) for c in (self.columns or ())]

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


def _column(layout: TableLayout, name: str) -> ColumnSpec:
    return next(c for c in layout.columns if c.name == name)


class _Merge:
    """Global chunks, in order, merged from every shard's rows by global position."""

    def __init__(self, snaps: list[Snapshot], chunk_rows: int, with_columns):
        self._snaps, self._chunk_rows, self._columns = snaps, chunk_rows, with_columns
        self._cursors = None
        self._last = (-1, None)

    def chunk(self, chunk: int):
        if self._last[0] == chunk:
            return self._last[1]
        if self._cursors is None or chunk != self._last[0] + 1:
            if chunk != 0:
                raise EmbeddingStoreError(f"sharded snapshot: chunk {chunk} read out of order")
            self._cursors = [_ShardRows(s, self._columns) for s in self._snaps]
        lo, hi = chunk * self._chunk_rows, (chunk + 1) * self._chunk_rows
        pieces = [p for cursor in self._cursors for p in cursor.take_below(hi)]
        positions = np.concatenate([p[0] for p in pieces]) if pieces else np.empty(0, np.int64)
        order = np.argsort(positions, kind="stable")
        expected = min(hi, sum(s.layout.rows for s in self._snaps)) - lo
        if len(positions) != expected or not np.array_equal(positions[order], np.arange(lo, lo + expected)):
            raise CorruptionError(f"sharded store: the global row positions of chunk {chunk} are not "
                                  f"{lo}..{lo + expected - 1} (shards out of step or damaged)")
        ids = np.concatenate([p[1] for p in pieces])[order]
        parts = [np.concatenate([p[2][i] for p in pieces])[order] for i in range(len(self._columns or ()))]
        self._last = (chunk, (ids, parts))
        return self._last[1]


# ------------------------------------------------------------------------- info, verify
def sharded_info(path: str) -> dict:
    """``store_info`` of the whole sharded store (the same keys, summed over shards) plus ``sharded``."""
    path = os.path.abspath(path)
    manifest = read_manifest(path)
    shards = [store_info(manifest.shard_path(path, r)) for r in range(manifest.world_size)]
    first = shards[0]
    lm = {k: sum(s["lmdb"][k] for s in shards) for k in ("map_size", "pages_in_use", "pages_in_tables",
                                                          "free_pages", "readers")}
    lm["page_size"] = first["lmdb"]["page_size"]
    writers = [s["writer_pid"] for s in shards if s["writer_pid"] is not None]
    when = manifest.committed_at
    return {
        "path": path, "rows": manifest.rows, "dim": manifest.dim, "dtype": manifest.dtype,
        "chunk_rows": manifest.chunk_rows, "chunks": -(-manifest.rows // manifest.chunk_rows),
        "columns": {n: d for n, d in first["columns"].items() if not n.startswith(RESERVED_PREFIX)},
        "format_version": FORMAT_VERSION, "commit_count": manifest.commit,
        "last_commit": (time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(when)) if when else None),
        "last_commit_unix": when, "attrs": sorted(a for a in first["attrs"] if not a.startswith(RESERVED_PREFIX)),
        "bytes_on_disk": sum(s["bytes_on_disk"] for s in shards),
        "data_file_bytes": sum(s["data_file_bytes"] for s in shards),
        "table_bytes": sum(s["table_bytes"] for s in shards), "lmdb": lm,
        "writer_pid": writers[0] if writers else None, "writer_active": bool(writers),
        "init": manifest.init, "seed": manifest.seed,
        "sharded": {"world_size": manifest.world_size, "buckets": manifest.buckets, "hash": "splitmix64",
                    "shards": [{"rank": r, "path": s["path"], "rows": s["rows"], "bytes_on_disk": s["bytes_on_disk"],
                                "writer_pid": s["writer_pid"]} for r, s in enumerate(shards)]},
    }


def verify_sharded(path: str, *, progress: bool = False) -> dict:
    """``verify`` every shard, then what ties them together: the manifest, the commit each shard holds,
    the same columns everywhere, every ID on its owner, the global row positions a permutation."""
    path = os.path.abspath(path)
    report = {"path": path, "ok": True, "problems": [], "bad_chunks": [], "chunks_checked": 0, "sharded": True}

    def problem(part: str, chunk, error: str) -> None:
        report["problems"].append({"part": part, "chunk": chunk, "error": error})

    try:
        manifest = read_manifest(path)
    except CorruptionError as exc:
        problem("manifest", None, str(exc))
        report["ok"] = False
        return report
    report.update(rows=manifest.rows, dim=manifest.dim, dtype=manifest.dtype, chunk_rows=manifest.chunk_rows,
                  commit=manifest.commit, world_size=manifest.world_size)
    for rank in range(manifest.world_size):
        shard_path = manifest.shard_path(path, rank)
        if not is_store(shard_path):
            problem(f"shard {rank}", None, f"{shard_path} is missing or not a store")
            continue
        shard = verify_store(shard_path, progress=progress)
        report["chunks_checked"] += shard["chunks_checked"]
        report.setdefault("columns", [c for c in shard.get("columns", []) if not c.startswith(RESERVED_PREFIX)])
        for p in shard["problems"]:
            problem(f"shard {rank} {p['part']}", p["chunk"], p["error"])
    if not report["problems"]:
        _check_shards_together(path, manifest, problem)
    report["ok"] = not report["problems"]
    report["bad_chunks"] = sorted({f"shard {p['part'].split()[1]} chunk {p['chunk']}" for p in report["problems"]
                                   if p["chunk"] is not None and p["part"].startswith("shard ")})
    return report


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
            row_column = _column(layout, ROW_COLUMN)
            for chunk in range(layout.n_chunks):
                ids = shard.ids_chunk(chunk)
                wrong = ids[owner_of(ids, manifest.world_size, manifest.buckets) != rank]
                if len(wrong):
                    problem(f"shard {rank} ids", chunk, f"{len(wrong)} id(s) of other ranks: {wrong[:5].tolist()}")
                rows = shard.column_chunk(chunk, row_column)[:, 0]
                pos = rows.astype(np.int64)
                if ((pos != rows).any() or (pos < 0).any() or (pos >= manifest.rows).any()
                        or len(np.unique(pos)) != len(pos) or positions[pos].any()):
                    problem(f"shard {rank} column {ROW_COLUMN!r}", chunk, "global row positions out of range or "
                                                                          "given twice")
                    continue
                positions[pos] = True
                shard.release_pages()
        if not positions.all():
            problem("shards", None, f"{int((~positions).sum())} global row position(s) held by no shard")


# ------------------------------------------------------------------------------ reshard
def restore_sharded(src: str, path: str, *, shards: int, force: bool = False, fmt: str | None = None,
                    chunk_rows: int | None = None, progress: bool = False) -> dict:
    """Build at ``path`` a store sharded for ``shards`` ranks from the dump ``src``, bit-exact.

    Like ``restore_store``: a bad dump fails with nothing left at ``path``; an existing
    store (plain or sharded) is replaced, atomically, only with ``force``.
    """
    src, path = os.path.abspath(src), os.path.abspath(path)
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= DEFAULT_BUCKETS:
        raise InvalidInputError(f"--shards must be between 1 and {DEFAULT_BUCKETS}, got {shards!r}")
    replacing = _check_target(path, force)
    started = time.perf_counter()
    remove_stale_temps(path, "resharding")
    work = sibling_temp(path, "resharding")
    os.makedirs(work)
    try:
        plain = os.path.join(work, "plain")
        restored = restore_store(src, plain, fmt=fmt, chunk_rows=chunk_rows, progress=progress)
        built = os.path.join(work, "sharded")
        manifest = split_store(plain, built, shards, progress=progress)
        shutil.rmtree(plain)
        for rank in range(shards):
            report = verify_store(manifest.shard_path(built, rank))
            if not report["ok"]:
                raise CorruptionError(f"the rebuilt shard of rank {rank} fails verification: {report['problems'][0]}")
        _swap_in(built, path, replacing)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {**restored, "path": path, "shards": shards, "replaced": replacing,
            "seconds": time.perf_counter() - started}


def split_store(plain: str, out: str, shards: int, *, progress: bool = False) -> Manifest:
    """Write the plain store at ``plain`` as a sharded store (manifest included) in the new directory ``out``."""
    os.makedirs(out)
    with Snapshot(plain) as snap:
        layout = snap.layout
        counts = np.zeros(shards, np.int64)
        for chunk in range(layout.n_chunks):
            counts += np.bincount(owner_of(snap.ids_chunk(chunk), shards), minlength=shards)
            snap.release_pages()
        token = new_token()
        manifest = Manifest(commit=layout.commit, world_size=shards, buckets=DEFAULT_BUCKETS, token=token,
                            dim=layout.dim, dtype=layout.dtype.name, chunk_rows=layout.chunk_rows,
                            init=dict(layout.config.get("init") or {"kind": "normal", "std": 0.01}),
                            seed=int(layout.config.get("seed", 0)), rows=layout.rows,
                            shards=[shard_name(r, token) for r in range(shards)])
        writers = [_ShardWriter(manifest.shard_path(out, r), layout, int(counts[r]), layout.commit)
                   for r in range(shards)]
        try:
            with bar(layout.rows * layout.row_bytes, "reshard", progress) as pbar:
                for chunk in range(layout.n_chunks):
                    ids = np.array(snap.ids_chunk(chunk))
                    parts = [np.array(snap.column_chunk(chunk, c)) for c in layout.columns]
                    owners = owner_of(ids, shards)
                    start = chunk * layout.chunk_rows
                    positions = np.arange(start, start + len(ids), dtype=np.float64).reshape(-1, 1)
                    for rank, writer in enumerate(writers):
                        mine = owners == rank
                        writer.append(ids[mine], [p[mine] for p in parts], positions[mine])
                    snap.release_pages()
                    pbar.update(len(ids) * layout.row_bytes)
            for writer in writers:
                writer.finish()
        finally:
            for writer in writers:
                writer.close()
    write_manifest(out, manifest)
    return manifest


class _ShardWriter:
    """One shard being built: rows arrive in global order, leave in full chunks of the shard."""

    def __init__(self, directory: str, layout: TableLayout, rows: int, commit: int):
        self._layout = TableLayout(chunk_rows=layout.chunk_rows, rows=rows, columns=(*layout.columns, _ROW_SPEC),
                                   config=dict(layout.config), attrs={**layout.attrs, COMMIT_ATTR: commit},
                                   commit=0, committed_at=layout.committed_at)
        os.makedirs(directory)
        self._builder = StoreBuilder(directory, self._layout)
        self._pending: list[tuple] = []
        self._held = 0
        self._chunk = 0

    def append(self, ids: np.ndarray, parts: list[np.ndarray], positions: np.ndarray) -> None:
        if len(ids):
            self._pending.append((ids, [*parts, positions]))
            self._held += len(ids)
        layout = self._layout
        while self._chunk < layout.n_chunks and self._held >= layout.chunk_len(self._chunk):
            self._flush(layout.chunk_len(self._chunk))

    def _flush(self, n: int) -> None:
        ids = np.concatenate([p[0] for p in self._pending])
        parts = [np.concatenate([p[1][i] for p in self._pending]) for i in range(len(self._layout.columns))]
        self._builder.add_ids(self._chunk, ids[:n].astype(ID_DTYPE))
        self._builder.add_chunk(self._chunk, [p[:n] for p in parts])
        rest = len(ids) - n
        self._pending = [(ids[n:], [p[n:] for p in parts])] if rest else []
        self._held = rest
        self._chunk += 1

    def finish(self) -> None:
        self._builder.finish()

    def close(self) -> None:
        self._builder.close()


def _check_target(path: str, force: bool) -> bool:
    """Raise unless a sharded store may be written at ``path``; True if an old store will be replaced."""
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise InvalidInputError(f"the parent directory {parent} does not exist; create it first")
    if os.path.exists(path) and not os.path.isdir(path):
        raise StoreExistsError(f"{path} exists and is not a directory")
    if not os.path.isdir(path) or not os.listdir(path):
        return False
    if not (is_sharded(path) or is_store(path)):
        raise StoreExistsError(f"{path} is a non-empty directory that is not a store; refusing to write there "
                               "(choose another path or empty it)")
    if not force:
        raise StoreExistsError(f"a store already exists at {path}; pass --force to replace it")
    for lock_dir in _store_dirs(path):
        holder = holder_pid(lock_dir)
        if holder is not None:
            raise WriterLockedError(f"{lock_dir} is open for writing by pid {holder}; close it before replacing it")
    return True


def _store_dirs(path: str) -> list[str]:
    """The directories holding writer locks of the store at ``path`` (itself, or its shards)."""
    if is_sharded(path):
        with contextlib.suppress(EmbeddingStoreError):
            manifest = read_manifest(path)
            return [manifest.shard_path(path, r) for r in range(manifest.world_size)]
        return []
    return [path]


def _swap_in(built: str, path: str, replacing: bool) -> None:
    """Put the finished sharded directory at ``path``, holding the old store's writer locks meanwhile."""
    if not replacing and os.path.exists(path) and os.listdir(path):
        raise StoreExistsError(f"{path} was filled by someone else during the restore; refusing to replace it")
    locks = []
    try:
        for lock_dir in (_store_dirs(path) if replacing else []):
            lock = WriterLock(lock_dir)
            lock.acquire()
            locks.append(lock)
        replace_dir(built, path)
    finally:
        for lock in locks:
            lock.release()


# ------------------------------------------------------------------------------ recover
def recover_sharded(path: str) -> dict:
    """Bring every shard to the manifest's commit (undo undecided prepared commits), without a process group.

    What ``ShardedEmbeddingStore.open`` does collectively, for a whole directory in one
    process (no rank may have the store open). Returns the commit and the ranks reverted.
    """
    path = os.path.abspath(path)
    manifest = read_manifest(path)
    reverted = [r for r in range(manifest.world_size)
                if recover_shard(manifest.shard_path(path, r), manifest.commit)]
    return {"path": path, "commit": manifest.commit, "reverted": reverted}
