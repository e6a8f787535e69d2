"""The drop-in replacement for CoSiR's ``TrainableEmbeddingManager``, in three groups (docs/ARCHITECTURE.md).

* ``manager/``: the class (``manager.manager``) and the modules that do its jobs;
* ``files/``: the upstream ``embeddings_chunk_*.pt`` files and moving tables between them and
  stores (``import_cosir``, ``export_cosir``); the memmap files' reader and writer need no torch
  and live in ``lmdb_embeddings.format.memmap_dir``;
* ``init/``: the initialisations from a FeatureManager's features (projection, streamed PCA).

Needs torch (the manager returns tensors); ``lmdb_embeddings`` exposes the public names lazily.
"""
