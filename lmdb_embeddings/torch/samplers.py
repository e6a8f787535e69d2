"""Samplers with locality: blocks of whole chunks in random order, then rows shuffled inside a window.

Why: the store reads, checksums, caches and rewrites whole chunks. A full shuffle over a table
larger than the cache touches a different chunk with almost every row, so a batch of B rows
costs about B chunks. :class:`BlockShuffleSampler` cuts the rows into *blocks* of
``block_chunks`` whole chunks, puts the blocks in a random order, takes them ``window_blocks``
at a time as *windows*, and shuffles the rows inside each window uniformly. A window's rows come
out one after another, so while it lasts only its ``window_blocks * block_chunks`` chunks are
touched: a cache holding that many chunks (per column) reads each chunk once per epoch.

It is opt-in, and it is not a full shuffle: a batch is drawn from one window (a random handful of
chunks), so when neighbouring rows are alike (a table created in label order) the rows of a
window are alike too. ``benchmarks/sampler_convergence.py`` measures what that costs on a real
task; README's "Shuffling with locality" gives the figures.

Positions are what ``EmbeddingDataset`` (or any dataset over the same IDs) indexes: row slots of
the store by default, or positions into ``ids`` when a dataset serves its own ID list.

A batch sampler knows its next batches, so it can hint them to the store (``prefetch=k``: when batch
``b`` is yielded, batches ``b+1 .. b+k`` have been passed to ``store.prefetch``); :class:`Lookahead`
does that for these samplers and ``ShardedSampler``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from torch.utils.data import Sampler

from ..errors import InvalidInputError, InvalidTypeError, UnknownIdError
from ..handle import is_sharded, is_table_handle
from ..inputs import as_ids, as_non_negative_int, as_positive_int
from .dataset import EmbeddingDataset

#: positions handed to Python per ``tolist`` call when yielding one position at a time (bounded memory)
_YIELD_SLICE = 1 << 16


def block_shuffle_order(rng: np.random.Generator, block_of: np.ndarray, num_blocks: int,
                        window_blocks: int) -> np.ndarray:
    """Positions ``0..len(block_of)-1`` in block-shuffled order (int64).

    ``block_of[p]`` is the block of position ``p`` (``0 <= block_of < num_blocks``). The blocks
    get a random rank; ranks ``[w * window_blocks, (w + 1) * window_blocks)`` form window ``w``;
    the positions come out window by window, uniformly shuffled inside each window. One sort of
    ``(window, random)`` keys packed into a uint64 does both steps.
    """
    n = len(block_of)
    if n == 0:
        return np.empty(0, np.int64)
    rank = np.empty(num_blocks, np.uint64)
    rank[rng.permutation(num_blocks)] = np.arange(num_blocks, dtype=np.uint64)
    num_windows = -(-num_blocks // window_blocks)
    shift = np.uint64(64 - num_windows.bit_length())  # the window in the high bits, the random key below
    keys = rng.integers(0, 1 << int(shift), size=n, dtype=np.uint64)
    keys |= (rank[block_of] // np.uint64(window_blocks)) << shift
    return np.argsort(keys).astype(np.int64, copy=False)


def block_shuffle_rows(rng: np.random.Generator, num_rows: int, block_rows: int, window_blocks: int) -> np.ndarray:
    """Row slots ``0..num_rows-1`` in block-shuffled order, a block being ``block_rows`` consecutive slots."""
    blocks = np.arange(num_rows, dtype=np.int64) // block_rows
    return block_shuffle_order(rng, blocks, -(-num_rows // block_rows), window_blocks)


class Lookahead:
    """Hints a store with the IDs of the next ``ahead`` batches while a batch sampler yields the current one.

    ``ahead=0`` hints nothing. The hints go to ``store.prefetch`` (a thread of the store's serves them:
    ``core/prefetch.py``), from the process that iterates the sampler: the training process with
    ``num_workers=0``; with workers, the main process, whose hints read the pages ahead into the kernel's
    page cache that the workers share.
    """

    def __init__(self, store: object, ahead: object):
        self.ahead = as_non_negative_int(ahead, "prefetch")
        self.store = store if self.ahead else None
        if self.ahead and not callable(getattr(store, "prefetch", None)):
            raise InvalidInputError("prefetch hints the store the batches come from: pass the store or the "
                                    "dataset as the source (a count of positions has no store)")

    def batches(self, count: int, ids_of: Callable[[int], np.ndarray],
                batch: Callable[[int], list[int]]) -> Iterator[list[int]]:
        """``batch(b)`` for ``b`` in ``range(count)``, the IDs of batches ``b+1 .. b+ahead`` hinted before each."""
        store, ahead = self.store, self.ahead
        for b in range(count):
            if store is not None:
                for nxt in range(b + 1 if b == 0 else b + ahead, min(b + ahead, count - 1) + 1):
                    store.prefetch(ids_of(nxt))  # type: ignore[attr-defined]
            yield batch(b)


class _BlockShuffle:
    """What both samplers share: the positions' blocks, the options, the epoch and its order."""

    def __init__(self, source: object, ids: object, chunk_rows: int | None, block_chunks: int,
                 window_blocks: int, seed: int):
        self.block_chunks = as_positive_int(block_chunks, "block_chunks")
        self.window_blocks = as_positive_int(window_blocks, "window_blocks")
        self.seed = as_non_negative_int(seed, "seed")
        self.epoch = 0
        self.num_positions, self.chunk_rows, slots = _positions(source, ids, chunk_rows)
        self.block_rows = self.chunk_rows * self.block_chunks
        if slots is None:  # positions are row slots: blocks follow from the count, nothing to keep per row
            self._block_of: np.ndarray | None = None
            self.num_blocks = -(-self.num_positions // self.block_rows)
        else:  # the blocks the positions' rows fall in, numbered densely (no empty block, no empty window)
            present, self._block_of = np.unique(slots // self.block_rows, return_inverse=True)
            self.num_blocks = len(present)

    def set_epoch(self, epoch: int) -> None:
        """Use the order of epoch ``epoch``: call it before each epoch, as for ``DistributedSampler``
        (without it every epoch repeats the same order); the same (seed, epoch) gives the same order."""
        self.epoch = as_non_negative_int(epoch, "epoch")

    def order(self) -> np.ndarray:
        """This epoch's positions, in the order they are yielded (int64; every position exactly once)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        if self._block_of is None:
            return block_shuffle_rows(rng, self.num_positions, self.block_rows, self.window_blocks)
        return block_shuffle_order(rng, self._block_of, self.num_blocks, self.window_blocks)

    def _describe(self) -> str:
        return (f"{self.num_positions} positions, chunk_rows={self.chunk_rows}, block_chunks={self.block_chunks}, "
                f"window_blocks={self.window_blocks}, seed={self.seed}, epoch={self.epoch}")


class BlockShuffleSampler(_BlockShuffle, Sampler[int]):
    """Yields every position once per epoch, blocks of whole chunks in random order, rows shuffled per window.

    Args:
        source: an ``EmbeddingStore`` (positions are its row slots, as ``EmbeddingDataset(store)`` indexes
            them), an ``EmbeddingDataset`` (positions into its ``ids``), or the number of positions
            ``n`` (then ``chunk_rows`` is required: position ``p`` lies in chunk ``p // chunk_rows``).
        ids: with a store, the IDs the dataset serves, position ``i`` being ``ids[i]`` (for example the ID
            column of a ``TensorDataset``): positions are grouped by the chunk their ID's row lies in.
        chunk_rows: only with a count (a store tells its own ``store.chunk_rows``).
        block_chunks: chunks per block (consecutive chunks stay together).
        window_blocks: blocks per window; the rows of a window are shuffled together. A window touches
            at most ``window_blocks * block_chunks`` chunks: give the cache room for them.
        seed: with the epoch (:meth:`set_epoch`), decides the order.

    Use as ``DataLoader(ds, sampler=BlockShuffleSampler(store), batch_size=B)``, or
    :class:`BlockShuffleBatchSampler` as ``batch_sampler=`` (no Python loop per row). The IDs are read
    when the sampler is made; make a new one after ``store.add``.
    """

    def __init__(self, source: object, ids: object = None, *, chunk_rows: int | None = None,
                 block_chunks: int = 1, window_blocks: int = 16, seed: int = 0):
        _BlockShuffle.__init__(self, source, ids, chunk_rows, block_chunks, window_blocks, seed)

    def __len__(self) -> int:
        return self.num_positions

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        for start in range(0, len(order), _YIELD_SLICE):
            yield from order[start : start + _YIELD_SLICE].tolist()

    def __repr__(self) -> str:
        return f"BlockShuffleSampler({self._describe()})"


class BlockShuffleBatchSampler(_BlockShuffle, Sampler[list[int]]):
    """:class:`BlockShuffleSampler`'s order cut into batches of ``batch_size`` positions (lists of ints).

    For ``DataLoader(ds, batch_sampler=...)``: with ``EmbeddingDataset`` each batch is ONE ``get``. The last
    batch of an epoch may be shorter; ``drop_last=True`` drops it, as ``BatchSampler`` does. Same
    arguments as :class:`BlockShuffleSampler`, plus ``batch_size``, ``drop_last`` and ``prefetch``: the number
    of batches ahead whose IDs are hinted to the store (``store.prefetch``) while a batch is yielded (0: none;
    it needs a store or a dataset as the source).
    """

    def __init__(self, source: object, batch_size: int, ids: object = None, *, drop_last: bool = False,
                 chunk_rows: int | None = None, block_chunks: int = 1, window_blocks: int = 16, seed: int = 0,
                 prefetch: int = 0):
        self.batch_size = as_positive_int(batch_size, "batch_size")
        if not isinstance(drop_last, (bool, np.bool_)):
            raise InvalidTypeError(f"drop_last must be a bool, got {drop_last!r}")
        self.drop_last = bool(drop_last)
        _BlockShuffle.__init__(self, source, ids, chunk_rows, block_chunks, window_blocks, seed)
        store = source.store if isinstance(source, EmbeddingDataset) else source if is_table_handle(source) else None
        self._lookahead = Lookahead(store, prefetch)
        self._served = _served_ids(source, ids) if self._lookahead.ahead else None  # only hints need the IDs

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_positions // self.batch_size
        return -(-self.num_positions // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order, size, served = self.order(), self.batch_size, self._served
        yield from self._lookahead.batches(len(self), lambda b: served[order[b * size : (b + 1) * size]],
                                           lambda b: order[b * size : (b + 1) * size].tolist())

    def __repr__(self) -> str:
        return (f"BlockShuffleBatchSampler(batch_size={self.batch_size}, drop_last={self.drop_last}, "
                f"prefetch={self._lookahead.ahead}, {self._describe()})")


def _positions(source: object, ids: object, chunk_rows: object) -> tuple[int, int, np.ndarray | None]:
    """(number of positions, chunk_rows, row slot of each position or None when position == slot)."""
    if isinstance(source, (int, np.integer)) and not isinstance(source, bool):
        if ids is not None:
            raise InvalidInputError("ids need a store to say where their rows are; pass the store as the source")
        if chunk_rows is None:
            raise InvalidInputError("chunk_rows is required with a count of positions (a store tells its own)")
        return as_non_negative_int(source, "the number of positions"), as_positive_int(chunk_rows, "chunk_rows"), None
    if is_table_handle(source) and is_sharded(source):
        raise InvalidTypeError("a ShardedEmbeddingStore is sampled per rank: use "
                               "ShardedSampler(store, batch_size, block_chunks=...) from lmdb_embeddings.distributed")
    store = source
    if isinstance(source, EmbeddingDataset):  # positions into its ids
        if ids is not None:
            raise InvalidInputError("the dataset already names its ids: pass either a dataset, or a store and ids")
        store, ids = source.store, source.ids
    if not is_table_handle(store):
        raise InvalidTypeError(f"the source must be an EmbeddingStore, an EmbeddingDataset or a count of positions, "
                               f"got {type(source).__name__}")
    own = int(store.chunk_rows)
    if chunk_rows is not None and chunk_rows != own:
        raise InvalidInputError(f"chunk_rows={chunk_rows!r} differs from the store's chunk_rows={own}; leave it out")
    store_ids = store.ids  # type: ignore[attr-defined]
    if ids is None:
        return len(store_ids), own, None
    wanted = as_ids(ids, "BlockShuffleSampler ids")
    if len(wanted) == len(store_ids) and np.array_equal(wanted, store_ids):
        return len(wanted), own, None
    return len(wanted), own, _slots(store_ids, wanted)


def _served_ids(source: object, ids: object) -> np.ndarray:
    """The ID at each position of a checked store or dataset source (what a hint names)."""
    if isinstance(source, EmbeddingDataset):
        return source.ids
    return source.ids if ids is None else as_ids(ids, "BlockShuffleSampler ids")  # type: ignore[attr-defined]


def _slots(store_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The row slot of each of ``ids`` (its position in ``store_ids``); unknown IDs are a ``KeyError``."""
    sorter = np.argsort(store_ids, kind="stable")
    at = np.minimum(np.searchsorted(store_ids, ids, sorter=sorter), max(len(store_ids) - 1, 0))
    slots = sorter[at] if len(store_ids) else np.empty(0, np.int64)
    missing = ids[store_ids[slots] != ids] if len(store_ids) else ids
    if len(missing):
        raise UnknownIdError(f"BlockShuffleSampler: {len(missing)} of the ids are not in the store "
                             f"(e.g. {missing[:5].tolist()}); pass IDs of the store (store.ids lists them)")
    return slots


__all__ = ["BlockShuffleSampler", "BlockShuffleBatchSampler", "Lookahead", "block_shuffle_order", "block_shuffle_rows"]
