"""The ``lmdb-embeddings`` console script (also ``python -m lmdb_embeddings``).

Commands (``lmdb-embeddings COMMAND --help`` for each):

* ``create PATH (--rows N | --ids IDS.npy) --dim D [--init KIND] | --from-npy ROWS.npy`` — a new store
* ``info PATH [--json]`` — rows, dim, dtype, chunks, bytes on disk, format version, last commit, writer
* ``dump PATH OUT [--format native|npy] [--force]`` — a consistent, checksummed snapshot of the committed state
* ``restore IN PATH [--force] [--format auto|native|npy] [--chunk-rows N]`` — rebuild a store, bit-exact
* ``verify PATH [--json]`` — check every chunk and the metadata; exit 1 listing the bad chunks
* ``compact PATH`` — rewrite the store without free pages, atomically
* ``import-cosir DIR PATH [--force] [--chunk-rows N]`` — convert CoSiR ``embeddings_chunk_*.pt`` files
* ``export-cosir PATH DIR [--force]`` — write a store back as CoSiR ``embeddings_chunk_*.pt`` files, bit-exact

Global options (before or after the command): ``--quiet`` (no progress bars, no summary),
``--traceback`` (debugging); ``--version``. ``create``, ``dump``, ``restore``, ``verify``, ``compact``
and ``info`` print their result as JSON with ``--json``. Exit codes: 0 ok, 1 a failed operation or
bad input, 2 usage errors only.
"""

from .commands import build_parser, main

__all__ = ["main", "build_parser"]
