"""What the compat tests share: an upstream-style manager on a small table, its committed rows read by
another process, and chunk files written as the original manager wrote them."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from checkout import run_python

import lmdb_embeddings as le

N, DIM, CHUNK = 500, 2, 100
MODES = ["disk", "memory"]


def manager(directory, mode="disk", **kw):
    """The constructor call of the upstream test scripts (all keywords, chunk style)."""
    args = dict(sample_ids=list(range(N)), embedding_dim=DIM, device="cpu", initialization_strategy="zeros",
                storage_mode=mode, embeddings_dir=str(directory), chunk_size=CHUNK)
    args.update(kw)
    return le.TrainableEmbeddingManager(**args)


def committed(directory) -> np.ndarray:
    """The committed rows, read by ANOTHER process (what a crash would leave)."""
    out = run_python("import sys, json, lmdb_embeddings as le\n"
                     "with le.EmbeddingStore.open(sys.argv[1], readonly=True) as s:\n"
                     "    print(json.dumps({'rows': s.get(s.ids).tolist(), 'commit': s.commit_count}))\n",
                     os.path.join(str(directory), "embeddings.lmdb")).stdout
    found = json.loads(out.strip().splitlines()[-1])
    return np.asarray(found["rows"], np.float32), found["commit"]


def write_original(directory, ids, rows, chunk_size) -> list[str]:
    """Write files as the original manager did: torch.save({sample_id: 1-D tensor}) per chunk, the rows
    being views of one (chunk_size, dim) tensor, as its ``init_embeddings[idx]`` were."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for chunk_id, lo in enumerate(range(0, len(ids), chunk_size)):
        block = torch.from_numpy(np.ascontiguousarray(rows[lo : lo + chunk_size]))
        chunk = {int(sid): block[i] for i, sid in enumerate(ids[lo : lo + chunk_size])}
        path = os.path.join(directory, f"embeddings_chunk_{chunk_id}.pt")
        torch.save(chunk, path)
        paths.append(path)
    return paths
