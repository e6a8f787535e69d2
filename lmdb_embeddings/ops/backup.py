"""dump and restore: moving a table between a store and a file, in bounded memory.

``dump`` reads one snapshot (one read transaction, safe while a writer trains) and
streams it into a temporary file next to the output, renamed into place when complete.
``restore`` checks the input's header before creating anything, streams it into a new
store in a hidden sibling of the target, verifies that store, and only then swaps it in
(atomically replacing an old store with ``force``). Any failure removes the temporary
directory, so nothing (and no half store) is left at the target.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from collections.abc import Callable
from typing import Any

import lmdb

from ..errors import CorruptionError, EmbeddingStoreError, InvalidInputError, StoreExistsError, WriterLockedError
from ..format import dump_file, npy_dir
from ..format.layout import TableSink, TableSource, copy_table
from ..format.records import check_store_dir, is_store
from ..fsutil import fsync_dir, remove_stale_temps, sibling_temp
from ..processes.builder import StoreBuilder
from ..processes.snapshot import Snapshot
from ..processes.staging import StagedStore, check_replace_target, refuse_if_open
from ..processes.writer_lock import holding_writer_locks
from ..progress import bar
from ..results import DumpResult, RestoreResult
from ..sharding.manifest import is_sharded, shard_dirs
from ..sharding.ownership import DEFAULT_BUCKETS
from ..sharding.snapshot import ShardedSnapshot
from ..sharding.table_sink import ShardedTableSink
from ..version import __version__
from .verify import verify_store

FORMATS = ("native", "npy")


def _source(path: str, snap: TableSource) -> dict:
    return {"path": path, "commit": snap.layout.commit, "dumped_at": time.time(), "library_version": __version__}


def _check_parent(path: str) -> None:
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise InvalidInputError(f"the parent directory {parent} does not exist; create it first")


# ------------------------------------------------------------------------------ dump
STDIO = "-"  # as OUT of dump: the standard output; as IN of restore: the standard input


def dump_store(path: str, out: str, *, fmt: str = "native", progress: bool = False,
               open_source: Callable[[str], Any] | None = None) -> DumpResult:
    """Write the committed state of the store at ``path`` to ``out``; returns a summary.

    ``out`` ``"-"`` streams a native dump to the standard output (for ``| ssh`` or ``| zstd``).
    A path must be a new or regular file (a directory for npy) outside the store: a
    symbolic link, FIFO or device there is refused, never replaced. ``open_source(path)``:
    the consistent view to dump, a context-managed ``TableSource`` (default: a plain store's
    ``Snapshot``; a sharded store's directory: ``sharding.snapshot.ShardedSnapshot``, all its
    shards merged into one table, so the dump is the same whatever the world size).
    """
    path = os.path.abspath(path)
    if open_source is None and is_sharded(path):
        open_source = ShardedSnapshot
    elif open_source is None:
        check_store_dir(path)
        open_source = Snapshot
    if out == STDIO:
        if fmt != "native":
            raise InvalidInputError("'-' (the standard output) takes a native dump; --format npy writes a directory")
        if sys.stdout.isatty():
            raise InvalidInputError("refusing to write a binary dump to a terminal; redirect the standard output")
    else:
        out = os.path.abspath(out)
        _check_parent(out)
        _check_dump_target(path, out, fmt)
    started = time.perf_counter()
    with open_source(path) as snap:
        layout = snap.layout
        if out == STDIO:
            size = _dump_stream(snap, sys.stdout.buffer, _source(path, snap), progress)
        elif fmt == "native":
            size = _dump_native(snap, out, _source(path, snap), progress)
        else:
            size = _dump_npy(snap, out, _source(path, snap), progress)
    return {"path": path, "out": out, "format": fmt, "rows": layout.rows, "chunks": layout.n_chunks,
            "columns": [c.name for c in layout.columns], "commit": layout.commit, "bytes": size,
            "seconds": time.perf_counter() - started}


def _check_dump_target(store: str, out: str, fmt: str) -> None:
    """Refuse an OUT inside the store, and one that is not what the format writes (never replaced)."""
    real_store = os.path.realpath(store)
    real_out = os.path.join(os.path.realpath(os.path.dirname(out)), os.path.basename(out))
    if real_out == real_store or real_out.startswith(real_store + os.sep):
        raise InvalidInputError(f"{out} is inside the store {store}; write the dump elsewhere")
    if not os.path.lexists(out):
        return
    mode = os.lstat(out).st_mode
    if stat.S_ISLNK(mode):
        raise InvalidInputError(f"{out} is a symbolic link; refusing to replace it (give the path it points to)")
    if fmt == "native" and stat.S_ISDIR(mode):
        raise InvalidInputError(f"{out} is a directory; give a file path (or use --format npy)")
    if fmt == "native" and not stat.S_ISREG(mode):
        raise InvalidInputError(f"{out} is not a regular file (a FIFO, device or socket); refusing to replace it "
                                "(to write to a pipe, give '-' and redirect the standard output)")
    if fmt == "npy" and not stat.S_ISDIR(mode):
        raise InvalidInputError(f"{out} is a file; --format npy writes a directory")


def _dump_stream(snap: TableSource, stream, source: dict, progress: bool) -> int:
    writer = dump_file.DumpWriter(stream, snap.layout, source)
    _copy(snap, writer, "dump", progress)
    stream.flush()
    return writer.bytes_written


def _dump_native(snap: TableSource, out: str, source: dict, progress: bool) -> int:
    remove_stale_temps(out, "dumping")
    tmp = sibling_temp(out, "dumping")
    try:
        with open(tmp, "wb") as f:
            _copy(snap, dump_file.DumpWriter(f, snap.layout, source), "dump", progress)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_dir(os.path.dirname(out))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return os.path.getsize(out)


def _dump_npy(snap: TableSource, out: str, source: dict, progress: bool) -> int:
    sink = npy_dir.NpyTableWriter(out, snap.layout, source)
    _copy(snap, sink, "dump", progress)
    return sink.bytes


def _copy(source: TableSource, sink: TableSink, what: str, progress: bool) -> None:
    """``copy_table`` with a progress bar; an unfinished sink is closed (it removes what it wrote)."""
    layout = source.layout
    try:
        with bar(layout.rows * layout.row_bytes, what, progress) as pbar:
            copy_table(source, sink, lambda rows: pbar.update(rows * layout.row_bytes))
    finally:
        sink.close()


# --------------------------------------------------------------------------- restore
def detect_format(src: str) -> str:
    if os.path.isdir(src):
        return "npy"
    if os.path.isfile(src):
        return "native"
    raise InvalidInputError(f"no dump at {src} (no such file or directory)")


def open_dump(src: str, fmt: str, chunk_rows: int | None = None) -> TableSource:
    """A reader of the dump ``src`` (``fmt`` "native" or "npy"); its header is checked, nothing else read yet."""
    if fmt == "native":
        if not os.path.isfile(src):
            raise InvalidInputError(f"{src} is not a dump file")
        return dump_file.DumpReader(src)
    if not os.path.isdir(src):
        raise InvalidInputError(f"{src} is not a directory of .npy files")
    layout, checksums = npy_dir.read_layout(src, chunk_rows)
    return npy_dir.NpyTableReader(src, layout, checksums)


def check_restore_target(path: str, force: bool) -> bool:
    """Raise unless a store may be written at ``path``; True if an old store will be replaced."""
    _check_parent(path)
    return check_replace_target(path, force, "pass --force")


def restore_store(src: str, path: str, *, shards: int | None = None, force: bool = False, fmt: str | None = None,
                  chunk_rows: int | None = None, progress: bool = False) -> RestoreResult:
    """Build the store at ``path`` from the dump ``src`` (native file or npy directory; ``"-"``: a
    native dump streamed on the standard input). ``shards=W``: a store sharded for W ranks
    (``ShardedEmbeddingStore``) instead of a plain one, from a dump file or directory."""
    if shards is not None:
        return _restore_sharded(src, path, shards=shards, force=force, fmt=fmt, chunk_rows=chunk_rows,
                                progress=progress)
    path = os.path.abspath(path)
    if src == STDIO:
        if fmt not in (None, "native"):
            raise InvalidInputError("'-' (the standard input) carries a native dump; an npy dump is a directory")
        fmt = "native"
    else:
        src = os.path.abspath(src)
        fmt = fmt or detect_format(src)
    replacing = check_restore_target(path, force)
    started = time.perf_counter()
    reader = dump_file.DumpReader("<standard input>", stream=sys.stdin.buffer) if src == STDIO else \
        open_dump(src, fmt, chunk_rows)
    layout = reader.layout
    try:
        with StagedStore(path, "restoring") as stage:
            build_verified(reader, stage, src, progress)
            stage.swap_in(replace=force)
    except WriterLockedError as exc:
        raise WriterLockedError(f"{path}: a writer opened it during the restore ({exc}); nothing was replaced",
                                holder_pid=exc.holder_pid) from None
    finally:
        reader.close()
    return {"path": path, "source": src, "format": fmt, "rows": layout.rows, "dim": layout.dim,
            "dtype": layout.dtype.name, "columns": [c.name for c in layout.columns], "replaced": replacing,
            "seconds": time.perf_counter() - started}


def build_verified(source: TableSource, stage: StagedStore, name: str, progress: bool = False) -> None:
    """Build the store of ``source``'s table in ``stage`` and verify it; the caller swaps it in.

    The one way a table becomes a store: restore, import-cosir and the manager's imports.
    ``name`` names the input in errors.
    """
    _build_from(source, stage.tmp, stage.path, progress)
    _check_rebuilt(stage.tmp, name, "store", progress)


def _check_rebuilt(tmp: str, name: str, what: str, progress: bool = False) -> None:
    """Verify the store (plain or sharded) just built in ``tmp`` from ``name``; its first problem is the error."""
    report = verify_store(tmp, progress=progress)
    if not report["ok"]:
        first = report["problems"][0]
        where = f"chunk {first['chunk']} of " if first.get("chunk") is not None else ""
        raise CorruptionError(f"{name} cannot be restored: the rebuilt {what} fails verification "
                              f"({where}{first['part']}: {first['error']})")


def _build_from(source: TableSource, tmp: str, path: str, progress: bool) -> None:
    """Stream a dump into a new store in ``tmp``."""
    try:
        _copy(source, StoreBuilder(tmp, source.layout), "restore", progress)
    except lmdb.Error as exc:  # e.g. the disk filled up: nothing is swapped in
        raise EmbeddingStoreError(f"writing the new store next to {path} failed ({exc}); nothing was "
                                  "changed at the target") from None


# ------------------------------------------------------------ restore --shards W
def _restore_sharded(src: str, path: str, *, shards: int, force: bool, fmt: str | None, chunk_rows: int | None,
                     progress: bool) -> RestoreResult:
    """Build at ``path`` a store sharded for ``shards`` ranks from the dump ``src``, bit-exact, in one pass
    (``copy_table`` into a ``ShardedTableSink``: no intermediate plain store).

    Like a plain restore: a bad dump fails with nothing left at ``path``; an existing
    store (plain or sharded) is replaced, atomically, only with ``force``.
    """
    src, path = os.path.abspath(src), os.path.abspath(path)
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= DEFAULT_BUCKETS:
        raise InvalidInputError(f"--shards must be between 1 and {DEFAULT_BUCKETS}, got {shards!r}")
    fmt = fmt or detect_format(src)
    replacing = _check_sharded_target(path, force)
    started = time.perf_counter()
    reader = open_dump(src, fmt, chunk_rows)
    layout = reader.layout
    try:
        with StagedStore(path, "resharding") as stage:
            _copy(reader, ShardedTableSink(stage.tmp, layout, shards), "restore", progress)
            _check_rebuilt(stage.tmp, src, "sharded store")
            if not replacing and os.path.exists(path) and os.listdir(path):
                raise StoreExistsError(f"{path} was filled by someone else during the restore; refusing to replace it")
            with holding_writer_locks(shard_dirs(path) if replacing else []):  # a sharded store: its shards' locks
                stage.swap_in(replace=replacing, only_stores=False)
    finally:
        reader.close()
    return {"path": path, "source": src, "format": fmt, "rows": layout.rows, "dim": layout.dim,
            "dtype": layout.dtype.name, "columns": [c.name for c in layout.columns], "replaced": replacing,
            "shards": shards, "seconds": time.perf_counter() - started}


def _check_sharded_target(path: str, force: bool) -> bool:
    """Raise unless a sharded store may be written at ``path``; True if an old store will be replaced."""
    _check_parent(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise StoreExistsError(f"{path} exists and is not a directory")
    if not os.path.isdir(path) or not os.listdir(path):
        return False
    if not (is_sharded(path) or is_store(path)):
        raise StoreExistsError(f"{path} is a non-empty directory that is not a store; refusing to write there "
                               "(choose another path or empty it)")
    if not force:
        raise StoreExistsError(f"a store already exists at {path}; pass --force to replace it")
    for lock_dir in [path, *shard_dirs(path)]:
        refuse_if_open(lock_dir)
    return True
