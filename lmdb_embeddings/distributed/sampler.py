"""ShardedSampler: batches of the IDs this rank owns, so per-sample lookups never leave the rank.

Per-sample tables have a property shared features lack: the sample decides the row. A
sampler that gives rank r only the samples r owns makes every ``StoreEmbedding`` lookup
local (the exchange moves nothing but counts), leaving DDP's dense all-reduce as the only
traffic. Every rank yields the same number of batches of the same sizes (a rank owning
fewer IDs repeats its own, as ``DistributedSampler`` pads), so collective calls stay in step.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from ..core.inputs import as_non_negative_int, as_positive_int
from ..errors import InvalidInputError, InvalidTypeError
from ..torch.samplers import Lookahead, block_shuffle_rows
from .store import ShardedEmbeddingStore


class ShardedSampler(Sampler):
    """A batch sampler over the IDs this rank owns in ``store`` (a ``ShardedEmbeddingStore``).

    Yields lists of sample IDs (not positions): ``batch_size`` per batch, the last batch of
    an epoch possibly shorter, the same count and sizes on every rank. Every ID this rank
    owns appears at least once per epoch. With ``shuffle``, the order is a permutation seeded
    by ``(seed, epoch, rank)``: call :meth:`set_epoch` before each epoch to reshuffle,
    reproducibly. The IDs are read when the sampler is made (a collective call: every rank
    constructs it); make a new one after ``add``.

    ``block_chunks=k`` shuffles with locality instead, as ``le.BlockShuffleSampler`` does over the
    rank's shard: blocks of ``k`` whole chunks of the shard in random order, the rows shuffled inside
    windows of ``window_blocks`` blocks (opt-in; it needs ``shuffle=True``).

    ``prefetch=k`` hints this rank's next ``k`` batches to ``store.prefetch`` (its own shard) while a batch
    is yielded, as ``le.BlockShuffleBatchSampler(prefetch=k)`` does.
    """

    def __init__(self, store: ShardedEmbeddingStore, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 block_chunks: int | None = None, window_blocks: int = 16, prefetch: int = 0):
        if not isinstance(store, ShardedEmbeddingStore):
            raise InvalidTypeError(f"ShardedSampler needs a ShardedEmbeddingStore, got {type(store).__name__}; "
                                   "for a plain store use torch's BatchSampler")
        self.batch_size = as_positive_int(batch_size, "batch_size")
        self.shuffle, self.seed = bool(shuffle), as_non_negative_int(seed, "seed")
        self.block_chunks, self.window_blocks = _block_options(block_chunks, window_blocks, self.shuffle)
        self.chunk_rows = store.local.chunk_rows
        self.rank = store.rank
        self.epoch = 0
        self._ids = store.local.ids
        counts = store.collective.all_gather_ints([len(self._ids)])[:, 0]
        self.samples_per_rank = int(counts.max()) if len(counts) else 0  # after padding, on every rank
        self.num_batches = -(-self.samples_per_rank // self.batch_size)
        self._lookahead = Lookahead(store, prefetch)

    def set_epoch(self, epoch: int) -> None:
        """Use the order of epoch ``epoch`` (reproducible: the same epoch gives the same batches)."""
        self.epoch = as_non_negative_int(epoch, "epoch")

    def __len__(self) -> int:
        return self.num_batches

    def epoch_ids(self) -> np.ndarray:
        """This epoch's IDs in order, padded to ``samples_per_rank`` by repeating the start."""
        ids = self._ids
        if self.shuffle and len(ids):
            rng = np.random.default_rng([self.seed, self.epoch, self.rank])
            if self.block_chunks is None:
                ids = ids[rng.permutation(len(ids))]
            else:  # the shard's row slots are the positions in ids: chunk s // chunk_rows
                ids = ids[block_shuffle_rows(rng, len(ids), self.chunk_rows * self.block_chunks, self.window_blocks)]
        if 0 < len(ids) < self.samples_per_rank:
            ids = np.resize(ids, self.samples_per_rank)  # cycles through ids, as DistributedSampler pads
        return ids

    def __iter__(self) -> Iterator[list[int]]:
        ids, size = self.epoch_ids(), self.batch_size
        yield from self._lookahead.batches(self.num_batches, lambda b: ids[b * size : (b + 1) * size],
                                           lambda b: ids[b * size : (b + 1) * size].tolist())


def _block_options(block_chunks, window_blocks, shuffle: bool) -> tuple[int | None, int]:
    """``(block_chunks, window_blocks)`` checked: positive ints, blocks only with ``shuffle``."""
    window_blocks = as_positive_int(window_blocks, "window_blocks")
    if block_chunks is None:
        return None, window_blocks
    if not shuffle:
        raise InvalidInputError("block_chunks shuffles blocks of chunks: it needs shuffle=True")
    return as_positive_int(block_chunks, "block_chunks"), window_blocks
