"""The sharded store's directory and its manifest: the record that decides which commit the store is at.

A sharded store at ``path`` is a directory holding::

    manifest.json               the decision record (below), replaced atomically at every commit
    shard-00000-<token>/        rank 0's shard: a complete EmbeddingStore
    shard-00001-<token>/        rank 1's shard ...

``<token>`` is chosen at ``create``: a store created over an old one writes its shards
under new names, and the manifest switching to them is the moment the new store exists.
Every shard carries in its attrs the global commit it holds (``dist.commit``) and in the
auxiliary column ``dist.row`` the global row position of each of its rows (the single-store
row order: create order, then add order), so dumps and reshards keep that order.

The manifest (JSON, with an xxh3-64 checksum of its other fields) says: the global commit E,
the world size, the bucket count of :func:`~.ownership.owner_of`, the shard directories,
the table's dim/dtype/chunk_rows, its init spec and seed (the defaults of ``add``) and its
committed row count. It is written by the decision rank only, as a temporary file, fsynced,
renamed over the old one, then the directory is fsynced (:func:`write_manifest`). Nothing
here imports torch: the CLI reads sharded directories without a process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np
import xxhash

from ..errors import (
    CommitError,
    CorruptionError,
    EmbeddingStoreError,
    FormatVersionError,
    ManifestSyncError,
    NotAStoreError,
    StoreNotFoundError,
)
from ..format.layout import MAX_ROWS, TableLayout
from ..format.records import MAIN, MAX_COMMIT, is_store
from ..fsutil import fsync_dir
from ..processes.writer_lock import holder_pid
from .ownership import owner_of

MANIFEST = "manifest.json"
KIND = "lmdb_embeddings.sharded"
VERSION = 1
HASH = "splitmix64"
COMMIT_ATTR = "dist.commit"  # in every shard's attrs: the global commit the shard holds
ROW_COLUMN = "dist.row"  # per-row global position (float64, exact below 2**53 rows)
RESERVED_PREFIX = "dist."
_SHARD_NAME = re.compile(r"^shard-(\d{5})-([0-9a-f]{8})$")
_TEMP_PREFIX = f".{MANIFEST}.tmp-"


@dataclass
class Manifest:
    commit: int
    world_size: int
    buckets: int
    token: str
    dim: int
    dtype: str
    chunk_rows: int
    init: dict
    seed: int
    rows: int
    shards: list = field(default_factory=list)
    committed_at: float | None = None

    def shard_path(self, root: str, rank: int) -> str:
        return os.path.join(root, self.shards[rank])

    def to_json(self) -> str:
        body = {"kind": KIND, "version": VERSION, "hash": HASH, **asdict(self)}
        return json.dumps({**body, "xxh3": _checksum(body)}, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        try:
            record = json.loads(text)
            stored = record.pop("xxh3")
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            raise CorruptionError(f"{where}: the manifest is damaged ({type(exc).__name__}: {exc})") from None
        if record.get("kind") != KIND:
            raise NotAStoreError(f"{where} is not the manifest of a sharded lmdb_embeddings store")
        if not isinstance(record.get("version"), int) or record["version"] > VERSION:
            raise FormatVersionError(f"{where} was written by a newer sharded format (version "
                                     f"{record.get('version')}; this library reads {VERSION}): upgrade lmdb_embeddings")
        if stored != _checksum(record):
            raise CorruptionError(f"{where}: the manifest is damaged (checksum mismatch)")
        if record.get("hash") != HASH:
            raise CorruptionError(f"{where}: unknown ownership hash {record.get('hash')!r}")
        try:
            manifest = cls(**{k: record[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError) as exc:
            raise CorruptionError(f"{where}: the manifest is damaged (missing {exc})") from None
        problem = manifest.problem()
        if problem:
            raise CorruptionError(f"{where}: the manifest is damaged ({problem})")
        return manifest

    def problem(self) -> str | None:
        """What in this manifest no sharded store could have written (types, ranges, shard names), or None."""
        def whole(value, low, high=None) -> bool:
            return (isinstance(value, int) and not isinstance(value, bool) and value >= low
                    and (high is None or value <= high))

        if not whole(self.buckets, 1, 2**31) or not whole(self.world_size, 1, self.buckets):
            return f"world size {self.world_size!r} over {self.buckets!r} buckets"
        names = [shard_name(r, self.token) for r in range(self.world_size)] if isinstance(self.token, str) else None
        if self.shards != names:
            return f"its shard list does not name one shard per rank of world size {self.world_size}, in rank order"
        if not (whole(self.commit, 0, MAX_COMMIT) and whole(self.rows, 0, MAX_ROWS)):
            return f"commit {self.commit!r}, rows {self.rows!r}"
        if not (isinstance(self.committed_at, (int, float, type(None))) and not isinstance(self.committed_at, bool)):
            return f"committed_at {self.committed_at!r}"
        try:  # the table's shape, init and seed: the same checks as a store's own records
            TableLayout.from_record({"chunk_rows": self.chunk_rows, "rows": self.rows, "commit": self.commit,
                                     "columns": [{"name": MAIN, "width": self.dim, "dtype": self.dtype}],
                                     "config": {"init": self.init, "seed": self.seed},
                                     "committed_at": self.committed_at}, CorruptionError, "the table")
        except CorruptionError as exc:
            return str(exc)
        return None

    def shard_problem(self, root: str, rank: int, dim: int, dtype: str, chunk_rows: int, columns, attrs,
                      id_blocks) -> str | None:
        """Why the shard found under rank ``rank``'s name does not belong there, or None.

        It must have the manifest's shape and carry what every shard carries; and every ID it
        holds (``id_blocks``: arrays of them, all or a sample) must be owned by ``rank``. A
        shard copied back under another rank's name, or a manifest edited or taken from another
        store, fails here instead of serving "unknown" IDs or taking another rank's rows.
        """
        where = f"{self.shard_path(root, rank)} (the shard of rank {rank})"
        if (dim, dtype, chunk_rows) != (self.dim, self.dtype, self.chunk_rows):
            return (f"{root}: the manifest describes dim {self.dim}, {self.dtype}, chunk_rows {self.chunk_rows}, but "
                    f"{where} holds dim {dim}, {dtype}, chunk_rows {chunk_rows}: the manifest and the shards are not "
                    "of one store (edited by hand, or copied from another one); put back the store's own "
                    "manifest.json and shards, or restore the store from a dump")
        if ROW_COLUMN not in columns or COMMIT_ATTR not in attrs:
            return (f"{where} is not the shard of a sharded store (no {ROW_COLUMN!r} column or {COMMIT_ATTR!r} "
                    "attr); put back the store's own shards, or restore the store from a dump")
        for ids in id_blocks:
            owners = owner_of(ids, self.world_size, self.buckets)
            wrong = np.flatnonzero(owners != rank)
            if len(wrong):
                holders = np.unique(owners).tolist()
                whose = (f"the rows of rank {holders[0]} (its name is {self.shards[holders[0]]})"
                         if len(holders) == 1 else f"rows of ranks {holders}")
                return (f"{where} holds {whose}: id {int(ids[wrong[0]])} belongs to rank {int(owners[wrong[0]])} "
                        f"of {self.world_size}; shard directories were swapped or copied under the wrong names: "
                        "give each shard the name of the rank whose rows it holds")
        return None


def _checksum(body: dict) -> int:
    return xxhash.xxh3_64_intdigest(json.dumps(body, sort_keys=True).encode())


def new_token() -> str:
    return uuid.uuid4().hex[:8]


def shard_name(rank: int, token: str) -> str:
    return f"shard-{rank:05d}-{token}"


def manifest_path(root: str) -> str:
    return os.path.join(root, MANIFEST)


def is_sharded(path: str) -> bool:
    """True if ``path`` is a directory holding a sharded store's manifest."""
    return os.path.isfile(manifest_path(path))


