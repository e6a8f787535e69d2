"""Exception types.

Every error the package raises derives from :class:`EmbeddingStoreError` and, where the
spec names a builtin (``KeyError``, ``ValueError`` ...), from that builtin too, so callers
can catch either the library's base class or the ordinary Python exception.

Every exception class of the package is defined here and nowhere else (``tests/project/test_layout.py``
checks it), so the modules that raise them, and other ranks that rebuild them by name, find one
class per name. The modules that raised them first still re-export the public ones.
"""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (the class name if it has none; an ``OSError``'s reason and file),
    as the CLI prints it and as ranks report a failed collective."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}"
    return " ".join(text.split())


class EmbeddingStoreError(Exception):
    """Base class of every error raised by lmdb_embeddings."""


class CorruptionError(EmbeddingStoreError):
    """Stored data failed its checksum or structural check: never returned as numbers."""


class FormatVersionError(EmbeddingStoreError):
    """The store was written by a newer on-disk format than this library understands."""


class NotAStoreError(EmbeddingStoreError):
    """The path exists but does not hold an lmdb_embeddings store."""


class WriterLockedError(EmbeddingStoreError):
    """Another writable handle (in this or another process) holds the store.

    ``holder_pid`` is the pid of the holder as it recorded itself (None if unknown).
    """

    def __init__(self, message: str, holder_pid: int | None = None):
        super().__init__(message)
        self.holder_pid = holder_pid


class StorageError(EmbeddingStoreError, OSError):
    """The filesystem refused what the store needed (disk full, I/O error); nothing was changed."""


class CommitError(StorageError):
    """A commit (or a write that needed the pending transaction) failed at the storage layer; see the message.

    ``reason``: what failed, in a few words (``"the disk is full: 12,288 bytes of disk needed"``).
    ``rolled_back``: True when the handle was rolled back to the last commit (LMDB lost a
    transaction holding changes spilled from the cache); False when the store keeps its last
    commit and the handle its uncommitted changes, so the same ``commit()`` can be retried.
    """

    def __init__(self, message: str, reason: str | None = None, rolled_back: bool = False):
        super().__init__(message)
        self.reason = reason or message
        self.rolled_back = rolled_back


class StoreExistsError(EmbeddingStoreError, FileExistsError):
    """``create`` found a store at the path and ``overwrite`` was not given."""


class StoreNotFoundError(EmbeddingStoreError, FileNotFoundError):
    """``open`` found no store at the path."""


class InvalidInputError(EmbeddingStoreError, ValueError):
    """An argument has the wrong shape, dtype, values or duplicates."""


class InvalidTypeError(EmbeddingStoreError, TypeError):
    """An argument has a type the call cannot accept."""


class UnknownIdError(EmbeddingStoreError, KeyError):
    """One or more sample IDs are not in the store."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else ""


class PositionError(EmbeddingStoreError, IndexError):
    """A position (not a sample ID) is out of range, as indexing a tensor or a ``TensorDataset`` says."""


class ReadOnlyError(EmbeddingStoreError, PermissionError):
    """A write was attempted on a read-only handle."""


class ClosedError(EmbeddingStoreError, ValueError):
    """The handle was closed; open the store again."""


class TemplateIncompatibleError(EmbeddingStoreError, ValueError):
    """A stored template was made with other settings (strategy, dim, factor, normalize) than requested.

    The CoSiR drop-in raises it where the upstream manager raised its own ``TemplateIncompatibleError``.
    """


class ReadOnlyAttributeError(EmbeddingStoreError, AttributeError):
    """An attribute of the CoSiR drop-in that cannot be assigned (the message says what to do instead)."""


class ProcessGroupError(EmbeddingStoreError):
    """A collective call of a sharded store failed because its process group did: a rank died, hung past
    the group's timeout, or the network failed. The message says where the store on disk stands; the
    handle takes part in no more collective calls: close it and open the store again on every rank."""


class ProcessGroupCommitError(CommitError, ProcessGroupError):
    """A sharded ``commit()`` whose process group failed; the message says which commit the store is at."""


class MissingDependencyError(EmbeddingStoreError, ImportError):
    """An optional dependency (torch for the tensor API, pytest for ``lmdb_embeddings.testing``) is not
    installed; the message says what to install."""


# ----------------------------------------------------------------------- files and dumps
class DumpFileError(EmbeddingStoreError, ValueError):
    """A dump file is not one, is damaged or truncated, or is from a newer version."""


class NpyInputError(InvalidInputError):
    """An .npy directory that cannot be restored (missing, damaged or inconsistent files)."""


class ReservationError(StorageError):
    """The disk blocks a write needs could not be allocated; nothing was written. ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------- the sharded store
class ManifestSyncError(CommitError):
    """The new manifest was renamed into place (the commit is decided) but syncing its directory failed."""


# ----------------------------------------------------------------------- the CoSiR drop-in
class CosirImportError(EmbeddingStoreError, ValueError):
    """The original chunk files cannot be imported (the message names the file and the problem)."""


class CosirSourceNotFoundError(EmbeddingStoreError, FileNotFoundError):
    """The directory of original chunk files does not exist."""


class CosirExportError(EmbeddingStoreError, ValueError):
    """The chunk files cannot be written where asked (the message says why)."""


class UnknownChunkError(InvalidInputError, FileNotFoundError):
    """A chunk id outside ``0 .. num_chunks - 1`` (the original raised ValueError or FileNotFoundError)."""


class UnknownSampleError(UnknownIdError, ValueError):
    """Sample IDs not managed here (a ``KeyError`` like the store's, a ``ValueError`` like the original's)."""


class StoreDeletedError(CommitError, FileNotFoundError):
    """A sync of a manager whose store's files were deleted (or replaced) while it was open."""


class TemplateNotFoundError(EmbeddingStoreError, FileNotFoundError):
    """The directory holds no table (no store, no embeddings.npy, no embeddings_chunk_*.pt)."""
