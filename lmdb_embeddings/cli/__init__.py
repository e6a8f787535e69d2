"""The ``lmdb-embeddings`` console script (also ``python -m lmdb_embeddings``).

Commands (``lmdb-embeddings COMMAND --help`` for each):

* ``info PATH [--json]`` — rows, dim, dtype, chunks, bytes on disk, format version, last commit, writer
* ``dump PATH OUT [--format native|npy]`` — a consistent, checksummed snapshot of the committed state
* ``restore IN PATH [--force] [--format auto|native|npy] [--chunk-rows N]`` — rebuild a store, bit-exact
* ``verify PATH [--json]`` — check every chunk and the metadata; exit 1 listing the bad chunks
* ``compact PATH`` — rewrite the store without free pages, atomically
* ``import-cosir DIR PATH [--force] [--chunk-rows N]`` — convert CoSiR ``embeddings_chunk_*.pt`` files
* ``export-cosir PATH DIR [--force]`` — write a store back as CoSiR ``embeddings_chunk_*.pt`` files, bit-exact

Global options: ``--quiet`` (no progress bars, no summary), ``--traceback`` (debugging).
"""

from .commands import build_parser, main

__all__ = ["main", "build_parser"]
