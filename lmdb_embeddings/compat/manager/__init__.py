"""The drop-in ``TrainableEmbeddingManager`` (``manager``) and the modules that do its jobs (docs/ARCHITECTURE.md)."""

from ...errors import UnknownChunkError, UnknownSampleError
from .manager import TrainableEmbeddingManager

__all__ = ["TrainableEmbeddingManager", "UnknownChunkError", "UnknownSampleError"]
