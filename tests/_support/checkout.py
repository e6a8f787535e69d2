"""This checkout's paths, and Python processes run against it: what the tests and every helper share.

Helpers and child scripts import it (never conftest.py, which a child process cannot import); the tests
import the same names through conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

SUPPORT = os.path.dirname(os.path.abspath(__file__))  # helper modules, and the child scripts the tests run by path
TESTS = os.path.dirname(SUPPORT)
ROOT = os.path.dirname(TESTS)
FIXTURES = os.path.join(TESTS, "data")  # stores and dumps of 0.1.0, upstream CoSiR files, a typed user script


def subprocess_env() -> dict:
    """Environment for child Python processes: this checkout first on the import path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_python(code: str, *args: str, timeout: float = 120, check: bool = True):
    """Run ``code`` in a fresh interpreter (a real subprocess) and return the CompletedProcess."""
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(), cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_cli(*args: str, timeout: float = 300, stdin=None):
    """Run ``python -m lmdb_embeddings ARGS`` in a subprocess (stderr is not a TTY)."""
    return subprocess.run([sys.executable, "-m", "lmdb_embeddings", *args], capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(), cwd=ROOT, stdin=stdin)
