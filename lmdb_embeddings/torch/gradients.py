"""The gradients a StoreEmbedding keeps between backward and step, and how torch's habits clear them.

The table is the store, so the rows' gradients cannot live in a Parameter's ``.grad`` the
way ``nn.Embedding(sparse=True)`` keeps them. Each backward hands its piece (the IDs it
looked up and the output gradient) to a :class:`GradientBuffer`; the optimizer's step takes
them all. To make ``model.zero_grad()`` and ``optimizer.zero_grad()`` of ANY module or
optimizer holding the embedding's zero-size parameter drop them too, that parameter's
``.grad`` is a :class:`_GradMarker` the buffer sets at the first backward after a clear:

* ``.grad`` set to None (``zero_grad()``, torch's default ``set_to_none=True``) means the
  pieces received before were dropped;
* ``.grad.zero_()`` (``zero_grad(set_to_none=False)``) drops them through the marker.

``take`` assembles the pieces exactly as torch accumulates sparse embedding gradients (one
uncoalesced sparse tensor per backward, summed with torch's sparse add), which is what lets
the optimizers match torch's numerics bit for bit.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class RowGradients:
    """The gradient of one step: unique sample IDs and a sparse (len(ids), dim) CPU tensor.

    ``grad`` is indexed by position in ``ids`` (row ``i`` belongs to ``ids[i]``) and is left
    uncoalesced when it came from a single backward pass, as torch's is.
    """

    ids: np.ndarray
    grad: torch.Tensor
    parts: int

    def coalesced_values(self) -> torch.Tensor:
        """Dense (len(ids), dim) gradient rows, row i for ``ids[i]`` (duplicates summed)."""
        grad = self.grad.coalesce()
        values = torch.zeros(grad.shape, dtype=grad.dtype)
        values[grad.indices()[0]] = grad.values()
        return values


class _GradMarker(torch.Tensor):
    """The zero-size ``.grad`` of a StoreEmbedding's parameter: ``zero_()`` on it drops the row gradients.

    Every other operation runs as on a plain tensor (and returns plain tensors).
    """

    _on_zero: Callable[[_GradMarker], None] | None = None

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.Tensor.zero_ and args and isinstance(args[0], _GradMarker) and args[0]._on_zero:
            args[0]._on_zero(args[0])
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


class GradientBuffer:
    """Row gradients received since the last step, tied to the ``.grad`` of the parameter ``param()``."""

    def __init__(self, param: Callable[[], torch.Tensor | None], dim: int, padding_id: int | None):
        self._param = param  # the module's parameter now (module conversions may replace the object)
        self._dim = dim
        self._padding_id = padding_id
        self._lock = threading.Lock()
        self._generation = 0
        self._pieces: list[tuple[np.ndarray, torch.Tensor]] = []
        self._marker: _GradMarker | None = None

    @property
    def generation(self) -> int:
        """Lookups of this generation are still waiting for a step (a step starts a new one)."""
        return self._generation

    def receive(self, flat_ids: np.ndarray, grad: torch.Tensor, generation: int) -> None:
        """One backward's piece: the IDs of a lookup and the output gradient, ``(len(ids), dim)``."""
        with self._lock:
            if generation != self._generation:  # rows served before the last step are done
                return
            if not self._live():
                self._pieces = []
                self._set_marker()
            self._pieces.append((flat_ids, grad))

    def clear(self) -> None:
        with self._lock:
            self._pieces = []

    @property
    def pending(self) -> bool:
        with self._lock:
            return bool(self._pieces) and self._live()

    def scale_(self, factor: float) -> None:
        """Multiply the pending gradient by ``factor`` (gradient clipping), as one coalesced piece."""
        with self._lock:
            grads = self._assemble() if self._live() else None
            if grads is not None:
                self._pieces = [(grads.ids, grads.coalesced_values().mul_(factor))]

    def peek(self) -> RowGradients | None:
        """The pending gradient, left pending (None if there is none)."""
        with self._lock:
            return self._assemble() if self._live() else None

    def take(self) -> RowGradients | None:
        """Remove and return the pending gradient (None if there is none); starts a new generation."""
        with self._lock:
            grads = self._assemble() if self._live() else None
            self._pieces = []
            self._generation += 1
        return grads

    # -- internals (called with the lock held) ----------------------------------------------
    def _live(self) -> bool:
        """False once torch cleared the parameter's ``.grad`` (``zero_grad``): the pieces were dropped."""
        param = self._param()
        return param is not None and param.grad is not None

    def _set_marker(self) -> None:
        param = self._param()
        if param is None:
            return
        marker = torch.zeros(0, dtype=param.dtype, device=param.device).as_subclass(_GradMarker)
        buffer = weakref.ref(self)

        def on_zero(tensor: _GradMarker) -> None:
            owner = buffer()
            if owner is not None and owner._marker is tensor:
                owner.clear()

        marker._on_zero = on_zero
        self._marker = marker
        param.grad = marker

    def _assemble(self) -> RowGradients | None:
        if not self._pieces:
            return None
        pieces = [self._without_padding(ids, _to_host(grad).reshape(len(ids), self._dim))
                  for ids, grad in self._pieces]
        all_ids = np.concatenate([ids for ids, _ in pieces])
        unique, inverse = np.unique(all_ids, return_inverse=True)
        inverse_t = torch.from_numpy(inverse.reshape(-1).astype(np.int64, copy=False))
        total, start = None, 0
        for ids, values in pieces:
            part = torch.sparse_coo_tensor(inverse_t[start : start + len(ids)].unsqueeze(0), values,
                                           (len(unique), self._dim), check_invariants=False)
            start += len(ids)
            total = part if total is None else total + part  # how torch accumulates sparse grads
        assert total is not None
        return RowGradients(unique, total, len(pieces))

    def _without_padding(self, ids: np.ndarray, values: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """As torch's sparse embedding backward: positions looking up ``padding_idx`` get no gradient."""
        if self._padding_id is None:
            return ids, values
        keep = ids != self._padding_id
        if keep.all():
            return ids, values
        return ids[keep], values[torch.from_numpy(keep)]


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of ``tensor``; from CUDA through a pinned buffer with a non-blocking copy."""
    if tensor.device.type == "cpu":
        return tensor
    if tensor.device.type == "cuda":
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        torch.cuda.current_stream(tensor.device).synchronize()
        return host
    return tensor.cpu()
