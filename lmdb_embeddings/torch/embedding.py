"""StoreEmbedding: an ``nn.Module`` that serves rows of a store into autograd, with ``nn.Embedding``'s habits.

``torch.nn.Embedding`` keeps its table as a Parameter; here the table is the store (maybe
larger than RAM), so ``forward`` copies only the requested rows out of the store. The
lookup is a custom autograd Function whose backward hands the per-position output gradient
(what ``nn.Embedding(sparse=True)`` puts in a sparse gradient's values) to the module's
:class:`~.gradients.GradientBuffer`, which keeps it until an optimizer's ``step`` takes it.
Nothing is kept for outputs that never see a backward, so evaluation with autograd on does
not pile up memory.

The module has ONE parameter, ``proxy``: zero elements, standing for the rows. It is what
torch's module machinery acts on, so the habits of ``nn.Embedding`` carry over:
``.to(device)`` / ``.half()`` / ``.double()`` set where and in which dtype rows are served
(gradients are cast back to the optimizer's dtype), ``requires_grad_(False)`` freezes the
rows, ``zero_grad()`` of the module, of any parent or of an optimizer holding the proxy
drops the rows' gradients (through its ``.grad``), and a dense optimizer given
``model.parameters()`` finds nothing to update in it.
"""

from __future__ import annotations

import gc
import math
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..errors import InvalidInputError, InvalidTypeError, ReadOnlyError, UnknownIdError
from ..handle import TableHandle, is_table_handle
from ..inputs import as_ids, to_numpy
from ..store import EmbeddingStore
from .checkpoint import check_model_checkpoint, table_identity
from .gradients import GradientBuffer, RowGradients

if TYPE_CHECKING:
    from .optimizers import StoreOptimizer

#: sample IDs of any shape: an int, nested sequences, a numpy array or an integer tensor (any device)
IdsInput = int | Sequence[Any] | np.ndarray | torch.Tensor

_EXTRA_STATE = "_extra_state"  # torch's key for a module's extra state in state_dict()
# id(proxy) -> its StoreEmbedding, so that functions given model.parameters() find the rows' module
_PROXY_OWNERS: weakref.WeakValueDictionary[int, StoreEmbedding] = weakref.WeakValueDictionary()
_SERVED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _Lookup(torch.autograd.Function):
    """rows = store[ids] in the proxy's device and dtype; backward hands grad_output to the module."""

    @staticmethod
    def forward(ctx: Any, proxy: torch.Tensor, module: StoreEmbedding, flat_ids: np.ndarray,
                generation: int) -> torch.Tensor:
        ctx.module = weakref.ref(module)
        ctx.flat_ids = flat_ids
        ctx.generation = generation
        return _serve(module.store, flat_ids, proxy)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        module = ctx.module()
        if module is not None:
            module._grads.receive(ctx.flat_ids, grad_output, ctx.generation)
        # a (zero-size) gradient for the proxy, so DDP and hooks see the parameter take part
        return torch.zeros(0, dtype=grad_output.dtype, device=grad_output.device), None, None, None


