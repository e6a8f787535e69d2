"""Row-wise optimizers whose state (moments, accumulators, step counts) lives in the store.

Each ``step()`` takes the gradients a :class:`StoreEmbedding` received since the last
step, reads the touched rows and their state from the store, applies torch's own update
to those rows only (the same tensor operations ``torch.optim`` runs on a sparse
gradient, on a (rows touched, dim) slice instead of the whole table, so the numbers are
bit-identical), and writes state then rows back with ``put_column``/``put``. The rows'
``put`` comes last, so a ``commit_every`` auto-commit it triggers always includes the
state of the same step. Everything becomes durable at ``store.commit()``.

The math runs on the CPU whatever the module's device: the store lives in host memory,
so one gradient copy down beats copying rows and moments up and back.

State layout (docs/FORMAT.md, "Optimizer state"): column ``opt.<Class>.<name>`` of width
``dim`` per state tensor, and attr ``opt.<Class>.step`` for the per-table step count.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, overload

import numpy as np
import torch

from ..errors import EmbeddingStoreError, InvalidInputError, InvalidTypeError, ReadOnlyError
from ..handle import TableHandle, is_sharded
from ..options import is_real
from .checkpoint import other_table, table_identity
from .embedding import StoreEmbedding
from .gradients import RowGradients

log = logging.getLogger(__name__)

#: what :meth:`StoreOptimizer.compute_update` returns: (ids, rows, state by name, step count)
Update = tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], int]


class StoreOptimizer(torch.optim.Optimizer):
    """Base class: hyper-parameters in ``param_groups[0]`` (so LR schedulers work), state in the store.

    ``param_groups[0]["params"]`` holds the embedding's zero-size ``proxy`` parameter, the
    stand-in for its rows; the rows and their state are in the store. One optimizer per
    StoreEmbedding, one parameter group: ``add_param_group`` refuses other parameters (give
    them a ``torch.optim`` optimizer of their own).
    """

    state_names: tuple[str, ...] = ()  # per-row state tensors, each a column of width dim
    counts_steps = False  # keeps a per-table step count (attr)
    fixed_hyperparameters: tuple[str, ...] = ()  # hyper-parameters the stored state was made with
    # torch.amp.GradScaler hands an optimizer with this flag its scale instead of unscaling the
    # parameters' .grad itself, which would leave the rows' gradients scaled: step() refuses it
    _step_supports_amp_scaling = True

    def __init__(self, embedding: StoreEmbedding, defaults: dict[str, Any]):
        name = type(self).__name__
        if not isinstance(embedding, StoreEmbedding):
            raise InvalidTypeError(
                f"{name}: the first argument must be a StoreEmbedding, got {type(embedding).__name__}; "
                f"use {name}(StoreEmbedding(store), lr=...)")
        store = embedding.store
        if store.readonly:
            raise ReadOnlyError(f"{name}: the store {store.path} is open read-only; open it with readonly=False "
                                "to train")
        embedding.check_no_optimizer(name)
        self.embedding = embedding
        self.store: TableHandle = store
        super().__init__([embedding.proxy], defaults)
        self.prefix = f"opt.{self.state_prefix()}"
        # float16 tables keep float32 state and do the math in float32 (half moments underflow).
        self.compute_dtype = np.dtype(np.float32) if store.dtype == np.float16 else store.dtype
        self._declare_state()
        embedding.attach_optimizer(self)

    @classmethod
    def state_prefix(cls) -> str:
        return cls.__name__

    # -- state in the store ------------------------------------------------------------
    def state_fill(self, state: str) -> float:
        """Value of a state row never touched (torch's initial state)."""
        return 0.0

    @property
    def state_columns(self) -> dict[str, str]:
        """State name -> store column name (e.g. ``exp_avg`` -> ``opt.SparseAdam.exp_avg``)."""
        return {s: f"{self.prefix}.{s}" for s in self.state_names}

    @property
    def step_attr(self) -> str:
        return f"{self.prefix}.step"

    @property
    def step_count(self) -> int:
        """Steps taken on this table, as committed/put in the store (torch's ``state["step"]``)."""
        return int(self.store.attrs.get(self.step_attr, 0))

    def _declare_state(self) -> None:
        existing = self.store.columns
        for state, column in self.state_columns.items():
            fill = self.state_fill(state)
            have = existing.get(column)
            if have is not None and float(have["fill"]) != fill:
                raise InvalidInputError(
                    f"{type(self).__name__}: state column {column!r} in {self.store.path} was created with "
                    f"initial value {have['fill']}, not {fill}; pass the same value to resume this training")
            self.store.ensure_column(column, self.store.dim, self.compute_dtype.name, fill)

    # -- torch.optim.Optimizer interface ---------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only the embedding's own group, once: other parameters need an optimizer of their own."""
        params = param_group.get("params")
        own = isinstance(params, list) and len(params) == 1 and params[0] is self.embedding.proxy
        if self.param_groups or not own:
            raise InvalidInputError(
                f"{type(self).__name__}.add_param_group: a store optimizer updates the rows of its StoreEmbedding "
                "only, in one parameter group; optimize other parameters with a torch.optim optimizer of their own "
                "(e.g. torch.optim.Adam(head.parameters()))")
        super().add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.embedding.zero_grad(set_to_none)

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Apply the gradients received since the last step to exactly those rows; write rows and state.

        A sharded store (``ShardedEmbeddingStore``) runs the step itself, at the rows' owners:
        ``step`` is then a collective call.

        Raises (before anything is written; the step's gradients are dropped):
            ValueError: the update is NaN/inf (a NaN/inf gradient, or an overflow of the store dtype),
                or a ``torch.amp.GradScaler`` drives the step (the rows' gradients would stay scaled).
        """
        self._refuse_grad_scaler()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = self.embedding.take_gradients()
        if is_sharded(self.store):
            self.store.optimizer_step(self, grads)
        elif grads is not None:
            self.write_update(self.store, *self.compute_update(self.store, grads))
        return loss

    def _refuse_grad_scaler(self) -> None:
        if hasattr(self, "found_inf") or hasattr(self, "grad_scale"):
            for name in ("found_inf", "grad_scale"):
                self.__dict__.pop(name, None)  # GradScaler deletes them only after a step that returned
            raise InvalidInputError(
                f"{type(self).__name__}.step: torch.amp.GradScaler is not supported by store optimizers (it unscales "
                "parameters' .grad, and the rows' gradients are not there, so they would be applied scaled); "
                "use bfloat16 autocast, which needs no GradScaler, or train without autocast")

    def state_dict(self) -> dict[str, Any]:
        """Hyper-parameters, step count and the table they belong to (rows and moments are in the store)."""
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        group["params"] = [0]
        return {"state": {}, "param_groups": [group], "optimizer": type(self).__name__,
                "table": table_identity(self.store), "step": self.step_count}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the hyper-parameters of :meth:`state_dict`, after checking it goes with this table and step.

        Raises:
            ValueError: it is not a store optimizer's state_dict, it is another optimizer's, it
                comes from another table, or the store's state is at another step than it was.
        """
        name = type(self).__name__
        groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
        if not isinstance(groups, list) or len(groups) != 1 or "table" not in state_dict:
            raise InvalidInputError(
                f"{name}.load_state_dict: this is not the state_dict of a store optimizer (it needs one param group "
                "and a 'table' entry); load the state_dict that opt.state_dict() returned")
        if state_dict.get("optimizer") != name:
            raise InvalidInputError(f"{name}.load_state_dict: the state_dict is {state_dict.get('optimizer')}'s, "
                                    f"not {name}'s")
        problem = other_table(state_dict["table"], self.store)
        if problem is not None:
            raise InvalidInputError(f"{name}.load_state_dict: {problem}; its optimizer state is not in this store")
        if int(state_dict.get("step", -1)) != self.step_count:
            raise InvalidInputError(
                f"{name}.load_state_dict: the state_dict was taken at step {state_dict.get('step')} and the state of "
                f"{name} in {self.store.path} is at step {self.step_count}: the rows and moments in the store belong "
                "to another point of the training (open the store at the commit the state_dict was taken with)")
        saved = {k: v for k, v in groups[0].items() if k != "params"}
        group = self.param_groups[0]
        missing = sorted(set(group) - set(saved) - {"params"})
        changed = [k for k in self.fixed_hyperparameters if k in saved and saved[k] != group[k]]
        if missing or changed:
            raise InvalidInputError(
                f"{name}.load_state_dict: the state_dict's param group " +
                (f"lacks {missing}" if missing else f"has other {changed} than the state in the store was made with"))
        group.update(saved)

    def compute_update(self, store: TableHandle, grads: RowGradients) -> Update:
        """``(ids, rows, state, step)``: the updated rows and state of ``grads``' rows, read from ``store``.

        Writes nothing; raises ValueError if an update is NaN/inf.
        """
        group = self.param_groups[0]
        ids = grads.ids
        grad = grads.grad.to(_torch_dtype(self.compute_dtype))
        if group.get("maximize", False):
            grad = -grad
        rows = torch.from_numpy(store.get(ids).astype(self.compute_dtype, copy=False))
        state = {s: torch.from_numpy(store.get_column(c, ids)) for s, c in self.state_columns.items()}
        step = int(store.attrs.get(self.step_attr, 0)) + 1 if self.counts_steps else 0
        self._update(rows, grad, state, step, group)
        name = type(self).__name__
        out_rows = _checked(rows.numpy(), store.dtype, name, "rows")
        out_state = {s: _checked(t.numpy(), self.compute_dtype, name, s) for s, t in state.items()}
        return ids, out_rows, out_state, step

    def _update(self, rows: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], step: int,
                group: dict[str, Any]) -> None:
        """Update ``rows`` and ``state`` (dense (n, dim) CPU tensors) in place from sparse ``grad``."""
        raise NotImplementedError

    def write_update(self, store: TableHandle, ids: np.ndarray, rows: np.ndarray, state: dict[str, np.ndarray],
                     step: int) -> None:
        """Write what :meth:`compute_update` returned: step count, state, then the rows."""
        if self.counts_steps:
            store.set_attr(self.step_attr, step)
        for s, column in self.state_columns.items():
            store.put_column(column, ids, state[s])
        store.put(ids, rows)  # last: an auto-commit here includes this step's state

    def __repr__(self) -> str:
        hyper = ", ".join(f"{k}={v}" for k, v in self.param_groups[0].items() if k != "params")
        return f"{type(self).__name__}({self.store.path!r}, {hyper})"


# ------------------------------------------------------------------------- optimizers
class SparseSGD(StoreOptimizer):
    """``torch.optim.SGD`` on sparse gradients: ``row -= lr * grad`` for the rows served.

    torch's momentum on a sparse gradient keeps a sparse buffer that moves EVERY row it
    ever touched on every step (not row-wise), and its weight decay rejects sparse
    gradients; both are refused here with a pointer to SparseAdam/SparseAdagrad.
    """

    def __init__(self, embedding: StoreEmbedding, lr: float = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, differentiable: bool = False, fused: bool | None = None):
        _check_nonneg("lr", lr)
        for option, value in (("momentum", momentum), ("dampening", dampening), ("weight_decay", weight_decay),
                              ("nesterov", nesterov)):
            if value:
                raise InvalidInputError(
                    f"SparseSGD: {option}={value!r} is not supported: torch.optim.SGD with sparse gradients "
                    + ("rejects weight decay" if option == "weight_decay" else
                       "keeps a momentum buffer that updates every row ever touched on every step, "
                       "which is not row-wise")
                    + "; use SparseAdam/SparseAdamW or SparseAdagrad for adaptive row-wise updates")
        _check_unsupported("SparseSGD", differentiable=differentiable, fused=fused)
        super().__init__(embedding, {"lr": float(lr), "maximize": bool(maximize)})

    def _update(self, rows: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], step: int,
                group: dict[str, Any]) -> None:
        rows.add_(grad, alpha=-group["lr"])


class SparseAdagrad(StoreOptimizer):
    """``torch.optim.Adagrad`` on sparse gradients: per-row accumulator ``sum``, per-table step (lr_decay)."""

    state_names = ("sum",)
    counts_steps = True
    fixed_hyperparameters = ("initial_accumulator_value",)

    def __init__(self, embedding: StoreEmbedding, lr: float = 1e-2, lr_decay: float = 0, weight_decay: float = 0,
                 initial_accumulator_value: float = 0, eps: float = 1e-10, foreach: bool | None = None, *,
                 maximize: bool = False, differentiable: bool = False, fused: bool | None = None):
        _check_nonneg("lr", lr)
        _check_nonneg("lr_decay", lr_decay)
        _check_nonneg("initial_accumulator_value", initial_accumulator_value)
        _check_nonneg("eps", eps)
        if weight_decay:
            raise InvalidInputError(
                f"SparseAdagrad: weight_decay={weight_decay!r} is not supported: torch.optim.Adagrad rejects "
                "weight_decay with sparse gradients; use SparseAdamW for decoupled weight decay")
        _check_unsupported("SparseAdagrad", differentiable=differentiable, fused=fused)
        self._initial = float(initial_accumulator_value)
        super().__init__(embedding, {"lr": float(lr), "lr_decay": float(lr_decay), "eps": float(eps),
                                     "initial_accumulator_value": self._initial, "maximize": bool(maximize)})

    def state_fill(self, state: str) -> float:
        return self._initial

    def _update(self, rows: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], step: int,
                group: dict[str, Any]) -> None:
        # torch.optim.adagrad._single_tensor_adagrad, sparse branch
        clr = group["lr"] / (1 + (step - 1) * group["lr_decay"])
        # Same operations as torch's sparse branch; sparse_mask of our touched-rows slice is a copy, and
        # the alpha=-clr add stays a sparse add (torch's kernel, so the rounding is torch's).
        grad = grad.coalesce()
        indices, values = grad._indices(), _row_values(grad)
        total = state["sum"]
        total.add_(values.pow(2))
        std_values = total.clone().sqrt_().add_(group["eps"])
        rows.add_(_make_sparse(grad, indices, values / std_values), alpha=-clr)


