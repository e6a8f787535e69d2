"""A sharded directory without a process group: info, verify, restore into W shards, recover.

* :func:`sharded_info`, :func:`verify_sharded`: ``info`` / ``verify`` of all shards, plus what
  ties them together (the manifest, the commit each shard holds, owners, row positions).
* :func:`restore_sharded`: any dump -> a store sharded for W ranks, streamed in one pass
  (``copy_table`` into a :class:`ShardedTableSink`), verified, swapped in atomically. No
  intermediate plain store: besides the new shards it only keeps the IDs (8 bytes per row)
  in a temporary file, because a dump gives all IDs before any row.
* :func:`recover_sharded`: what a writable collective ``open`` does, done by one process.

``dump`` of a sharded directory is ``ops.dump_store`` over a :class:`~.snapshot.ShardedSnapshot`.
Nothing here imports torch. Memory: a chunk per shard plus one global chunk, and the IDs
where a check needs them all (as ``verify`` of a plain store).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time

import numpy as np

from ..errors import CorruptionError, EmbeddingStoreError, InvalidInputError, StoreExistsError
from ..format.layout import ID_DTYPE, TableLayout, copy_table
from ..format.records import FORMAT_VERSION, check_store_dir, is_store
from ..format.snapshot import Snapshot
from ..ops.backup import detect_format, open_dump
from ..ops.info import store_info
from ..ops.verify import finish_report, new_report, verify_store
from ..processes.staging import StagedStore, refuse_if_open
from ..processes.writer_lock import WriterLock
from ..progress import bar
from ..results import VerifyReport
from .creation import ShardBuilder
from .manifest import RESERVED_PREFIX, Manifest, is_sharded, new_token, read_manifest, shard_name, write_manifest
from .ownership import DEFAULT_BUCKETS, owner_of
from .shard import recover_shard
from .snapshot import ShardedSnapshot, row_column, shard_mismatch

_IDS_FILE = ".ids.restoring"


# ------------------------------------------------------------------------- info, verify
def sharded_info(path: str) -> dict:
    """``store_info`` of the whole sharded store (the same keys, summed over shards) plus ``sharded``."""
    path = os.path.abspath(path)
    manifest = read_manifest(path)
    for rank in range(manifest.world_size):
        problem = _shard_mismatch(path, manifest, rank)
        if problem is not None:
            raise CorruptionError(problem)
    shards = [store_info(manifest.shard_path(path, r)) for r in range(manifest.world_size)]
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
        "last_commit": (datetime.datetime.fromtimestamp(when, datetime.timezone.utc).isoformat()
                        if isinstance(when, (int, float)) else None),
        "last_commit_unix": when, "attrs": sorted(a for a in first["attrs"] if not a.startswith(RESERVED_PREFIX)),
        **summed, "lmdb": lm, "writer_pid": writers[0] if writers else None, "writer_active": bool(writers),
        "init": manifest.init, "seed": manifest.seed,
        "sharded": {"world_size": manifest.world_size, "buckets": manifest.buckets, "hash": "splitmix64",
                    "shards": [{"rank": r, "path": s["path"], "rows": s["rows"], "bytes_on_disk": s["bytes_on_disk"],
                                "writer_pid": s["writer_pid"]} for r, s in enumerate(shards)]},
    }


def verify_sharded(path: str, *, progress: bool = False) -> VerifyReport:
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
        shard = verify_store(shard_path, progress=progress)
        report.chunks_checked += shard.chunks_checked
        report.columns = report.columns or [c for c in shard.columns or [] if not c.startswith(RESERVED_PREFIX)]
        for p in shard.problems:
            problem(f"shard {rank} {p.part}", p.chunk, p.error)
        report.problems_not_listed += shard.problems_not_listed
        if shard.ok and (mismatch := _shard_mismatch(path, manifest, rank)) is not None:
            problem(f"shard {rank}", None, mismatch)
    if not report.problems:
        _check_shards_together(path, manifest, problem)
    return finish_report(report, lambda p: f"shard {p.part.split()[1]} chunk {p.chunk}"
                         if p.part.startswith("shard ") else None)


def _shard_mismatch(path: str, manifest: Manifest, rank: int) -> str | None:
    """Why rank ``rank``'s shard does not belong to it and the manifest (snapshot.shard_mismatch), or None."""
    shard_path = manifest.shard_path(path, rank)
    check_store_dir(shard_path)
    with Snapshot(shard_path) as snap:
        return shard_mismatch(snap, manifest, path, rank)


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


