"""The collective steps of ``ShardedEmbeddingStore.create`` and ``open``, up to an open shard on every rank.

``create``: the ranks agree that they were given the same valid table (a fingerprint
all-gathered); rank 0 checks the target and picks a new token; every rank builds its shard
under that token; rank 0 writes the manifest, the moment the new store exists (the replaced
store's shards are removed after). ``open``: rank 0 reads the manifest, every rank checks
the world size. Both end in :func:`attach_shard`: open this rank's shard, recover (the
two-phase commit's other half) and check the row count. Every step is agreed, so a failure
anywhere raises on every rank, and a create that fails removes its new shards.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from ..core.table_spec import TableSpec
from ..errors import CorruptionError, EmbeddingStoreError, InvalidInputError
from ..options import StoreOptions
from ..sharding.creation import build_shard, plan_create
from ..sharding.manifest import Manifest, remove_entries, shard_name, stale_entries, write_manifest
from ..sharding.ownership import DEFAULT_BUCKETS
from .collective import Collective, attempt, error_code
from .shard import Shard
from .twophase import read_manifest_on_rank0, recover

log = logging.getLogger(__name__)

_SHOWN = 10


def shard_options(open_options: dict) -> StoreOptions:
    """The user's open options, checked (``undo_log`` is not one: the sharded store sets it on its shards)."""
    return StoreOptions.from_kwargs(open_options)


def create_shards(c: Collective, path: str, table_args: tuple, overwrite: bool,
                  open_options: dict) -> tuple[Manifest, StoreOptions]:
    """Build a new sharded store at ``path`` (every rank its shard); returns (manifest, shard options)."""
    table, error = attempt(TableSpec.from_create_args, *table_args)
    options, options_error = attempt(shard_options, open_options)
    c.agree(error or options_error)
    prints = c.all_gather_ints([table.fingerprint()])[:, 0]
    if (prints != prints[0]).any():
        ranks = ", ".join(str(r) for r in np.flatnonzero(prints != prints[0])[:_SHOWN])
        raise InvalidInputError(f"create: rank(s) {ranks} passed other ids, dim, dtype, chunk_rows, init or seed "
                                "than rank 0; every rank must pass the same global table")
    plan, error = attempt(plan_create, path, overwrite) if c.rank == 0 else (None, None)
    c.agree(error)
    plan = c.broadcast_object(plan, 0)
    manifest = Manifest(commit=0, world_size=c.world_size, buckets=DEFAULT_BUCKETS, token=plan["token"],
                        dim=table.dim, dtype=table.dtype.name, chunk_rows=table.chunk_rows, init=table.init,
                        seed=table.seed, rows=table.rows,
                        shards=[shard_name(r, plan["token"]) for r in range(c.world_size)])
    mine = manifest.shard_path(path, c.rank)
    _, error = attempt(build_shard, mine, table, manifest, c.rank)
    _agree_or_remove(c, error, mine)
    _, error = attempt(write_manifest, path, manifest) if c.rank == 0 else (None, None)
    _agree_or_remove(c, error, mine)
    _remove_replaced(c, path, manifest, plan["old"])
    return manifest, options


def read_for_open(c: Collective, path: str, open_options: dict) -> tuple[Manifest, StoreOptions]:
    """The manifest of the store at ``path``, checked against this group; returns (manifest, shard options)."""
    options, error = attempt(shard_options, open_options)
    c.agree(error)
    manifest = read_manifest_on_rank0(c, path)
    if manifest.world_size != c.world_size:
        raise EmbeddingStoreError(
            f"{path} is sharded for world size {manifest.world_size}, but this process group has world size "
            f"{c.world_size}; run it with {manifest.world_size} ranks, or reshard it: `lmdb-embeddings dump "
            f"{path} OUT` then `lmdb-embeddings restore OUT NEW_PATH --shards {c.world_size}`")
    return manifest, options


def attach_shard(c: Collective, path: str, manifest: Manifest, readonly: bool,
                 options: StoreOptions) -> tuple[Shard, Manifest]:
    """Open this rank's shard, check that it is this rank's and the manifest's, bring all shards to the
    manifest's commit, check the row count."""
    shard, error = attempt(_open_own_shard, path, manifest, c.rank, readonly, options)
    try:
        c.agree(error)
        manifest = recover(c, path, manifest, shard, readonly)
        rows = int(c.all_gather_ints([len(shard.store)])[:, 0].sum()) if not readonly else manifest.rows
        if rows != manifest.rows:  # (a reader's rows come from its one consistent read in recover)
            raise CorruptionError(f"{path}: the shards hold {rows} rows, the manifest of commit "
                                  f"{manifest.commit} says {manifest.rows}")
    except BaseException:
        if shard is not None:
            shard.release()
        raise
    return shard, manifest


def _open_own_shard(path: str, manifest: Manifest, rank: int, readonly: bool, options: StoreOptions) -> Shard:
    """This rank's shard, opened; refused (CorruptionError) unless it belongs to this rank and the manifest.

    Checked before anything is recovered or written: a shard copied back under another rank's name
    would otherwise answer "unknown id" for this rank's rows and take the other rank's new ones.
    """
    shard = Shard(manifest.shard_path(path, rank), readonly=readonly, options=options)
    try:
        problem = shard.mismatch(manifest, path, rank)
    except BaseException:
        shard.release()
        raise
    if problem is not None:
        shard.release()
        raise CorruptionError(problem)
    return shard


def _remove_replaced(c: Collective, path: str, manifest: Manifest, old_shards: list[str]) -> None:
    """After a create's manifest: remove the replaced store's shards and leftovers (best effort)."""
    if c.rank == 0:
        _, error = attempt(lambda: remove_entries(stale_entries(path, manifest)))
        if error is not None:
            log.warning("%s: could not remove old shards (%s); the next create removes them", path, error)
    c.barrier()
    if c.rank != 0:  # another node's copy of the directory
        remove_entries([p for p in (os.path.join(path, n) for n in old_shards) if os.path.isdir(p)])


def _agree_or_remove(c: Collective, error, shard_path: str) -> None:
    """Agree on a create step; if it failed anywhere, remove this rank's new shard, then raise."""
    codes = c.all_gather_ints([error_code(error)])[:, 0]
    if codes.any():
        remove_entries([shard_path] if os.path.isdir(shard_path) else [])
        c.raise_if_failed(codes, error)
