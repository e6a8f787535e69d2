"""Templates and phase-1 results: tables written to and read from directories of files, by sample id.

``store_imgtxt_template`` writes ``embeddings_dir/../../template_embeddings`` with both
upstream layouts, so every upstream caller's own check finds it: the chunk files
(``embeddings_chunk_*.pt``, what 2025-10 .. 2026-04-06 scripts glob for), the memmap files
(``embeddings.npy`` + ``sample_ids.npy`` + ``metadata.json``, 2026-04 on) and
``template_config.json`` (strategy, embedding_dim, factor, normalize; 2026-04-28 on).

Loading (a template, or ``load_phase_1_template(path)``) reads our store, memmap files or
chunk files, whichever the directory holds, and matches rows **by sample id** (upstream
copied files by name or position, which mis-maps rows when the chunk size or the id order
changes). It reads the source twice, one group at a time: once to check it (dims, values,
which ids it covers), then to write, so a bad source changes nothing.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from ..errors import EmbeddingStoreError, InvalidInputError, TemplateIncompatibleError
from ..format.records import is_store
from ..format.snapshot import Snapshot
from .building import write_file_dir
from .cosir_files import find_chunk_files, load_chunk_file, write_chunk_files
from .memmap_files import MemmapTable, has_memmap_files, write_memmap_files
from .table_dir import store_path_in

log = logging.getLogger(__name__)

TEMPLATE_DIRNAME = "template_embeddings"
CONFIG_FILE = "template_config.json"


class TemplateNotFoundError(EmbeddingStoreError, FileNotFoundError):
    """The directory holds no table (no store, no embeddings.npy, no embeddings_chunk_*.pt)."""


def template_dir(embeddings_dir: Path) -> Path:
    """Where upstream kept a dataset's template: beside the experiment directories."""
    return Path(embeddings_dir).parent.parent / TEMPLATE_DIRNAME


# ----------------------------------------------------------------------- writing
def write_memmap_dir(table, directory) -> None:
    """``_copy_to``: the memmap files of the current rows (caller's order) at ``directory``."""
    write_file_dir(os.fspath(directory), lambda tmp: write_memmap_files(tmp, table.view_ids, table.view_rows(),
                                                                        table.dim), "copying")


def store_template(table, directory: Path, strategy: str, factor, normalize: bool) -> None:
    """Chunk files + memmap files + ``template_config.json`` of the current rows, replacing the old template."""
    config = {"strategy": strategy, "embedding_dim": table.dim, "factor": factor, "normalize": normalize}

    def build(tmp: str) -> None:
        write_chunk_files(tmp, table.chunk_rows_of())
        write_memmap_files(tmp, table.view_ids, table.view_rows(), table.dim)
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


def table_groups(directory):
    """``(kind, groups)``: a function yielding the ``(ids, rows)`` groups of the table in ``directory``."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise TemplateNotFoundError(f"No embeddings found at {directory}: the directory does not exist")
    store = store_path_in(directory)
    if is_store(store):
        return "store", lambda: _store_groups(store)
    if has_memmap_files(directory):
        memmap = MemmapTable(directory)
        return "memmap files", memmap.groups
    files = find_chunk_files(directory, required=False)
    if files:
        return "chunk files", lambda: (load_chunk_file(path) for _, path in files)
    raise TemplateNotFoundError(f"No embeddings found at {directory}: it holds no store, no embeddings.npy and no "
                                "embeddings_chunk_*.pt files")


def _store_groups(path: str):
    """The committed rows of a store, chunk by chunk (one consistent snapshot; safe while a writer trains)."""
    with Snapshot(path) as snap:
        main = snap.layout.columns[0]
        for chunk in range(snap.layout.n_chunks):
            yield snap.ids_chunk(chunk).copy(), np.array(snap.column_chunk(chunk, main))
            snap.release_pages()


def load_rows(table, directory, what: str) -> None:
    """Overwrite the rows of the sample ids the table in ``directory`` holds (checked first, then written)."""
    if os.path.realpath(store_path_in(directory)) == os.path.realpath(table.store.path):
        raise InvalidInputError(f"{what}: {directory} holds this manager's own store, there is nothing to load; "
                                "pass the directory of another run's result")
    kind, groups = table_groups(directory)
    n = len(table.view_ids)
    covered = np.zeros(n, bool)
    foreign = 0
    for ids, rows in groups():
        if len(ids) == 0:
            continue
        if rows.shape[1] != table.dim:
            raise TemplateIncompatibleError(f"{directory} holds rows of dim {rows.shape[1]}, this manager "
                                            f"embedding_dim={table.dim}")
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
