"""Templates and phase-1 results: tables written to and read from directories of files, by sample id.

``store_imgtxt_template`` writes ``embeddings_dir/../../template_embeddings`` with both
upstream layouts, so every upstream caller's own check finds it: the chunk files
(``embeddings_chunk_*.pt``, what 2025-10 .. 2026-04-06 scripts glob for), the memmap files
(``embeddings.npy`` + ``sample_ids.npy`` + ``metadata.json``, 2026-04 on) and
``template_config.json`` (strategy, embedding_dim, factor, normalize; 2026-04-28 on).

Loading (a template, or ``load_phase_1_template(path)``) reads our store, memmap files or
chunk files, whichever the directory holds, and matches rows **by sample id** (upstream
copied files by name or position, which mis-maps rows when the chunk size or the id order
changes). It reads the source twice, one chunk at a time: once to check it (dims, values,
which ids it covers), then to write, so a bad source changes nothing. Both reads see the same
table: a store's come from one snapshot, chunk files are loaded once (their rows wait in a
temporary file beside the manager's store).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from ...errors import InvalidInputError, TemplateIncompatibleError, TemplateNotFoundError
from ...format.layout import ColumnSpec, TableLayout
from ...format.memmap_dir import MemmapDirReader, MemmapDirWriter, has_memmap_files
from ...format.records import MAIN, is_store
from ...processes.snapshot import Snapshot
from ..files.cosir_chunks import CosirChunkReader, CosirChunkWriter, find_chunk_files
from ..files.transfer import MainColumn, write_file_dir, write_table
from .table_dir import store_path_in

log = logging.getLogger(__name__)

TEMPLATE_DIRNAME = "template_embeddings"
CONFIG_FILE = "template_config.json"
_READ_ROWS = 4096  # memmap rows read at once by phase-1 loads


def template_dir(embeddings_dir: Path) -> Path:
    """Where upstream kept a dataset's template: beside the experiment directories."""
    return Path(embeddings_dir).parent.parent / TEMPLATE_DIRNAME


# ----------------------------------------------------------------------- writing
class ManagerRows:
    """A manager's rows, uncommitted ones included, as a table source, in the order of ``ids``.

    ``table.view_ids``: the caller's order (the memmap files'); ``table.store_ids``: the store's,
    so chunk ``k`` is store chunk ``k`` (one chunk file each).
    """

    def __init__(self, table, ids):
        table.reconcile()
        self.table, self.ids = table, ids
        self.layout = TableLayout(table.chunk_rows, len(ids), (ColumnSpec(MAIN, table.dim, table.dtype),))

    def id_chunks(self):
        for chunk, rows in self.layout.chunk_slices():
            yield chunk, self.ids[rows]

    def chunks(self):
        for chunk, rows in self.layout.chunk_slices():
            yield chunk, [self.table.store.get(self.ids[rows])]


def write_memmap_files(table, tmp: str) -> None:
    rows = ManagerRows(table, table.view_ids)
    write_table(rows, MemmapDirWriter(tmp, rows.layout))


def write_memmap_dir(table, directory) -> None:
    """``_copy_to``: the memmap files of the current rows (caller's order) at ``directory``."""
    write_file_dir(os.fspath(directory), lambda tmp: write_memmap_files(table, tmp), "copying")


def store_template(table, directory: Path, strategy: str, factor, normalize: bool) -> None:
    """Chunk files + memmap files + ``template_config.json`` of the current rows, replacing the old template."""
    config = {"strategy": strategy, "embedding_dim": table.dim, "factor": factor, "normalize": normalize}

    def build(tmp: str) -> None:
        chunks = ManagerRows(table, table.store_ids)
        write_table(chunks, CosirChunkWriter(tmp, chunks.layout))
        write_memmap_files(table, tmp)
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)

    write_file_dir(os.fspath(directory), build, "template")
    log.info("template saved to %s (%s)", directory, config)