class SparseAdam(StoreOptimizer):
    """``torch.optim.SparseAdam`` (lazy Adam): moments of the served rows only, step count per table."""

    state_names = ("exp_avg", "exp_avg_sq")
    counts_steps = True

    def __init__(self, embedding: StoreEmbedding, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, maximize: bool = False):
        _check_adam("SparseAdam", lr, betas, eps)
        super().__init__(embedding, {"lr": float(lr), "betas": (float(betas[0]), float(betas[1])),
                                     "eps": float(eps), "maximize": bool(maximize)})

    def _update(self, rows: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], step: int,
                group: dict[str, Any]) -> None:
        _sparse_adam(rows, grad, state["exp_avg"], state["exp_avg_sq"], step, group)


class SparseAdamW(StoreOptimizer):
    """``SparseAdam`` plus AdamW's decoupled weight decay ``row *= 1 - lr * weight_decay`` on the rows served."""

    state_names = ("exp_avg", "exp_avg_sq")
    counts_steps = True

    def __init__(self, embedding: StoreEmbedding, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None):
        _check_adam("SparseAdamW", lr, betas, eps)
        _check_nonneg("weight_decay", weight_decay)
        if amsgrad:
            raise InvalidInputError("SparseAdamW: amsgrad=True is not supported (torch's SparseAdam has no "
                                    "amsgrad variant); use amsgrad=False")
        _check_unsupported("SparseAdamW", capturable=capturable, differentiable=differentiable, fused=fused)
        super().__init__(embedding, {"lr": float(lr), "betas": (float(betas[0]), float(betas[1])),
                                     "eps": float(eps), "weight_decay": float(weight_decay),
                                     "maximize": bool(maximize)})

    def _update(self, rows: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], step: int,
                group: dict[str, Any]) -> None:
        rows.mul_(1 - group["lr"] * group["weight_decay"])  # as torch.optim.AdamW, before the Adam step
        _sparse_adam(rows, grad, state["exp_avg"], state["exp_avg_sq"], step, group)