def shard_dirs(path: str) -> list[str]:
    """The shard directories of the sharded store at ``path`` (none for a plain store or a damaged manifest)."""
    if is_sharded(path):
        with contextlib.suppress(EmbeddingStoreError):
            manifest = read_manifest(path)
            return [manifest.shard_path(path, r) for r in range(manifest.world_size)]
    return []


def read_manifest(root: str) -> Manifest:
    """The manifest of the sharded store at ``root``.

    Raises:
        StoreNotFoundError: nothing there. NotAStoreError: a directory without a manifest.
        CorruptionError: a damaged manifest. FormatVersionError: a newer format.
    """
    path = manifest_path(root)
    if not os.path.isdir(root):
        raise StoreNotFoundError(f"no sharded store at {root} (the directory does not exist); "
                                 "create one with ShardedEmbeddingStore.create")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if is_store(root):
            raise NotAStoreError(f"{root} is a plain EmbeddingStore, not a sharded one; open it with "
                                 "EmbeddingStore.open, or reshard it with `lmdb-embeddings dump` + "
                                 "`restore --shards W`") from None
        raise StoreNotFoundError(f"no sharded store at {root} (no {MANIFEST}); create one with "
                                 "ShardedEmbeddingStore.create") from None
    except UnicodeDecodeError as exc:
        raise CorruptionError(f"{path}: the manifest is damaged ({exc})") from None
    return Manifest.from_json(text, path)


def write_manifest(root: str, manifest: Manifest) -> None:
    """Make ``manifest`` the store's decision record: temporary file, fsync, rename, fsync the directory.

    The rename is the commit point: before it, the old manifest stands; after it, the new one.

    Raises:
        CommitError: the new manifest could not be written (the old one stands).
        ManifestSyncError: it was renamed into place, but the directory sync failed.
    """
    manifest.committed_at = time.time()
    tmp = os.path.join(root, f"{_TEMP_PREFIX}{os.getpid()}-{new_token()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(manifest.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, manifest_path(root))
    except OSError as exc:
        raise CommitError(f"writing the manifest of commit {manifest.commit} in {root} failed ({exc}); "
                          "the previous manifest stands") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    try:
        fsync_dir(root)
    except OSError as exc:
        raise ManifestSyncError(f"the manifest of commit {manifest.commit} is in place, but syncing {root} failed "
                                f"({exc}): an OS crash may still lose that commit") from exc


def stale_entries(root: str, manifest: Manifest | None) -> list[str]:
    """Shard directories (and manifest temporaries) in ``root`` that the manifest does not name.

    They are left by a create that was killed before its manifest was written, or by the
    store a create replaced. A shard whose writer lock is held is never listed.
    """
    keep = set(manifest.shards) if manifest is not None else set()
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return []
    stale = []
    for entry in entries:
        full = os.path.join(root, entry)
        if entry.startswith(_TEMP_PREFIX):
            stale.append(full)
        elif _SHARD_NAME.match(entry) and entry not in keep and os.path.isdir(full) and holder_pid(full) is None:
            stale.append(full)
    return stale


def only_stale_entries(root: str) -> bool:
    """True if ``root`` holds nothing but leftovers of a killed create (or nothing at all)."""
    try:
        entries = os.listdir(root)
    except OSError:
        return True
    return len(stale_entries(root, None)) == len(entries)


def remove_entries(paths: list[str]) -> None:
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)