# ----------------------------------------------------------------------- reading
def check_template_config(directory: Path, dim: int, strategy: str, factor, normalize: bool) -> None:
    """The 2026-04-28 rule: with a ``strategy`` and a stored config, every setting must match."""
    path = Path(directory) / CONFIG_FILE
    if not strategy or not path.is_file():
        return
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TemplateIncompatibleError(f"{path} cannot be read ({exc}); store the template again") from None
    expected = {"strategy": strategy, "embedding_dim": dim, "factor": factor, "normalize": normalize}
    mismatches = {k: (stored.get(k), v) for k, v in expected.items() if stored.get(k) != v}
    if mismatches:
        details = ", ".join(f"{k}: stored={a!r} vs requested={b!r}" for k, (a, b) in mismatches.items())
        raise TemplateIncompatibleError(f"Template config mismatch — {details} ({path})")


@contextlib.contextmanager
def table_source(directory, spill_dir: str):
    """``(kind, source)``: the table in ``directory`` (a store, memmap files or chunk files) as a table
    source whose rows can be read more than once (each kind reads them by chunk index)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise TemplateNotFoundError(f"No embeddings found at {directory}: the directory does not exist")
    store = store_path_in(directory)
    if is_store(store):
        with Snapshot(store) as snap:  # one snapshot: both reads see one commit, safe while a writer trains
            yield "store", MainColumn(snap)
    elif has_memmap_files(directory):
        with MemmapDirReader(directory, _READ_ROWS) as reader:
            yield "memmap files", reader
    elif files := find_chunk_files(directory, required=False):
        with CosirChunkReader(files, spill_dir=spill_dir) as reader:
            yield "chunk files", reader
    else:
        raise TemplateNotFoundError(f"No embeddings found at {directory}: it holds no store, no embeddings.npy "
                                    "and no embeddings_chunk_*.pt files")


def load_rows(table, directory, what: str) -> None:
    """Overwrite the rows of the sample ids the table in ``directory`` holds (checked first, then written)."""
    if os.path.realpath(store_path_in(directory)) == os.path.realpath(table.store.path):
        raise InvalidInputError(f"{what}: {directory} holds this manager's own store, there is nothing to load; "
                                "pass the directory of another run's result")
    with table_source(directory, os.path.dirname(table.store.path)) as (kind, source):
        if source.layout.dim != table.dim:
            raise TemplateIncompatibleError(f"{directory} holds rows of dim {source.layout.dim}, this manager "
                                            f"embedding_dim={table.dim}")
        ids_of = [ids.copy() for _, ids in source.id_chunks()]

        def groups():
            for chunk, parts in source.chunks():
                yield ids_of[chunk], parts[0]

        _check_then_write(table, directory, what, kind, groups)


def _check_then_write(table, directory, what: str, kind: str, groups) -> None:
    n = len(table.view_ids)
    covered = np.zeros(n, bool)
    foreign = 0
    for ids, rows in groups():
        positions, found = table.view_index.find(ids)
        ours = positions[found]
        if covered[ours].any() or len(np.unique(ours)) != len(ours):
            raise InvalidInputError(f"{directory} holds some sample ids twice; it is not a table")
        table.cast(rows[found], len(ours), what)  # the values are checked here, before anything is written
        covered[ours] = True
        foreign += int((~found).sum())
    if not covered.any():
        raise TemplateIncompatibleError(f"{directory} ({kind}) holds none of this manager's {n} sample ids")
    if not covered.all():
        log.warning("%s: %s holds rows for %d of this manager's %d sample ids; the other rows are left as they are",
                    what, directory, int(covered.sum()), n)
    if foreign:
        log.info("%s: %d rows of %s belong to sample ids this manager does not hold; they are not loaded", what,
                 foreign, directory)
    with table.bulk_write(what):
        for ids, rows in groups():
            found = table.view_index.contains(ids)
            if found.any():
                table.write(ids[found], table.cast(rows[found], int(found.sum()), what))
    log.info("%s: loaded %d rows from %s (%s)", what, int(covered.sum()), directory, kind)