# ------------------------------------------------------------------------- helpers
def _sparse_adam(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
                 group: dict[str, Any]) -> None:
    """torch.optim._functional.sparse_adam for one parameter, same operations in the same order.

    Our tensors hold exactly the touched rows, so the coalesced gradient's indices are
    0..n-1: ``t.sparse_mask(grad)._values()`` is a copy of ``t`` and adding a sparse tensor
    with alpha 1 is a dense add (bitwise the same numbers, without the sparse kernels).
    """
    beta1, beta2 = group["betas"]
    eps, lr = group["eps"], group["lr"]
    values = _row_values(grad)
    if values.numel() == 0:
        return
    old_exp_avg_values = exp_avg.clone()
    exp_avg_update_values = values.sub(old_exp_avg_values).mul_(1 - beta1)
    exp_avg.add_(exp_avg_update_values)
    old_exp_avg_sq_values = exp_avg_sq.clone()
    exp_avg_sq_update_values = values.pow(2).sub_(old_exp_avg_sq_values).mul_(1 - beta2)
    exp_avg_sq.add_(exp_avg_sq_update_values)
    numer = exp_avg_update_values.add_(old_exp_avg_values)
    exp_avg_sq_update_values.add_(old_exp_avg_sq_values)
    denom = exp_avg_sq_update_values.sqrt_().add_(eps)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr * math.sqrt(bias_correction2) / bias_correction1
    param.add_(-step_size * numer.div_(denom))


