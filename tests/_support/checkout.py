"""This checkout's paths, and Python processes run against it: what the tests and every helper share.

Tests, helpers and child scripts import it by name (``tests/_support`` is on pytest's ``pythonpath``; a
child process cannot import conftest.py, and pytest's importlib mode keeps test files off ``sys.path``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import numpy as np

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


def kill_9_once(code: str, *args: str, ready, pause: float = 0.0) -> list[str]:
    """Run ``code`` in a child until ``ready(lines printed so far)``, wait ``pause`` s, kill -9 it; all its lines."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env(), cwd=ROOT)
    watchdog = threading.Timer(120, proc.kill)  # a hung child ends the readline below
    watchdog.start()
    try:
        lines: list[str] = []
        while not ready(lines):
            line = proc.stdout.readline()
            assert line, f"child ended early: {proc.stderr.read()}"
            lines.append(line.strip())
        threading.Event().wait(pause)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return lines + proc.stdout.read().split("\n")


def rows_like(n: int, dim: int, value: float = 0.0, seed: int = 0) -> np.ndarray:
    """``n`` x ``dim`` float32 rows near ``value`` (seeded)."""
    return (np.random.default_rng(seed).standard_normal((n, dim)) * 0.1 + value).astype(np.float32)