class StoreEmbedding(nn.Module):
    """Rows of ``store`` as an embedding layer: ``emb(ids)`` -> ``ids.shape + (dim,)`` tensor.

    Args:
        store: an :class:`~lmdb_embeddings.EmbeddingStore` (or a ``ShardedEmbeddingStore``).
        padding_idx: a sample ID whose row gets no gradient and is never written (as
            ``nn.Embedding``'s ``padding_idx``, but an ID of the table, not a position).
        max_norm: as ``nn.Embedding``: each row looked up whose ``norm_type``-norm exceeds it is
            renormalised to norm ``max_norm`` and written back to the store (a put like any
            update: durable at the next commit). Needs a writable, unsharded store.
        norm_type: the p of the p-norm for ``max_norm`` (default 2).

    The output lives on the module's device (``emb.to("cuda")``; host rows go through pinned
    memory with non-blocking copies) in the module's dtype (the store's, until ``.half()``,
    ``.float()``, ``.double()`` or ``.to(dtype)``) and takes part in autograd. Gradients of the
    rows served since the last optimizer step are kept until a
    :class:`~lmdb_embeddings.torch.StoreOptimizer` step applies them; ``zero_grad()`` drops them.
    ``state_dict()`` holds what identifies the table (no rows: they are in the store) and
    ``load_state_dict`` says when it is another table or an older commit. The module pickles,
    deep-copies and ``torch.save``s with a reference to its store, re-opened read-only where it
    is loaded.
    """

    proxy: nn.Parameter

    def __init__(self, store: TableHandle, padding_idx: int | None = None, max_norm: float | None = None,
                 norm_type: float = 2.0):
        super().__init__()
        if not is_table_handle(store):
            raise InvalidTypeError(
                f"StoreEmbedding needs an lmdb_embeddings.EmbeddingStore, got {type(store).__name__}; "
                "open one with EmbeddingStore.open(path)")
        self.store = store
        self.padding_idx = _checked_padding(store, padding_idx)
        self.max_norm, self.norm_type = _checked_max_norm(store, max_norm, norm_type)
        dtype = torch.from_numpy(np.empty(0, store.dtype)).dtype
        self.proxy = nn.Parameter(torch.empty(0, dtype=dtype))
        self._grads = self._new_gradient_buffer()
        self._optimizer: weakref.ref[StoreOptimizer] | None = None

    # -- what it is ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.proxy.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype rows are served in (the store's unless the module was converted)."""
        return self.proxy.dtype

    @property
    def embedding_dim(self) -> int:
        return self.store.dim

    @property
    def num_embeddings(self) -> int:
        return len(self.store)

    def extra_repr(self) -> str:
        extra = [f"{self.store.path!r}", f"device={self.device}", f"dtype={self.dtype}"]
        if self.padding_idx is not None:
            extra.append(f"padding_idx={self.padding_idx}")
        if self.max_norm is not None:
            extra.append(f"max_norm={self.max_norm}, norm_type={self.norm_type}")
        return ", ".join(extra)

    # -- lookups ---------------------------------------------------------------------------
    def forward(self, ids: IdsInput) -> torch.Tensor:
        flat, shape = _flat_ids(ids)
        proxy = self.proxy
        if proxy.dtype not in _SERVED_DTYPES:
            raise InvalidTypeError(
                f"StoreEmbedding serves rows as float16, bfloat16, float32 or float64, and the module was converted "
                f"to {proxy.dtype}; convert it back with .float() (or .half(), .bfloat16(), .double())")
        if self.max_norm is not None:
            self._renorm(flat, self.max_norm)
        if torch.is_grad_enabled() and proxy.requires_grad:
            if _PROXY_OWNERS.get(id(proxy)) is not self:  # a module conversion may have replaced the parameter
                _PROXY_OWNERS[id(proxy)] = self
            out: torch.Tensor = _Lookup.apply(proxy, self, flat, self._grads.generation)  # type: ignore[no-untyped-call]
        else:  # no autograd, or frozen (requires_grad_(False)): nothing to keep
            out = _serve(self.store, flat, proxy)
        return out.reshape(*shape, self.store.dim)

    def _renorm(self, flat: np.ndarray, max_norm: float) -> None:
        """As ``nn.Embedding(max_norm=...)``: rescale the looked-up rows over ``max_norm`` in place, in the store."""
        ids = np.unique(flat)
        if self.padding_idx is not None:
            ids = ids[ids != self.padding_idx]
        if len(ids) == 0:
            return
        rows = torch.from_numpy(self.store.get(ids))
        before = rows.clone()
        with torch.no_grad():
            torch.embedding_renorm_(rows, torch.arange(len(ids)), max_norm, self.norm_type)
        changed = (rows != before).any(dim=1).numpy()
        if changed.any():
            self.store.put(ids[changed], rows.numpy()[changed])

    # -- gradients -------------------------------------------------------------------------
    @property
    def has_gradients(self) -> bool:
        return self._grads.pending

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the gradients received since the last step (as torch drops a parameter's ``.grad``)."""
        super().zero_grad(set_to_none)
        self._grads.clear()

    def take_gradients(self) -> RowGradients | None:
        """Remove and return the gradients received since the last step (None if there are none).

        Starts a new step: gradients of rows served before this call are ignored from now on.
        """
        return self._grads.take()

    def pending_gradients(self) -> RowGradients | None:
        """The gradients received since the last step, left in place (gradient clipping reads them)."""
        return self._grads.peek()

    def scale_gradients_(self, factor: float) -> None:
        """Multiply the gradients received since the last step by ``factor`` (gradient clipping)."""
        self._grads.scale_(factor)

    # -- one optimizer -----------------------------------------------------------------------
    def check_no_optimizer(self, name: str) -> None:
        """Refuse a second optimizer: a step takes the module's gradients, so another would step nothing."""
        current = self._optimizer() if self._optimizer is not None else None
        if current is not None:
            del current
            gc.collect()  # an optimizer the caller dropped may live on in a cycle (an LR scheduler makes one)
            current = self._optimizer() if self._optimizer is not None else None
        if current is not None:
            described = repr(current)
            del current  # the traceback must not keep the first optimizer alive
            raise InvalidInputError(
                f"{name}: this StoreEmbedding already has an optimizer, {described}; one optimizer per "
                "StoreEmbedding (a step takes the gradients the module holds, so a second one would step nothing). "
                "Delete the first one (del opt) before making another, or give the second its own "
                "StoreEmbedding(store)")

    def attach_optimizer(self, optimizer: StoreOptimizer) -> None:
        self.check_no_optimizer(type(optimizer).__name__)
        self._optimizer = weakref.ref(optimizer)

    # -- checkpoints, pickle, deepcopy -------------------------------------------------------
    def get_extra_state(self) -> dict[str, Any]:
        """What identifies the table now (path, uuid, commit, rows, dim, dtype): ``state_dict()`` holds this."""
        return table_identity(self.store)

    def set_extra_state(self, state: Any) -> None:
        check_model_checkpoint(state, self.store)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        destination[prefix + _EXTRA_STATE] = self.get_extra_state()  # the proxy holds nothing worth saving

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, local_metadata: Any, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        key = prefix + _EXTRA_STATE  # torch passes strict=True here and applies the caller's strict to the keys
        if key in state_dict:
            self.set_extra_state(state_dict[key])
        elif strict:
            missing_keys.append(key)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in (key, prefix + "proxy"))

    def __getstate__(self) -> dict[str, Any]:
        """The module's attributes with the store as a reference (it pickles as its path and options)."""
        state = self.__dict__.copy()
        state["_grads"] = None  # a lock, and gradients of this process's graph
        state["_optimizer"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        self._grads = self._new_gradient_buffer()

    def _new_gradient_buffer(self) -> GradientBuffer:
        _PROXY_OWNERS[id(self.proxy)] = self
        module = weakref.ref(self)

        def proxy() -> torch.Tensor | None:
            owner = module()
            return None if owner is None else owner.proxy

        return GradientBuffer(proxy, self.store.dim, self.padding_idx)


def owner_of_proxy(tensor: torch.Tensor) -> StoreEmbedding | None:
    """The StoreEmbedding whose ``proxy`` parameter ``tensor`` is (None for any other tensor)."""
    owner = _PROXY_OWNERS.get(id(tensor))
    return owner if owner is not None and owner.proxy is tensor else None


def _serve(store: TableHandle, flat_ids: np.ndarray, proxy: torch.Tensor) -> torch.Tensor:
    """The rows of ``flat_ids`` on the proxy's device, in its dtype."""
    rows = store.get_tensor(flat_ids, device=proxy.device)
    return rows if rows.dtype == proxy.dtype else rows.to(proxy.dtype)


def _checked_padding(store: TableHandle, padding_idx: Any) -> int | None:
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, (int, np.integer)):
        raise InvalidTypeError(f"StoreEmbedding: padding_idx must be a sample ID (an int), got {padding_idx!r}")
    padding = int(padding_idx)
    if isinstance(store, EmbeddingStore) and padding not in store:
        raise UnknownIdError(f"StoreEmbedding: padding_idx={padding} is not an ID of the store {store.path}; "
                             "padding_idx names the sample ID whose row is the padding row")
    return padding