def _row_values(grad: torch.Tensor) -> torch.Tensor:
    """Dense (n, dim) values of a gradient over n touched rows, row i for index i (duplicates summed)."""
    grad = grad.coalesce()
    if grad._nnz() != grad.shape[0]:  # every row of the slice was served, so this cannot happen
        raise EmbeddingStoreError(f"internal error: a gradient covers {grad._nnz()} of its {grad.shape[0]} rows "
                                  "(every row of the step's slice should have been served); please report it")
    return grad._values()


def _make_sparse(grad: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.sparse_coo_tensor(indices, values, grad.size(), check_invariants=False)


def _checked(values: np.ndarray, dtype: np.dtype, owner: str, what: str) -> np.ndarray:
    """``values`` cast to ``dtype``, refusing NaN/inf (the store would reject them anyway, halfway)."""
    with np.errstate(over="ignore"):
        out = values.astype(dtype, copy=False)
    if not np.isfinite(out).all():
        raise InvalidInputError(
            f"{owner}.step: the updated {what} contain NaN or inf (a NaN/inf gradient, or values that overflow "
            f"{np.dtype(dtype).name}); nothing was written (check the loss and the learning rate)")
    return out


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


def _check_nonneg(name: str, value: Any) -> None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not is_real(value, finite=True) or value < 0:
        raise InvalidInputError(f"invalid {name}: {value!r} (must be a finite number >= 0)")


def _check_adam(owner: str, lr: Any, betas: Any, eps: Any) -> None:
    _check_nonneg("lr", lr)
    _check_nonneg("eps", eps)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise InvalidInputError(f"{owner}: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not is_real(beta, finite=True) or not 0.0 <= beta < 1.0:
            raise InvalidInputError(f"{owner}: invalid beta parameter at index {i}: {beta!r} (must be in [0, 1))")


def _check_unsupported(owner: str, **flags: Any) -> None:
    for name, value in flags.items():
        if value:
            raise InvalidInputError(f"{owner}: {name}={value!r} is not supported by a store-backed optimizer; "
                                    f"leave it at its default")


__all__ = ["StoreOptimizer", "SparseSGD", "SparseAdagrad", "SparseAdam", "SparseAdamW", "RowGradients", "Update"]
