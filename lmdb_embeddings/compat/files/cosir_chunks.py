"""The original CoSiR chunk files (``embeddings_chunk_{i}.pt``) as a table source and sink.

The original manager saved chunk ``i`` as ``torch.save({sample_id: 1-D tensor, ...})``: the ids
and rows of a chunk in one file. Files are read with ``torch.load(weights_only=True)``: plain
tensors only, no pickled code. They hold the main column only (no optimizer state, no
metadata); the chunking is the files' (one file per store chunk on export).
"""

from __future__ import annotations

import io
import os
import pickle
import re
import tempfile

import numpy as np
import torch

from ...errors import CosirImportError, CosirSourceNotFoundError, EmbeddingStoreError, InvalidInputError, StorageError
from ...format.layout import ID_DTYPE, ColumnSpec, TableLayout
from ...format.records import MAIN
from ...inputs import as_dtype, as_values, repeated_ids

CHUNK_GLOB = "embeddings_chunk_*.pt"
_CHUNK_NAME = re.compile(r"^embeddings_chunk_(\d+)\.pt$")


def find_chunk_files(src_dir, required: bool = True) -> list[tuple[int, str]]:
    """``(chunk index, path)`` of the original chunk files in ``src_dir``, in chunk order."""
    src_dir = os.fspath(src_dir)
    if not os.path.isdir(src_dir):
        if not required:
            return []
        raise CosirSourceNotFoundError(f"{src_dir} is not a directory of embeddings_chunk_*.pt files")
    found, odd = [], []
    for name in os.listdir(src_dir):
        if not name.startswith("embeddings_chunk_") or not name.endswith(".pt"):
            continue
        match = _CHUNK_NAME.match(name)
        if match is None:
            odd.append(name)
        else:
            found.append((int(match.group(1)), os.path.join(src_dir, name)))
    if odd and required:
        raise CosirImportError(f"{src_dir}: unexpected chunk file name(s) {', '.join(sorted(odd)[:5])}; "
                               "expected embeddings_chunk_<integer>.pt")
    if not found and required:
        raise CosirImportError(f"{src_dir} holds no {CHUNK_GLOB} files (nothing to import)")
    return sorted(found)


def load_chunk_file(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, rows)`` of one original chunk file, in the file's key order."""
    name = os.path.basename(path)
    try:
        with torch.serialization.safe_globals(_numpy_int_globals()):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CosirImportError(
            f"{path}: cannot be read: it is not a torch.save file, or it holds objects other than tensors, "
            "dicts and numbers (files are loaded with weights_only=True, which refuses pickled code)") from None
    except Exception as exc:  # torch raises many types for truncated or foreign files
        detail = str(exc).splitlines()[0][:200] if str(exc) else "no detail"
        raise CosirImportError(f"{path}: cannot be read as a torch.save file, it may be truncated or "
                               f"corrupt ({type(exc).__name__}: {detail})") from None
    if not isinstance(data, dict):
        raise CosirImportError(f"{path}: holds a {type(data).__name__}, expected a dict {{sample_id: 1-D tensor}}")
    if not data:
        return np.empty(0, np.int64), np.empty((0, 0), np.float32)
    keys = list(data)
    if not all(_is_int(k) for k in keys):
        bad = next(k for k in keys if not _is_int(k))
        raise CosirImportError(f"{name}: key {bad!r} is not an integer sample id")
    values = list(data.values())
    if not all(isinstance(v, torch.Tensor) and v.dim() == 1 for v in values):
        raise CosirImportError(f"{name}: every value must be a 1-D tensor (one embedding row)")
    dims = {int(v.shape[0]) for v in values}
    if len(dims) != 1:
        raise CosirImportError(f"{name}: rows of different lengths {sorted(dims)}")
    try:
        ids = np.array(keys, dtype=np.int64)
    except OverflowError:
        raise CosirImportError(f"{name}: sample ids outside the int64 range") from None
    rows = torch.stack([v.detach() for v in values])
    if rows.dtype not in (torch.float16, torch.float32, torch.float64):
        rows = rows.to(torch.float32)
    return ids, rows.numpy()


def _is_int(key) -> bool:
    return isinstance(key, (int, np.integer)) and not isinstance(key, bool)


def _numpy_int_globals() -> list:
    """What unpickling numpy integer sample IDs needs (the original kept IDs as given, numpy ones too).

    Only scalar reconstruction from a dtype and raw bytes: no code runs. Files written under
    numpy 1 name the function ``numpy.core.multiarray.scalar``, under numpy 2 ``numpy._core...``.
    """
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    int_dtypes = [type(np.dtype(t)) for t in (np.int8, np.int16, np.int32, np.int64,
                                               np.uint8, np.uint16, np.uint32, np.uint64)]
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
            np.dtype, *int_dtypes]


