"""Helpers shared by the CLI test files: building test stores and reading them back."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import numpy as np
from checkout import ROOT, run_cli, subprocess_env

import lmdb_embeddings as le


def assert_one_line_error(proc, *needles: str) -> str:
    """A failed CLI run: non-zero exit, exactly one stderr line, no traceback."""
    lines = proc.stderr.splitlines()
    assert proc.returncode != 0, proc.stdout
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def stderr_on_tty(*args: str) -> str:
    """Run the CLI with its stderr on a terminal (100 columns wide); what it wrote there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.run([sys.executable, "-m", "lmdb_embeddings", *args], stdout=subprocess.PIPE,
                          stderr=slave, env=subprocess_env(), cwd=ROOT, timeout=120)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.returncode == 0
    return b"".join(chunks).decode(errors="replace")


def ok(*args: str, timeout: float = 120):
    proc = run_cli(*args, timeout=timeout)
    assert proc.returncode == 0, f"{args}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def make_rich_store(path: str, dtype: str = "float16", rows: int = 1500, dim: int = 12, chunk_rows: int = 100):
    """A store exercising everything dump/restore must carry.

    Non-contiguous, negative and huge IDs in shuffled order; awkward values (-0.0,
    subnormals, the dtype's extremes); an auxiliary column written only partly, with a
    non-zero fill; rows added after the column was written (short aux chunks); attrs.
    """
    rng = np.random.default_rng(7)
    ids = rng.permutation(np.arange(-rows, rows, dtype=np.int64) * 7 + 3)[:rows]
    finfo = np.finfo(dtype)
    values = (rng.standard_normal((rows, dim)) * 0.5).astype(dtype)
    values[0, :4] = [-0.0, finfo.tiny / 4, finfo.max, finfo.min]
    with le.EmbeddingStore.create(path, ids, dim, dtype=dtype, chunk_rows=chunk_rows, init=values, seed=3) as s:
        s.ensure_column("adam_m", dim, "float32", fill=0.25)
        s.ensure_column("steps", 1, "float64")
        touched = ids[::3][:400]
        s.put_column("adam_m", touched, rng.standard_normal((len(touched), dim)))
        s.set_attr("step", 42)
        s.set_attr("nested", {"lr": 1e-3, "betas": [0.9, 0.999], "blob": b"\x00\xff"})
        s.commit()
        s.add(np.array([10**15, -(10**15), 11], dtype=np.int64))
        s.put_column("steps", [11], [[3.0]])
        s.commit()
    return read_store(path)


def read_store(path: str) -> dict:
    """Everything a user can observe of a store, for bit-exact comparison."""
    with le.EmbeddingStore.open(path, readonly=True) as s:
        ids = s.ids
        out = {"ids": ids, "rows": s.get(ids), "dtype": s.dtype, "chunk_rows": s.chunk_rows, "attrs": s.attrs,
               "columns": s.columns}
        for name in s.columns:
            out[f"col:{name}"] = s.get_column(name, ids)
    return out


def assert_same_store(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], np.ndarray):
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
            assert a[key].tobytes() == b[key].tobytes(), f"{key} differs"
        else:
            assert a[key] == b[key], key