def _checked_max_norm(store: TableHandle, max_norm: Any, norm_type: Any) -> tuple[float | None, float]:
    for name, value in (("max_norm", max_norm), ("norm_type", norm_type)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.number))
                                  or not float(value) > 0 or math.isnan(float(value))):
            raise InvalidInputError(f"StoreEmbedding: {name} must be a number > 0, got {value!r}")
    if max_norm is None:
        return None, float(norm_type)
    if store.sharded:
        raise InvalidInputError("StoreEmbedding: max_norm is not supported on a ShardedEmbeddingStore (the rows a "
                                "rank renormalises may be looked up by other ranks in the same step); renormalise "
                                "in the model instead")
    if store.readonly:
        raise ReadOnlyError(f"StoreEmbedding: max_norm rewrites the rows it renormalises, and the store {store.path} "
                            "is open read-only; open it with readonly=False, or leave max_norm out")
    return float(max_norm), float(norm_type)


def _flat_ids(ids: IdsInput) -> tuple[np.ndarray, tuple[int, ...]]:
    """IDs of any shape (tensor on any device, array, list) -> (flat int64 array, shape)."""
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise InvalidTypeError(f"StoreEmbedding: ids must be an integer tensor, got {ids.dtype}")
        shape = tuple(ids.shape)
        return as_ids(to_numpy(ids.reshape(-1)), "StoreEmbedding ids"), shape
    arr = np.asarray(to_numpy(ids))
    if arr.dtype == object:
        raise InvalidInputError("StoreEmbedding: ids must be a rectangular array of integers")
    return as_ids(arr.reshape(-1), "StoreEmbedding ids"), arr.shape
