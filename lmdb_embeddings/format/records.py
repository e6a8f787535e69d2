"""The store directory and its metadata records: the vocabulary every layer shares.

A store is a directory holding one LMDB environment (``data.mdb``) with these named
databases: ``meta`` (the ``format``, ``config`` and ``state`` records), ``ids`` (the sample
IDs, chunked like the rows) and one ``col:<name>`` per column (``col:embeddings`` first).
Each record is msgpack with an xxh3-64 checksum of its other fields (docs/FORMAT.md).
"""

from __future__ import annotations

import os

import msgpack
import xxhash

from ..errors import CorruptionError, FormatVersionError, NotAStoreError, StoreNotFoundError

MAGIC = "lmdb_embeddings"
FORMAT_VERSION = 1
DATA_FILE = "data.mdb"
META_DB = b"meta"
IDS_DB = b"ids"
MAIN = "embeddings"
RECORD_CHECKSUM = "xxh3"
#: Commit numbers and chunk versions above this are damage, not history (2**62 commits: over a
#: century at a billion a second); below it, every ``commit + 1`` the code computes fits an int64.
MAX_COMMIT = 2**62


def column_db_name(name: str) -> bytes:
    """The LMDB database holding column ``name``'s chunks."""
    return b"col:" + name.encode()


def is_store(path: str) -> bool:
    """True if ``path`` is a directory holding a store's data file."""
    return os.path.isfile(os.path.join(path, DATA_FILE))


def check_store_dir(path: str) -> None:
    """Raise the one right error if ``path`` holds no store (the only place that decides it)."""
    if not os.path.lexists(path):
        raise StoreNotFoundError(f"no store at {path}: the path does not exist; create one with "
                                 "EmbeddingStore.create or lmdb-embeddings create")
    if not os.path.isdir(path):
        raise NotAStoreError(f"{path} is not an lmdb_embeddings store: it is not a directory")
    if not is_store(path):
        if not os.listdir(path):
            raise StoreNotFoundError(f"no store at {path}: the directory is empty; create one with "
                                     "EmbeddingStore.create or lmdb-embeddings create")
        raise NotAStoreError(f"{path} is not an lmdb_embeddings store (no {DATA_FILE} in it)")


def pack_record(record: dict) -> bytes:
    """msgpack a metadata record with an xxh3-64 checksum of its other fields.

    LMDB has no checksums; without this a flipped byte in the state or config record
    (row count, chunk_rows ...) could open as a different, wrong table.
    """
    body = {k: v for k, v in record.items() if k != RECORD_CHECKSUM}
    return msgpack.packb({**body, RECORD_CHECKSUM: xxhash.xxh3_64_intdigest(msgpack.packb(body))})


def unpack_record(raw, key: bytes, verify: bool = True) -> dict:
    """Decode a metadata record written by :func:`pack_record` and check its checksum.

    Records written without a checksum (older stores) are accepted as they are.
    """
    try:
        record = msgpack.unpackb(bytes(raw))
    except Exception as exc:
        raise CorruptionError(f"the store metadata record {key.decode()!r} is damaged ({exc})") from None
    if not isinstance(record, dict):
        raise CorruptionError(f"the store metadata record {key.decode()!r} is damaged (not a map)")
    if RECORD_CHECKSUM in record:
        stored = record.pop(RECORD_CHECKSUM)
        if verify and stored != xxhash.xxh3_64_intdigest(msgpack.packb(record)):
            raise CorruptionError(f"the store metadata record {key.decode()!r} is damaged (checksum mismatch)")
    return record


def read_record(txn, key: bytes, meta_db, path: str, verify: bool = True) -> dict:
    """One checked metadata record of the store at ``path``, as of ``txn``."""
    raw = txn.get(key, db=meta_db)
    if raw is None:
        raise NotAStoreError(f"{path} is not an lmdb_embeddings store (no {key.decode()!r} metadata record)")
    try:
        return unpack_record(raw, key, verify)
    except CorruptionError as exc:
        raise CorruptionError(f"{path}: {exc}") from None


def read_format(txn, meta_db, path: str) -> dict:
    """The checked format record: magic and version first, its checksum only for a version we read.

    A newer format may checksum its records differently, so its version is judged before its checksum.
    """
    fmt = read_record(txn, b"format", meta_db, path, verify=False)
    if not isinstance(fmt, dict) or fmt.get("magic") != MAGIC:
        raise NotAStoreError(f"{path} is not an lmdb_embeddings store (bad magic)")
    version = fmt.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FormatVersionError(f"{path} was written in format version {version}; this library reads up to "
                                 f"version {FORMAT_VERSION}: upgrade lmdb_embeddings")
    return read_record(txn, b"format", meta_db, path)


def read_metadata(txn, meta_db, path: str) -> tuple[dict, dict]:
    """The checked (config, state) records of the store at ``path``, as of ``txn``."""
    read_format(txn, meta_db, path)
    return read_record(txn, b"config", meta_db, path), read_record(txn, b"state", meta_db, path)


def format_record() -> dict:
    return {"magic": MAGIC, "format_version": FORMAT_VERSION}


def state_record(commit: int, rows: int, committed_at: float, attrs: dict, columns: dict,
                 reverts: list | None = None) -> dict:
    """The ``state`` record a commit writes: what a reader needs to catch up with it.

    ``reverts``: the store's history of undone commits (``core.undo``), carried forward; absent if none.
    """
    record = {"commit": commit, "rows": rows, "committed_at": committed_at, "attrs": attrs, "columns": columns}
    if reverts:
        record["reverts"] = reverts
    return record