# ------------------------------------------------------------------------------ reshard
class ShardedTableSink:
    """A ``TableSink`` that writes a table as a new store sharded for ``shards`` ranks in ``directory``.

    The IDs arrive first (all of them, before any row): they go to a temporary file, and
    each shard's row count is tallied. The rows then go, chunk by chunk, to each owner's
    :class:`~.creation.ShardBuilder` with their global positions (the IDs read back from
    the file). ``finish`` completes the shards and writes the manifest (at the table's commit).
    """

    def __init__(self, directory: str, layout: TableLayout, shards: int):
        self.directory, self.layout, self.shards = directory, layout, shards
        self._counts = np.zeros(shards, np.int64)
        self._ids = open(os.path.join(directory, _IDS_FILE), "w+b")  # noqa: SIM115 - closed by close()
        self._builders: list[ShardBuilder] | None = None
        token = new_token()
        self.manifest = Manifest(commit=layout.commit, world_size=shards, buckets=DEFAULT_BUCKETS, token=token,
                                 dim=layout.dim, dtype=layout.dtype.name, chunk_rows=layout.chunk_rows,
                                 init=dict(layout.config.get("init") or {"kind": "normal", "std": 0.01}),
                                 seed=int(layout.config.get("seed", 0)), rows=layout.rows,
                                 shards=[shard_name(r, token) for r in range(shards)])

    def add_ids(self, chunk: int, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, ID_DTYPE).reshape(-1)
        self._ids.write(ids.tobytes())
        self._counts += np.bincount(owner_of(ids, self.shards), minlength=self.shards)

    def _start_rows(self) -> list[ShardBuilder]:
        if self._builders is None:
            self._ids.flush()
            self._ids.seek(0)
            self._builders = []
            for rank in range(self.shards):
                self._builders.append(ShardBuilder(self.manifest.shard_path(self.directory, rank), self.layout,
                                                   int(self._counts[rank]), commit=self.layout.commit))
        return self._builders

    def add_chunk(self, chunk: int, parts: list[np.ndarray]) -> None:
        builders = self._start_rows()
        n = self.layout.chunk_len(chunk)
        ids = np.frombuffer(self._ids.read(n * ID_DTYPE.itemsize), ID_DTYPE)
        if len(ids) != n:
            raise EmbeddingStoreError(f"reshard: chunk {chunk} has {n} rows but only {len(ids)} ids were given")
        owners = owner_of(ids, self.shards)
        positions = np.arange(chunk * self.layout.chunk_rows, chunk * self.layout.chunk_rows + n, dtype=np.int64)
        for rank, builder in enumerate(builders):
            mine = owners == rank
            builder.append(ids[mine], [p[mine] for p in parts], positions[mine])

    def finish(self) -> None:
        for builder in self._start_rows():
            builder.finish()
        self._ids.close()
        os.unlink(os.path.join(self.directory, _IDS_FILE))
        write_manifest(self.directory, self.manifest)

    def close(self) -> None:
        for builder in self._builders or []:
            builder.close()
        self._ids.close()


def restore_sharded(src: str, path: str, *, shards: int, force: bool = False, fmt: str | None = None,
                    chunk_rows: int | None = None, progress: bool = False) -> dict:
    """Build at ``path`` a store sharded for ``shards`` ranks from the dump ``src``, bit-exact.

    Like ``restore_store``: a bad dump fails with nothing left at ``path``; an existing
    store (plain or sharded) is replaced, atomically, only with ``force``.
    """
    src, path = os.path.abspath(src), os.path.abspath(path)
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= DEFAULT_BUCKETS:
        raise InvalidInputError(f"--shards must be between 1 and {DEFAULT_BUCKETS}, got {shards!r}")
    fmt = fmt or detect_format(src)
    replacing = _check_target(path, force)
    started = time.perf_counter()
    reader = open_dump(src, fmt, chunk_rows)
    layout = reader.layout
    try:
        with StagedStore(path, "resharding") as stage:
            sink = ShardedTableSink(stage.tmp, layout, shards)
            try:
                with bar(layout.rows * layout.row_bytes, "restore", progress) as pbar:
                    copy_table(reader, sink, lambda rows: pbar.update(rows * layout.row_bytes))
            finally:
                sink.close()
            report = verify_sharded(stage.tmp)
            if not report["ok"]:
                first = report["problems"][0]
                raise CorruptionError(f"{src} cannot be restored: the rebuilt sharded store fails verification "
                                      f"({first['part']}: {first['error']})")
            if not replacing and os.path.exists(path) and os.listdir(path):
                raise StoreExistsError(f"{path} was filled by someone else during the restore; refusing to replace it")
            with _writer_locks(_shard_dirs(path) if replacing else []):  # a sharded store: its shards' locks
                stage.swap_in(replace=replacing, only_stores=False)
    finally:
        reader.close()
    return {"path": path, "source": src, "format": fmt, "rows": layout.rows, "dim": layout.dim,
            "dtype": layout.dtype.name, "columns": [c.name for c in layout.columns], "replaced": replacing,
            "shards": shards, "seconds": time.perf_counter() - started}


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
    for lock_dir in [path, *_shard_dirs(path)]:
        refuse_if_open(lock_dir)
    return True


def _shard_dirs(path: str) -> list[str]:
    """The shard directories of the sharded store at ``path`` (none for a plain store or a damaged manifest)."""
    if is_sharded(path):
        with contextlib.suppress(EmbeddingStoreError):
            manifest = read_manifest(path)
            return [manifest.shard_path(path, r) for r in range(manifest.world_size)]
    return []


@contextlib.contextmanager
def _writer_locks(directories: list[str]):
    """Hold the writer locks of ``directories`` (an old sharded store's shards) while it is replaced."""
    locks = []
    try:
        for directory in directories:
            lock = WriterLock(directory)
            lock.acquire()
            locks.append(lock)
        yield
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
