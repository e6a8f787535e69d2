"""The upstream file formats: ``embeddings_chunk_*.pt`` (``cosir_chunks``, needs torch) and, through
``lmdb_embeddings.format.memmap_dir`` (no torch), ``embeddings.npy`` + ``sample_ids.npy``; moving
tables between them and stores (``transfer``: ``import_cosir``, ``export_cosir``)."""

from ...errors import CosirExportError, CosirImportError, CosirSourceNotFoundError
from .transfer import export_cosir, import_cosir

__all__ = ["import_cosir", "export_cosir", "CosirImportError", "CosirExportError", "CosirSourceNotFoundError"]
