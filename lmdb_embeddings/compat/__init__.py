"""The drop-in replacement for CoSiR's ``TrainableEmbeddingManager`` and its chunk-file importer.

Needs torch (the manager returns tensors); ``lmdb_embeddings`` exposes both lazily.
"""
