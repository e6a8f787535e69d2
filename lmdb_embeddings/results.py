"""What the API returns: what ``stats()`` and the operations hold.

Most are ``TypedDict``s, plain ``dict``s at run time (``json.dumps`` takes them as they are); the
types let a type checker (mypy, pyright) check the keys a caller reads. ``verify``'s report is a
dataclass (:class:`VerifyReport` with its :class:`Problem` list) that still reads as the mapping it
was (``report["ok"]``, ``dict(report)``, ``==`` with a dict); ``as_dict()`` gives plain dicts for
``json.dumps``. A sharded store's ``info``, ``verify`` and ``restore`` give the same keys plus those
marked below.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypedDict


class StoreStats(TypedDict):
    """``EmbeddingStore.stats()``: this handle's cache and commit counters."""

    l1_hits: int
    l1_misses: int
    l2_hits: int
    l2_misses: int
    hit_rate: float  # (l1_hits + l2_hits) / lookups, 0.0 before any lookup
    chunks_loaded: int  # chunks read from LMDB (and checksummed)
    map_rows: int  # rows copied straight out of LMDB's map (a table larger than the cache)
    commits: int  # commits made by this handle
    bytes_committed: int
    dirty_chunks: int  # chunks changed since the last commit
    spilled_chunks: int  # dirty chunks written into the pending transaction (the cache was full)
    buffered_rows: int  # rows held in the write buffers now (written beyond the cache, not merged yet)
    buffer_merges: int  # write-buffer merges (per column): each rewrote its changed chunks once
    merged_chunks: int  # chunks those merges wrote into the pending transaction
    cache_bytes: int
    cache_budget_bytes: int
    l1_chunks: int
    l2_chunks: int
    rows: int
    store_commit: int  # the store's commit count as this handle sees it
    last_commit_time: float | None  # unix time of that commit
    anon_bytes: int  # the whole process's anonymous resident memory (RssAnon)


class ColumnInfo(TypedDict):
    width: int
    dtype: str
    fill: float


class LmdbFigures(TypedDict):
    page_size: int
    map_size: int
    pages_in_use: int
    pages_in_tables: int
    free_pages: int
    readers: int
    max_readers: int
    databases: list[str]


class _StoreInfo(TypedDict):
    path: str
    rows: int
    dim: int
    dtype: str
    chunk_rows: int
    chunks: int
    columns: dict[str, ColumnInfo]  # the auxiliary columns (optimizer state)
    format_version: int
    commit_count: int
    last_commit: str | None  # ISO 8601, UTC
    last_commit_unix: float | None
    attrs: list[str]  # the names of the store's attrs
    bytes_on_disk: int  # every file of the store, allocated blocks
    data_file_bytes: int  # data.mdb, allocated blocks
    data_file_size: int  # data.mdb, apparent size (sparse beyond the committed pages)
    committed_bytes: int
    table_bytes: int  # rows x (row bytes + ID bytes): what the table itself takes
    lmdb: LmdbFigures
    writer_pid: int | None
    writer_active: bool
    init: dict[str, Any] | None
    seed: int | None


class StoreInfo(_StoreInfo, total=False):
    """``store_info(path)`` (``lmdb-embeddings info --json``)."""

    sharded: dict[str, Any]  # a sharded store: world_size and each shard's figures


class ResultMapping(Mapping[str, Any]):
    """A result dataclass that reads as the mapping it used to be: ``result["ok"]``, ``result.get(...)``,
    ``dict(result)``, ``==`` with a dict; :meth:`as_dict` gives plain dicts and lists (``json.dumps`` takes
    it). A field left at ``None`` among ``_optional`` is absent, as the key was."""

    _optional: ClassVar[frozenset[str]] = frozenset()

    def _keys(self) -> list[str]:
        return [f.name for f in fields(self)
                if not (f.name in self._optional and getattr(self, f.name) is None)]

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def as_dict(self) -> dict[str, Any]:
        return {key: _plain(getattr(self, key)) for key in self._keys()}


def _plain(value: Any) -> Any:
    if isinstance(value, ResultMapping):
        return value.as_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True, eq=False)
class Problem(ResultMapping):
    """One thing ``verify`` found wrong."""

    part: str  # "ids", "column 'embeddings'", "metadata", "shard 1 ids", ...
    chunk: int | None  # the chunk it is in; None for metadata and the IDs as a whole
    error: str


@dataclass(eq=False)
class VerifyReport(ResultMapping):
    """``verify_store(path)`` of a plain or sharded store: ``ok``, the first ``MAX_LISTED`` problems and how
    many more, the bad chunks; the table's figures when its metadata could be read (absent keys otherwise)."""

    path: str
    ok: bool = True
    problems: list[Problem] = field(default_factory=list)
    problems_not_listed: int = 0
    bad_chunks: list = field(default_factory=list)  # chunk numbers; "shard R chunk C" for a sharded store
    chunks_checked: int = 0
    rows: int | None = None
    dim: int | None = None
    dtype: str | None = None
    chunk_rows: int | None = None
    chunks: int | None = None
    commit: int | None = None
    columns: list[str] | None = None
    sharded: bool | None = None  # a sharded store's report
    world_size: int | None = None

    _optional: ClassVar[frozenset[str]] = frozenset(
        {"rows", "dim", "dtype", "chunk_rows", "chunks", "commit", "columns", "sharded", "world_size"})


VerifyProblem = Problem  # its name when it was a TypedDict


class DumpResult(TypedDict):
    """``dump_store(path, out)``."""

    path: str
    out: str
    format: str
    rows: int
    chunks: int
    columns: list[str]
    commit: int  # the commit the dump holds
    bytes: int
    seconds: float


class _RestoreResult(TypedDict):
    path: str
    source: str
    format: str
    rows: int
    dim: int
    dtype: str
    columns: list[str]
    replaced: bool  # an old store at path was replaced (force)
    seconds: float


class RestoreResult(_RestoreResult, total=False):
    """``restore_store(src, path)``."""

    shards: int  # restore --shards W


class CompactResult(TypedDict):
    """``compact_store(path)``: the disk the data file took before and after (allocated bytes)."""

    path: str
    bytes_before: int
    bytes_after: int
    compacted: bool  # False: the copy would not have been smaller, the store was left as it was
    seconds: float