class CosirChunkReader:
    """The table in a directory of chunk files (a table source); ``files`` as :func:`find_chunk_files` lists them.

    A table source gives every id before any row, and the store builder needs the row count
    first, while a file holds both and ``torch.load`` is nearly the whole cost of reading it.
    So each file is loaded ONCE, here: its ids are kept (8 bytes per row, also for the
    uniqueness check) and its rows, cast to the table's dtype and checked finite, go to an
    unnamed temporary file in ``spill_dir`` that :meth:`chunks` reads back (any number of
    times). Memory holds one file. Rows keep the files' order: chunk 0's rows first, each
    file in its key order (the sorted sample-id order, for files of the original manager).

    ``chunk_rows`` defaults to the row count of the first non-empty file (the original
    ``chunk_size``, so the manager's chunk ids stay the same), ``dtype`` to its dtype.
    ``on_file()`` is called after each file (progress bars).
    """

    def __init__(self, files: list[tuple[int, str]], *, spill_dir: str, chunk_rows: int | None = None,
                 dtype=None, on_file=None):
        self.files = files
        dtype = None if dtype is None else as_dtype(dtype)
        self._spill = tempfile.TemporaryFile(dir=spill_dir)  # noqa: SIM115 - closed by close()
        try:
            self._ids = self._load(chunk_rows, dtype, on_file)
        except BaseException:
            self._spill.close()
            raise

    def _load(self, chunk_rows, dtype, on_file) -> np.ndarray:
        ids_of_files, starts, names = [], [], []
        rows_total, dim, name = 0, None, ""
        for _, path in self.files:
            name = os.path.basename(path)
            ids, rows = load_chunk_file(path)
            if on_file is not None:
                on_file()
            if len(ids) == 0:
                continue
            if dim is None:
                dim, chunk_rows = rows.shape[1], chunk_rows or len(ids)
                dtype = as_dtype(rows.dtype) if dtype is None else dtype
            elif rows.shape[1] != dim:
                raise CosirImportError(f"{name}: rows of dim {rows.shape[1]}, but earlier rows have dim {dim} "
                                       "(mixed dims in one table)")
            try:
                rows = as_values(rows, len(ids), dim, dtype, name)
            except InvalidInputError as exc:
                raise CosirImportError(str(exc)) from None
            self._keep(rows, name)
            ids_of_files.append(ids)
            starts.append(rows_total)
            names.append(name)
            rows_total += len(ids)
        if dim is None:
            raise CosirImportError(f"{name or 'the input'}: holds no rows (nothing to import)")
        self._keep(None, name)
        self.layout = TableLayout(chunk_rows, rows_total, (ColumnSpec(MAIN, dim, dtype),))
        self.layout.check(CosirImportError, os.path.dirname(self.files[0][1]))
        ids = np.concatenate(ids_of_files)
        repeated = repeated_ids(ids)
        if len(repeated):
            second = np.flatnonzero(ids == repeated[0])[1]
            name = names[int(np.searchsorted(starts, second, side="right")) - 1]
            raise CosirImportError(f"{name}: sample id {int(repeated[0])} is in an earlier file: sample ids must be "
                                   "unique")
        return ids

    def _keep(self, rows: np.ndarray | None, name: str) -> None:
        """Append ``rows`` to the temporary file (None: flush it); a full disk is a ``StorageError``."""
        try:
            if rows is None:
                self._spill.flush()
            else:
                self._spill.write(memoryview(rows).cast("B"))
        except OSError as exc:
            raise StorageError(f"keeping the rows of {name} in a temporary file failed ({exc.strerror}); nothing "
                               "was imported") from None

    def id_chunks(self):
        for chunk, rows in self.layout.chunk_slices():
            yield chunk, self._ids[rows]

    def chunks(self):
        layout, fd = self.layout, self._spill.fileno()
        for chunk, slots in layout.chunk_slices():
            rows = np.empty((slots.stop - slots.start, layout.dim), layout.dtype)
            got = os.preadv(fd, [memoryview(rows).cast("B")], slots.start * layout.row_bytes)
            if got != rows.nbytes:  # pragma: no cover - our own unnamed file
                raise EmbeddingStoreError(f"the temporary copy of {self.files[0][1]}'s rows is short")
            yield chunk, [rows]

    def close(self) -> None:
        self._spill.close()

    def __enter__(self) -> CosirChunkReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CosirChunkWriter:
    """Writes ``embeddings_chunk_{k}.pt`` for every chunk ``k`` of a table into ``directory`` (a table sink).

    ``directory`` is a staging directory that the caller swaps in whole: each file is synced,
    the directory is the caller's. The main column only: the files hold nothing else. The ids,
    which come before every row, wait in an unnamed temporary file until their rows arrive.
    """

    def __init__(self, directory: str, layout: TableLayout):
        self.directory, self.layout = directory, layout
        self._ids = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 - closed by close()

    def add_ids(self, chunk: int, ids: np.ndarray) -> None:
        self._ids.write(np.ascontiguousarray(ids, ID_DTYPE).tobytes())

    def add_chunk(self, chunk: int, parts: list[np.ndarray]) -> None:
        rows = parts[0]
        self._ids.flush()  # a no-op after the first chunk
        offset = chunk * self.layout.chunk_rows * ID_DTYPE.itemsize
        ids = np.frombuffer(os.pread(self._ids.fileno(), len(rows) * ID_DTYPE.itemsize, offset), ID_DTYPE)
        if len(ids) != len(rows):
            raise EmbeddingStoreError(f"chunk file {chunk}: {len(rows)} rows but {len(ids)} ids were given")
        content = io.BytesIO()  # serialized first: a full disk is then an OSError of our write, not torch's
        torch.save(chunk_file_content(ids, rows), content)
        with open(os.path.join(self.directory, f"embeddings_chunk_{chunk}.pt"), "wb") as f:
            f.write(content.getbuffer())
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> None:
        self._ids.close()

    def close(self) -> None:
        self._ids.close()


def chunk_file_content(ids: np.ndarray, rows: np.ndarray) -> dict:
    """What the original manager saved per chunk: ``{int sample id: 1-D tensor}`` in row order.

    The values are rows of one tensor (as the original's were), so ``torch.save`` writes the
    chunk's rows once, as one storage.
    """
    block = torch.from_numpy(np.array(rows, copy=True))
    return dict(zip(ids.tolist(), block.unbind(0), strict=True))


__all__ = ["CosirChunkReader", "CosirChunkWriter", "find_chunk_files", "load_chunk_file", "chunk_file_content",
           "CosirImportError", "CosirSourceNotFoundError", "CHUNK_GLOB"]
