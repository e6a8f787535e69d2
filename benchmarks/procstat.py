"""Memory and I/O counters of a process, read from /proc (Linux).

Peak RSS comes from the kernel's own high-water mark (VmHWM). RssAnon has no kernel
peak, so the parent samples it while the child runs (``AnonSampler``); anonymous memory
is what a table held in the process costs, as opposed to file pages of a mapping.
"""

from __future__ import annotations

import threading


def status_kib(pid: int | str, field: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def write_bytes(pid: int | str = "self") -> int:
    """Bytes this process caused to be written to storage (/proc/<pid>/io write_bytes)."""
    try:
        with open(f"/proc/{pid}/io") as fh:
            for line in fh:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except (FileNotFoundError, PermissionError):
        pass
    return 0


class AnonSampler:
    """Samples a child's RssAnon every ``interval`` seconds in a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.02):
        self.pid, self.interval, self.peak_kib = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, status_kib(self.pid, "RssAnon"))
            self._stop.wait(self.interval)

    def __enter__(self) -> AnonSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
