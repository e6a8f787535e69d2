"""Shared machinery of the torture scenarios: size knobs, child processes, figure records.

Every scenario runs its writers, readers and CLI calls in real subprocesses
(``torture_child.py`` or ``python -m lmdb_embeddings``) and kills them with real SIGKILL.

Size: ``TORTURE_SCALE=ci`` (default: the bounded CI run) or ``long`` (``tools/torture.py``);
any single knob can be overridden with ``TORTURE_<KNOB>`` (e.g. ``TORTURE_COMMIT_KILLS=5``).

Figures: when ``TORTURE_REPORT`` names a file, every scenario appends one JSON line with
its counters (kills survived, rows lost, torn reads ...) BEFORE asserting on them, so the
long run can print a summary table even when a scenario fails.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

from checkout import ROOT

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "torture_child.py")
SCALE = os.environ.get("TORTURE_SCALE", "ci")
if SCALE not in ("ci", "long"):
    raise RuntimeError(f"TORTURE_SCALE must be 'ci' or 'long', got {SCALE!r}")


def knob(name: str, ci: int, long: int) -> int:
    """A size parameter: the CI or long value, or ``TORTURE_<NAME>`` from the environment."""
    override = os.environ.get(f"TORTURE_{name.upper()}")
    if override:
        return int(override)
    return ci if SCALE == "ci" else long


def child_env(**extra: str) -> dict:
    """Environment for children: this checkout first on the import path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def spawn_child(*args: str, env: dict | None = None, stdin=subprocess.DEVNULL) -> subprocess.Popen:
    """Start ``torture_child.py ARGS`` with a line-oriented stdout pipe."""
    return subprocess.Popen([sys.executable, CHILD, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=stdin, env=env or child_env(), cwd=ROOT,
                            text=True, bufsize=1)


def run_child(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, CHILD, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env or child_env(), cwd=ROOT)


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m lmdb_embeddings ARGS`` in a subprocess (stderr is not a TTY)."""
    return subprocess.run([sys.executable, "-m", "lmdb_embeddings", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=child_env(), cwd=ROOT)


def spawn_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lmdb_embeddings", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=child_env(), cwd=ROOT, text=True)




def read_table(path: str):
    """(ids, every row) of the committed state; each chunk's checksum is checked on the way."""
    import lmdb_embeddings as le

    with le.EmbeddingStore.open(path, readonly=True, cache_mb=64) as store:
        ids = store.ids
        return ids, store.get(ids)


class LineReader:
    """Non-blocking reader of a child's stdout lines (``select`` on the pipe)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.lines: list[str] = []
        self.times: list[float] = []  # time.monotonic() at which each line was read
        self._buf = ""
        self._fd = proc.stdout.fileno()
        os.set_blocking(self._fd, False)

    def poll(self, timeout: float = 0.0) -> list[str]:
        """Read what is available within ``timeout`` seconds; return the new complete lines."""
        new: list[str] = []
        ready, _, _ = select.select([self._fd], [], [], max(timeout, 0.0))
        if ready:
            try:
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                data = b""
            if data:
                self._buf += data.decode()
                *done, self._buf = self._buf.split("\n")
                new = [line for line in done if line]
                self.lines.extend(new)
                self.times.extend([time.monotonic()] * len(new))
        return new

    def sleep(self, seconds: float) -> None:
        """Keep reading lines for ``seconds`` (or until the child exits)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.proc.poll() is None:
            self.poll(deadline - time.monotonic())

    def wait_for(self, prefix: str, timeout: float) -> str | None:
        """Wait until a line starting with ``prefix`` arrives (None if the child exits or time is up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.poll(min(0.05, deadline - time.monotonic())):
                if line.startswith(prefix):
                    return line
            if self.proc.poll() is not None:
                for line in self.poll(0):
                    if line.startswith(prefix):
                        return line
                return None
        return None

    def drain(self) -> None:
        """After the child died: collect every line it had written into the pipe."""
        while True:
            before = len(self.lines), self._buf
            self.poll(0.05)
            if (len(self.lines), self._buf) == before:
                return


def kill9(proc: subprocess.Popen) -> None:
    """SIGKILL and reap (no cleanup handler in the child can run)."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def stderr_of(proc: subprocess.Popen) -> str:
    try:
        return proc.stderr.read() if proc.stderr else ""
    except (OSError, ValueError):
        return ""


def record(scenario: str, **figures) -> None:
    """Append this scenario's figures to ``$TORTURE_REPORT`` (a JSON-lines file), if set."""
    path = os.environ.get("TORTURE_REPORT")
    if not path:
        return
    with open(path, "a") as fh:
        fh.write(json.dumps({"scenario": scenario, "scale": SCALE, **figures}) + "\n")


def verify_cli(path: str) -> str | None:
    """None if ``lmdb-embeddings verify`` passes, else its output."""
    proc = cli("verify", "--quiet", path, timeout=300)
    return None if proc.returncode == 0 else f"verify exit {proc.returncode}: {proc.stdout}{proc.stderr}"
