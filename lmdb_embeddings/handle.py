"""TableHandle: what every kind of store handle offers, as a ``typing.Protocol`` (no torch needed).

Two classes implement it: :class:`~lmdb_embeddings.EmbeddingStore`, one process's handle on one
LMDB store, and ``lmdb_embeddings.distributed.ShardedEmbeddingStore``, a table sharded over a
process group whose every call is collective (:class:`ShardedTableHandle` adds what only it has).
Code that works with either one (``StoreEmbedding``, the optimizers, ``StoreContract``) is
typed against :class:`TableHandle`. What differs in use, whether calls are collective and optimizer
steps run at the rows' owners, is the class attribute ``sharded``: code reads it, never guesses the
kind from which methods an object happens to have. A class says that it implements the protocol
with :func:`implements_table_handle`, which :func:`is_table_handle` checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeGuard, TypeVar

import numpy as np

from .inputs import IdsLike, ValuesLike

if TYPE_CHECKING:  # types only: this module imports neither torch nor the stores
    import torch

    from .store import EmbeddingStore
    from .torch.gradients import RowGradients
    from .torch.optimizers import StoreOptimizer

    DeviceLike = torch.device | str | int | None

HandleClass = TypeVar("HandleClass", bound=type)
_IMPLEMENTATIONS: tuple[type, ...] = ()  # the classes declared with implements_table_handle


class TableHandle(Protocol):
    """A trainable table: rows by sample ID, auxiliary columns (optimizer state) and small attrs,
    committed together; ``create``/``open`` classmethods with the same arguments on every kind."""

    sharded: ClassVar[bool]  # True: every call is collective and optimizer steps run at the rows' owners

    @property
    def path(self) -> str: ...
    @property
    def dim(self) -> int: ...
    @property
    def dtype(self) -> np.dtype: ...
    @property
    def chunk_rows(self) -> int: ...
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

    def get(self, ids: IdsLike) -> np.ndarray: ...
    def get_tensor(self, ids: IdsLike, device: DeviceLike = None) -> torch.Tensor: ...
    def get_column(self, name: str, ids: IdsLike) -> np.ndarray: ...
    def prefetch(self, ids: IdsLike) -> None: ...
    def put(self, ids: IdsLike, values: ValuesLike) -> None: ...
    def put_column(self, name: str, ids: IdsLike, values: ValuesLike) -> None: ...
    def add(self, ids: IdsLike, values: ValuesLike | None = None) -> None: ...
    def ensure_column(self, name: str, width: int, dtype: str | np.dtype = "float32", fill: float = 0.0) -> None: ...
    def set_attr(self, key: str, value: object) -> None: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> Any: ...
    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None: ...


class ShardedTableHandle(TableHandle, Protocol):
    """A table sharded over the ranks of a process group: every call is collective."""

    @property
    def rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...
    @property
    def local(self) -> EmbeddingStore: ...
    def owner_of(self, ids: IdsLike) -> np.ndarray: ...
    def optimizer_step(self, optimizer: StoreOptimizer, grads: RowGradients | None) -> None: ...


def implements_table_handle(cls: HandleClass) -> HandleClass:
    """Class decorator: instances of ``cls`` are table handles (mypy checks the members against the Protocol)."""
    global _IMPLEMENTATIONS
    _IMPLEMENTATIONS = (*_IMPLEMENTATIONS, cls)
    return cls


def is_table_handle(obj: object) -> TypeGuard[TableHandle]:
    """True for an instance of a class declared with :func:`implements_table_handle` (or a subclass)."""
    return isinstance(obj, _IMPLEMENTATIONS)


def is_sharded(store: TableHandle) -> TypeGuard[ShardedTableHandle]:
    """True for a sharded store (its calls are collective; its optimizer steps run at the rows' owners)."""
    return store.sharded
