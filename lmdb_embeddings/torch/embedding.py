"""StoreEmbedding: an ``nn.Module`` that serves rows of an :class:`EmbeddingStore` into autograd.

``torch.nn.Embedding`` keeps its table as a Parameter; here the table is the store (maybe
larger than RAM), so ``forward`` copies only the requested rows out of the store. The
lookup is a custom autograd Function whose backward does not propagate anywhere: it
hands the per-position output gradient (what ``nn.Embedding(sparse=True)`` puts in a
sparse gradient's values) to the module, which keeps it until an optimizer's ``step``
takes it. Nothing is kept for outputs that never see a backward, so evaluation with
autograd on does not pile up memory.

``take_gradients`` assembles those pieces exactly as torch accumulates sparse embedding
gradients (one uncoalesced sparse tensor per backward, summed with torch's sparse add),
which is what lets the optimizers match torch's numerics bit for bit.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..core.inputs import as_ids, to_numpy
from ..errors import InvalidInputError, InvalidTypeError
from ..store import EmbeddingStore


@dataclass
class RowGradients:
    """The gradient of one step: unique sample IDs and a sparse (len(ids), dim) CPU tensor.

    ``grad`` is indexed by position in ``ids`` (row ``i`` belongs to ``ids[i]``) and is left
    uncoalesced when it came from a single backward pass, as torch's is.
    """

    ids: np.ndarray
    grad: torch.Tensor
    parts: int


class _Lookup(torch.autograd.Function):
    """rows = store[ids]; backward hands grad_output to the StoreEmbedding that served them."""

    @staticmethod
    def forward(ctx, anchor, module, flat_ids, generation):
        ctx.module = weakref.ref(module)
        ctx.flat_ids = flat_ids
        ctx.generation = generation
        return module.store.get_tensor(flat_ids, device=anchor.device)

    @staticmethod
    def backward(ctx, grad_output):
        module = ctx.module()
        if module is not None:
            module._receive(ctx.flat_ids, grad_output, ctx.generation)
        return None, None, None, None


class StoreEmbedding(nn.Module):
    """Rows of ``store`` as an embedding layer: ``emb(ids)`` -> ``ids.shape + (dim,)`` tensor.

    The output lives on the module's device (``emb.to("cuda")``; host rows go through
    pinned memory with non-blocking copies) in the store's dtype and takes part in
    autograd. Gradients of the rows served since the last optimizer step are kept until
    a :class:`~lmdb_embeddings.torch.StoreOptimizer` step applies them; the module itself
    has no parameters (the table is the store), so a dense optimizer over
    ``model.parameters()`` leaves it alone.
    """

    def __init__(self, store: EmbeddingStore):
        super().__init__()
        if not isinstance(store, EmbeddingStore):
            raise InvalidTypeError(
                f"StoreEmbedding needs an lmdb_embeddings.EmbeddingStore, got {type(store).__name__}; "
                "open one with EmbeddingStore.open(path)")
        self.store = store
        # Zero-size buffer: nn.Module.to()/cuda() move it, so it tells which device to serve on.
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)
        self._grad_anchor = torch.empty(0, requires_grad=True)
        self._lock = threading.Lock()
        self._generation = 0
        self._received: list[tuple[np.ndarray, torch.Tensor]] = []

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    @property
    def embedding_dim(self) -> int:
        return self.store.dim

    @property
    def num_embeddings(self) -> int:
        return len(self.store)

    def extra_repr(self) -> str:
        return f"{self.store.path!r}, device={self.device}"

    def forward(self, ids) -> torch.Tensor:
        flat, shape = _flat_ids(ids)
        if not torch.is_grad_enabled():
            return self.store.get_tensor(flat, device=self.device).reshape(*shape, -1)
        anchor = self._grad_anchor
        if anchor.device != self.device:
            anchor = self._grad_anchor = torch.empty(0, device=self.device, requires_grad=True)
        out = _Lookup.apply(anchor, self, flat, self._generation)
        return out.reshape(*shape, -1)

    def _receive(self, flat_ids: np.ndarray, grad: torch.Tensor, generation: int) -> None:
        with self._lock:
            if generation == self._generation:  # rows served before the last step are done
                self._received.append((flat_ids, grad))

    @property
    def has_gradients(self) -> bool:
        return bool(self._received)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients received since the last step (torch's sparse ``zero_()`` empties them too)."""
        super().zero_grad(set_to_none)
        with self._lock:
            self._received = []

    def take_gradients(self) -> RowGradients | None:
        """Remove and return the gradients received since the last step (None if there are none).

        Starts a new step: gradients of rows served before this call are ignored from now on.
        """
        with self._lock:
            received, self._received = self._received, []
            self._generation += 1
        if not received:
            return None
        dim = self.store.dim
        all_ids = np.concatenate([ids for ids, _ in received])
        unique, inverse = np.unique(all_ids, return_inverse=True)
        inverse = torch.from_numpy(inverse.reshape(-1).astype(np.int64, copy=False))
        total, start = None, 0
        for ids, grad in received:
            values = _to_host(grad).reshape(len(ids), dim)
            part = torch.sparse_coo_tensor(inverse[start : start + len(ids)].unsqueeze(0), values,
                                           (len(unique), dim), check_invariants=False)
            start += len(ids)
            total = part if total is None else total + part  # how torch accumulates sparse grads
        return RowGradients(unique, total, len(received))


def _flat_ids(ids) -> tuple[np.ndarray, tuple[int, ...]]:
    """IDs of any shape (tensor on any device, array, list) -> (flat int64 array, shape)."""
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise InvalidTypeError(f"StoreEmbedding: ids must be an integer tensor, got {ids.dtype}")
        shape = tuple(ids.shape)
        return as_ids(to_numpy(ids.reshape(-1)), "StoreEmbedding ids"), shape
    arr = np.asarray(to_numpy(ids))
    if arr.dtype == object:
        raise InvalidInputError("StoreEmbedding: ids must be a rectangular array of integers")
    shape = arr.shape
    return as_ids(arr.reshape(-1), "StoreEmbedding ids"), shape


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
