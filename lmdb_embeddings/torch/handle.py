"""TableHandle: what ``StoreEmbedding`` and the optimizers need from a store, as a ``typing.Protocol``.

Two kinds of handle satisfy it: :class:`~lmdb_embeddings.EmbeddingStore` and
``lmdb_embeddings.distributed.ShardedEmbeddingStore``. A sharded store also runs optimizer
steps itself, at the rows' owners (:class:`ShardedTableHandle`); ``is_sharded`` tells the two
apart by that method, in one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch

if TYPE_CHECKING:
    from .gradients import RowGradients
    from .optimizers import StoreOptimizer

DeviceLike = torch.device | str | int | None


@runtime_checkable
class TableHandle(Protocol):
    """A trainable table: rows by sample ID, auxiliary columns for optimizer state, small attrs."""

    @property
    def path(self) -> str: ...
    @property
    def dim(self) -> int: ...
    @property
    def dtype(self) -> np.dtype: ...
    @property
    def readonly(self) -> bool: ...
    @property
    def commit_count(self) -> int: ...
    @property
    def uuid(self) -> str | None: ...
    @property
    def columns(self) -> Mapping[str, Any]: ...
    @property
    def attrs(self) -> Mapping[str, Any]: ...
    def __len__(self) -> int: ...
    def get(self, ids: Any) -> np.ndarray: ...
    def get_tensor(self, ids: Any, device: DeviceLike = None) -> torch.Tensor: ...
    def get_column(self, name: str, ids: Any) -> np.ndarray: ...
    def put(self, ids: Any, values: Any) -> None: ...
    def put_column(self, name: str, ids: Any, values: Any) -> None: ...
    def set_attr(self, key: str, value: Any) -> None: ...
    def ensure_column(self, name: str, width: int, dtype: Any = "float32", fill: float = 0.0) -> None: ...


@runtime_checkable
class ShardedTableHandle(TableHandle, Protocol):
    """A table sharded over ranks: every call is collective and an optimizer step runs at the owners."""

    def optimizer_step(self, optimizer: StoreOptimizer, grads: RowGradients | None) -> None: ...


def is_sharded(store: TableHandle) -> bool:
    """True for a store whose optimizer steps run at the rows' owners (every call is collective)."""
    return callable(getattr(store, "optimizer_step", None))
