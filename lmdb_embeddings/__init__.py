"""lmdb_embeddings: per-sample trainable embedding tables in LMDB, for PyTorch training.

The public surface is small: :class:`EmbeddingStore` (create/open/get/put/add/commit),
the error classes, the drop-in :class:`TrainableEmbeddingManager`, and the training
module ``lmdb_embeddings.torch`` (imported on demand, so the core starts without torch).
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    ClosedError,
    CommitError,
    CorruptionError,
    EmbeddingStoreError,
    FormatVersionError,
    NotAStoreError,
    WriterLockedError,
)
from .store import FORMAT_VERSION, EmbeddingStore  # noqa: E402

__all__ = [
    "EmbeddingStore",
    "EmbeddingStoreError",
    "CorruptionError",
    "CommitError",
    "ClosedError",
    "FormatVersionError",
    "NotAStoreError",
    "WriterLockedError",
    "FORMAT_VERSION",
    "TrainableEmbeddingManager",
    "__version__",
]


def __getattr__(name):
    """Lazy attributes: the drop-in manager needs torch, which the core does not import."""
    if name == "TrainableEmbeddingManager":
        from .manager import TrainableEmbeddingManager

        return TrainableEmbeddingManager
    raise AttributeError(f"module 'lmdb_embeddings' has no attribute {name!r}")
