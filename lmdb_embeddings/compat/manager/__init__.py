"""The drop-in ``TrainableEmbeddingManager`` (``manager``) and the modules that do its jobs (docs/ARCHITECTURE.md)."""

from .backing import UnknownSampleError
from .manager import TrainableEmbeddingManager, UnknownChunkError

__all__ = ["TrainableEmbeddingManager", "UnknownChunkError", "UnknownSampleError"]
