"""lmdb_embeddings: per-sample trainable embedding tables in LMDB, for PyTorch training.

The public surface, all importable from here (``import lmdb_embeddings as le``):

* :class:`EmbeddingStore` and its :class:`StoreOptions`; :class:`TableHandle`, the ``typing.Protocol``
  that it and ``ShardedEmbeddingStore`` implement (what code working with either kind may use);
* what the API returns: typed dictionaries (:class:`StoreStats`, :class:`StoreInfo`, ...) and
  :class:`VerifyReport`, a dataclass that reads as its mapping (``as_dict()`` for JSON);
* every error class (all derive from :class:`EmbeddingStoreError`);
* the operations the CLI runs, as library functions: :func:`dump_store`,
  :func:`restore_store`, :func:`verify_store`, :func:`store_info`, :func:`compact_store`,
  :func:`import_cosir`, :func:`export_cosir`;
* what needs torch, imported on first use so the core and the CLI start without it:
  :class:`EmbeddingDataset`, :class:`BlockShuffleSampler` and :class:`BlockShuffleBatchSampler` (a
  shuffle with locality, opt-in), :class:`TrainableEmbeddingManager`, :class:`ShardedEmbeddingStore`,
  :class:`ShardedSampler`, and the modules
  ``lmdb_embeddings.torch`` (StoreEmbedding, Sparse* optimizers) and
  ``lmdb_embeddings.distributed`` (the sharded store).

Folders name concepts (docs/ARCHITECTURE.md): ``core`` (the in-process table and its
sessions), ``format`` (bytes on disk and in dump files), ``processes`` (environments,
transactions, the writer lock, fork, snapshots, the store builder), ``sharding`` (a sharded
store's directory, no torch), ``ops`` (dump/restore/verify/info/compact, of plain and sharded
stores alike), ``cli``, ``compat``
(the CoSiR drop-in), ``torch``, ``distributed``, ``testing`` (reusable contract suites).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    ClosedError,
    CommitError,
    CorruptionError,
    CosirExportError,
    CosirImportError,
    DumpFileError,
    EmbeddingStoreError,
    FormatVersionError,
    InvalidInputError,
    InvalidTypeError,
    MissingDependencyError,
    NotAStoreError,
    NpyInputError,
    ReadOnlyError,
    StorageError,
    StoreExistsError,
    StoreNotFoundError,
    TemplateIncompatibleError,
    UnknownIdError,
    WriterLockedError,
)
from .format.records import FORMAT_VERSION
from .handle import ShardedTableHandle, TableHandle
from .ops import compact_store, dump_store, restore_store, store_info, verify_store
from .optional import import_needing
from .options import StoreOptions
from .results import CompactResult, DumpResult, RestoreResult, StoreInfo, StoreStats, VerifyReport
from .store import EmbeddingStore
from .version import __version__

if TYPE_CHECKING:  # what type checkers see of the names imported on first use (below)
    from .compat.files import export_cosir, import_cosir
    from .compat.manager import TrainableEmbeddingManager
    from .distributed.sampler import ShardedSampler
    from .distributed.store import ShardedEmbeddingStore
    from .torch.dataset import EmbeddingDataset
    from .torch.samplers import BlockShuffleBatchSampler, BlockShuffleSampler

# name -> module that defines it; these need torch, so they are imported on first use
_LAZY = {
    "EmbeddingDataset": "lmdb_embeddings.torch.dataset",
    "BlockShuffleSampler": "lmdb_embeddings.torch.samplers",
    "BlockShuffleBatchSampler": "lmdb_embeddings.torch.samplers",
    "TrainableEmbeddingManager": "lmdb_embeddings.compat.manager",
    "import_cosir": "lmdb_embeddings.compat.files",
    "export_cosir": "lmdb_embeddings.compat.files",
    "ShardedEmbeddingStore": "lmdb_embeddings.distributed.store",
    "ShardedSampler": "lmdb_embeddings.distributed.sampler",
}

__all__ = [
    "EmbeddingStore",
    "StoreOptions",
    "TableHandle",
    "ShardedTableHandle",
    "EmbeddingDataset",
    "BlockShuffleSampler",
    "BlockShuffleBatchSampler",
    "TrainableEmbeddingManager",
    "ShardedEmbeddingStore",
    "ShardedSampler",
    # errors
    "EmbeddingStoreError",
    "ClosedError",
    "CommitError",
    "CorruptionError",
    "CosirExportError",
    "CosirImportError",
    "DumpFileError",
    "FormatVersionError",
    "InvalidInputError",
    "InvalidTypeError",
    "MissingDependencyError",
    "NotAStoreError",
    "NpyInputError",
    "ReadOnlyError",
    "StorageError",
    "StoreExistsError",
    "StoreNotFoundError",
    "TemplateIncompatibleError",
    "UnknownIdError",
    "WriterLockedError",
    # operations
    "dump_store",
    "restore_store",
    "verify_store",
    "store_info",
    "compact_store",
    "import_cosir",
    "export_cosir",
    # what they return (TypedDicts; VerifyReport a mapping-compatible dataclass)
    "StoreStats",
    "StoreInfo",
    "VerifyReport",
    "DumpResult",
    "RestoreResult",
    "CompactResult",
    "FORMAT_VERSION",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """The torch-dependent names, imported on first use (the core never imports torch); without torch,
    a :class:`MissingDependencyError` that says how to install it."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lmdb_embeddings' has no attribute {name!r}")
    return getattr(import_needing(module, "torch", f"lmdb_embeddings.{name}"), name)
