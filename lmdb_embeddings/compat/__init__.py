"""The drop-in replacement for CoSiR's ``TrainableEmbeddingManager``, and the upstream file formats.

``manager`` is the class; the other modules each do one of its jobs (docs/ARCHITECTURE.md).
``cosir_files`` imports and exports ``embeddings_chunk_*.pt``, ``memmap_files`` reads and writes
``embeddings.npy`` + ``sample_ids.npy``. Needs torch (the manager returns tensors);
``lmdb_embeddings`` exposes the public names lazily.
"""
