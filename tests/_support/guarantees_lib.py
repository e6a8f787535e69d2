"""Helpers of the guarantee tests (issue 12): CLI runs in a chosen directory, child processes, small filesystems.

Everything goes through the public surface (``import lmdb_embeddings as le`` and
``python -m lmdb_embeddings``), in real subprocesses, so the tests hold whatever module
the library keeps its code in.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys

from checkout import ROOT, subprocess_env

import lmdb_embeddings as le

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "guarantees_child.py")
def cli(*args: str, cwd: str | None = None, timeout: float = 120, stdin=None, text: bool = True):
    """``python -m lmdb_embeddings ARGS`` in a subprocess started in ``cwd`` (stderr is not a TTY)."""
    return subprocess.run([sys.executable, "-m", "lmdb_embeddings", *map(str, args)], capture_output=True,
                          text=text, timeout=timeout, env=subprocess_env(), cwd=cwd or ROOT, stdin=stdin)


def cli_ok(*args: str, cwd: str | None = None, timeout: float = 120):
    proc = cli(*args, cwd=cwd, timeout=timeout)
    assert proc.returncode == 0, f"{args}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def run_child(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """``python guarantees_child.py ARGS`` (a real process); returns the finished process."""
    proc = subprocess.run([sys.executable, CHILD, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(), cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"child {args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def spawn_child(*args: str, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, CHILD, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=stdin, env=subprocess_env(), cwd=ROOT, text=True)


def last_json(proc: subprocess.CompletedProcess) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON line from the child:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1])


def py(code: str, *args: str, timeout: float = 120) -> str:
    """Run ``code`` (after importing json, sys, numpy as np, lmdb_embeddings as le) in a fresh process; its stdout."""
    prelude = "import json, sys\nimport numpy as np\nimport lmdb_embeddings as le\n"
    proc = subprocess.run([sys.executable, "-c", prelude + code, *args], capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(), cwd=ROOT)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def committed_table(path: str) -> dict:
    """What another process reads at ``path``: rows, dim, commit count and the distinct values (<= 10)."""
    out = py("s = le.EmbeddingStore.open(sys.argv[1], readonly=True)\n"
             "rows = s.get(s.ids)\n"
             "print(json.dumps({'rows': len(s), 'dim': s.dim, 'commit': s.commit_count,"
             " 'values': np.unique(rows)[:10].tolist()}))\n"
             "s.close()", path)
    return json.loads(out.strip().splitlines()[-1])


def one_line(exc: BaseException) -> str:
    """The message of a refusal: one line, not empty."""
    text = str(exc)
    assert text.strip() and "\n" not in text.strip(), f"not a one-line message: {text!r}"
    return text


def assert_one_line_cli_error(proc, *needles: str) -> str:
    """A refused CLI call: non-zero exit, one stderr line, no traceback, not an 'unexpected error'."""
    err = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode(errors="replace")
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode not in (0, None), f"exit 0 where a refusal was expected: {err}"
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err and "unexpected error" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@contextlib.contextmanager
def small_tmpfs(directory: str, size: str):
    """A size-limited tmpfs mounted on ``directory`` (needs root and mount permission)."""
    import pytest

    if os.geteuid() != 0:
        pytest.skip("needs root to mount a size-limited tmpfs (not root here)")
    os.makedirs(directory, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", directory],
                          capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs was refused ({proc.stderr.strip()})")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", directory], capture_output=True, timeout=30)


def _write_until_full(fd: int, block: bytes) -> None:
    while True:
        try:
            os.write(fd, block)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            return


def fill_disk(directory: str, leave: int = 0) -> str:
    """Write a ballast file until the filesystem is full, then give back ``leave`` bytes; its path."""
    path = os.path.join(directory, "ballast")
    block = b"\0" * (1 << 16)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        _write_until_full(fd, block)
        _write_until_full(fd, b"\0" * 4096)  # the last few pages too
    finally:
        os.close(fd)
    if leave:
        os.truncate(path, max(0, os.path.getsize(path) - leave))
    return path


def build_fault_shim(directory: str) -> str:
    """Compile the LD_PRELOAD fault shim (tests/_support/eio_shim.c) into ``directory``; its path.

    Skips the test when no C compiler is found."""
    import shutil

    import pytest

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("fault injection needs a C compiler to build the LD_PRELOAD shim (none found)")
    out = os.path.join(directory, "eio_shim.so")
    proc = subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", out, os.path.join(HERE, "eio_shim.c"),
                           "-ldl"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out


def damage_stored_row(path: str, row: bytes, at: int = 3, mask: int = 0x40) -> None:
    """Flip bits of byte ``at`` of the stored copy of ``row`` in a store's data file (its bytes are unique there)."""
    data_file = os.path.join(path, "data.mdb")
    with open(data_file, "rb") as fh:
        data = fh.read()
    found = data.find(row)
    assert found > 0 and data.find(row, found + 1) < 0, "the row's bytes are not unique in the data file"
    with open(data_file, "r+b") as fh:
        fh.seek(found + at)
        byte = fh.read(1)[0]
        fh.seek(found + at)
        fh.write(bytes([byte ^ mask]))


def hidden_entries(parent: str, name: str) -> list[str]:
    """Hidden siblings ``.NAME.*`` (temporary build/swap directories) left beside ``parent/name``."""
    return sorted(e for e in os.listdir(parent) if e.startswith(f".{name}."))


__all__ = ["le", "ROOT"]
