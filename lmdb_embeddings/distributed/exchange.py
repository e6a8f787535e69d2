"""Moving rows between ranks: one ``all_to_all_single`` per direction, after one all-gather of counts.

A :class:`Route` is planned once per collective call from the owner of every ID: the
all-gather of ``[status, count to rank 0, ..., count to rank W-1]`` from every rank
(:meth:`Exchange.route`) both runs the collective validation and tells every rank how many
records it will receive from whom. :meth:`Exchange.send` then moves any number of
per-ID arrays to the owners in ONE ``all_to_all_single`` (they are packed side by side
into fixed-size byte records, so dtypes do not matter), and :meth:`Exchange.send_back`
returns per-ID results to the requesters, back in their original order.

gloo runs it on CPU tensors; an NCCL-only group gets the bytes on this rank's GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .collective import Collective, error_code


@dataclass
class Route:
    """Who sends how many records to whom in one collective call."""

    order: np.ndarray  # positions of this rank's IDs, grouped by owner (stable)
    matrix: np.ndarray  # (W, W): matrix[s, d] = records rank s sends to rank d
    rank: int
    flags: np.ndarray  # (W,): the ``flag`` every rank passed to ``route``

    @property
    def send_counts(self) -> np.ndarray:
        return self.matrix[self.rank]

    @property
    def recv_counts(self) -> np.ndarray:
        return self.matrix[:, self.rank]

    @property
    def sources(self) -> np.ndarray:
        """The sending rank of every received record."""
        return np.repeat(np.arange(len(self.matrix)), self.recv_counts)

    @property
    def total(self) -> int:
        """Records moved by all ranks together (0: nobody sends anything)."""
        return int(self.matrix.sum())

    def sent_by(self, rank: int) -> int:
        return int(self.matrix[rank].sum())


class Exchange:
    def __init__(self, collective: Collective):
        self.collective = collective

    def route(self, owners: np.ndarray | None, error: BaseException | None, context: str = "",
              flag: int = 0) -> Route:
        """Plan the exchange of this rank's IDs (their owners), agreeing on ``error`` at the same time.

        ``flag``: one more small int every rank learns from every rank (same all-gather).
        Raises the collective error (every rank, same class) if any rank passed one.
        """
        c = self.collective
        owners = np.empty(0, np.int64) if owners is None or error is not None else owners
        counts = np.bincount(owners, minlength=c.world_size) if len(owners) else np.zeros(c.world_size, np.int64)
        gathered = c.all_gather_ints(np.concatenate([[error_code(error), flag], counts]))
        c.raise_if_failed(gathered[:, 0], error, context)
        return Route(order=np.argsort(owners, kind="stable"), matrix=gathered[:, 2:], rank=c.rank,
                     flags=gathered[:, 1])

    def send(self, route: Route, *arrays: np.ndarray) -> list[np.ndarray]:
        """Each array's rows (one per ID, in the caller's order) delivered to the IDs' owners.

        Returns the received arrays, rows grouped by sending rank (rank 0's first), each
        sender's rows in its own order.
        """
        ordered = [np.asarray(a)[route.order] for a in arrays]
        return self._all_to_all(route, ordered, route.send_counts, route.recv_counts)

    def send_back(self, route: Route, *arrays: np.ndarray) -> list[np.ndarray]:
        """The inverse of :meth:`send`: rows of received records returned to their senders, in caller order."""
        received = self._all_to_all(route, [np.asarray(a) for a in arrays], route.recv_counts, route.send_counts)
        out = []
        for part in received:
            restored = np.empty_like(part)
            restored[route.order] = part
            out.append(restored)
        return out

    def _all_to_all(self, route: Route, arrays: list[np.ndarray], send_counts, recv_counts) -> list[np.ndarray]:
        n_in, n_out = int(send_counts.sum()), int(recv_counts.sum())
        layout = [(a.dtype, a.shape[1:]) for a in arrays]
        if route.total == 0:  # nobody moves anything: skip the collective on every rank alike
            return [np.empty((0, *shape), dtype) for dtype, shape in layout]
        record = np.dtype([(f"f{i}", dtype, shape) for i, (dtype, shape) in enumerate(layout)])
        packed = np.empty(n_in, record)
        for i, a in enumerate(arrays):
            packed[f"f{i}"] = a
        c = self.collective
        inp = torch.from_numpy(packed.view(np.uint8).reshape(n_in, record.itemsize)).to(c.device)
        out = torch.empty((n_out, record.itemsize), dtype=torch.uint8, device=c.device)
        c.all_to_all_single(out, inp, recv_counts.tolist(), send_counts.tolist())
        unpacked = np.ascontiguousarray(out.cpu().numpy()).view(record).reshape(n_out)
        return [np.ascontiguousarray(unpacked[f"f{i}"]) for i in range(len(arrays))]
