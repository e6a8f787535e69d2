"""Which rank owns a sample ID: a fixed hash of the ID itself, never of its position.

``owner_of(ids, world_size)``: the 64-bit ID is mixed by splitmix64 (Steele, Lea & Flood's
finalizer, the one ``java.util.SplittableRandom`` uses), reduced to one of ``buckets``
buckets (``hash % buckets``), and bucket ``b`` belongs to rank ``b * world_size // buckets``
(contiguous bucket ranges of equal size, to within one bucket). The bucket count is fixed
when a store is created and recorded in its manifest, so the owner of an ID depends only on
the ID and the world size; resharding moves whole buckets. splitmix64 spreads sequential,
strided and clustered IDs evenly, so every rank owns about ``len(ids) / world_size`` of any
ID set. Pure numpy, no torch: the CLI uses it too.
"""

from __future__ import annotations

import numpy as np

from ..errors import InvalidInputError
from ..inputs import as_ids

DEFAULT_BUCKETS = 1 << 16
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def splitmix64(ids: np.ndarray) -> np.ndarray:
    """splitmix64 of each int64 (its two's-complement bits), as uint64; arithmetic modulo 2**64."""
    z = np.asarray(ids, np.int64).view(np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def bucket_of(ids, buckets: int = DEFAULT_BUCKETS) -> np.ndarray:
    """The bucket (0 .. buckets-1) of every ID, as int64."""
    buckets = _check_count(buckets, "buckets")
    return (splitmix64(as_ids(ids)) % np.uint64(buckets)).astype(np.int64)


def owner_of(ids, world_size: int, buckets: int = DEFAULT_BUCKETS) -> np.ndarray:
    """The owning rank (0 .. world_size-1) of every ID, as an int64 array.

    Args:
        ids: int, sequence, numpy array or tensor of int64 sample IDs.
        world_size: number of ranks. buckets: the store's bucket count (its manifest's
            ``buckets``; the default is what ``ShardedEmbeddingStore.create`` records).
    """
    world_size = _check_count(world_size, "world_size")
    buckets = _check_count(buckets, "buckets")
    if world_size > buckets:
        raise InvalidInputError(f"world_size {world_size} exceeds the store's {buckets} buckets; "
                                "a rank would own no bucket")
    return bucket_of(ids, buckets) * world_size // buckets


def _check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidInputError(f"{name} must be a positive int, got {value!r}")
    return int(value)
