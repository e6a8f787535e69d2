"""The repository's scripts as a user runs them: the examples without path hacks or warnings of their
own, the demo's epoch never silent, temporary stores removed on SIGTERM and Ctrl-C, and
tools/setup_env.sh installing only when something changed."""

from __future__ import annotations

import ast
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from checkout import ROOT, subprocess_env

EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.py")))


def _clean_env(**extra: str) -> dict:
    """The environment of a user's shell: no PYTHONPATH pointing into the checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env


def _installed() -> bool:
    proc = subprocess.run([sys.executable, "-c", "import lmdb_embeddings"], env=_clean_env(), cwd="/",
                          capture_output=True)
    return proc.returncode == 0


def test_examples_do_not_edit_sys_path():
    offenders = []
    for path in EXAMPLES:
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                offenders.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not offenders, f"sys.path edits: {offenders} (the examples run against the installed package)"


def test_train_with_store_runs_as_installed_and_warns_nothing(tmp_path):
    if not _installed():
        pytest.skip("lmdb_embeddings is not installed in this interpreter (bash tools/setup_env.sh installs it)")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_with_store.py"), "--path",
                           str(tmp_path / "s"), "--rows", "3000", "--dim", "8", "--epochs", "1", "--workers", "0",
                           "--batch-size", "256"], env=_clean_env(), cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "committed epoch 0" in proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr  # e.g. float(loss) on a tensor that requires grad


def test_the_demo_reports_progress_during_the_epoch(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "demo.py"), "--rows", "20000", "--dim", "8",
                           "--batch-size", "256", "--workers", "0"], env=subprocess_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    progress = [line for line in proc.stdout.splitlines() if "of the epoch" in line]
    assert len(progress) >= 5 and "rows/s" in progress[0], proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr


# Each makes its stores in a temporary directory and is stopped as soon as the first store's data
# file appears there (the args keep them running well beyond that); bench_memory as soon as its
# directory appears (it then creates its store: 2M rows keep it busy for seconds, so the signal
# lands inside; with 400k rows a starved CI run once finished the whole benchmark first, exit 0).
TEMP_STORE_SCRIPTS = {
    "demo": ["examples/demo.py", "--workers", "0"],
    "benchmarks.run": ["-m", "benchmarks.run", "--suite", "quick", "--no-readers", "--out", "{out}"],
    "benchmarks.targets": ["-m", "benchmarks.targets", "--rounds", "1", "--out", "{out}"],
    "benchmarks.hot_path": ["-m", "benchmarks.hot_path", "--rows", "400000", "--dim", "64"],
    "benchmarks.bench_memory": ["-m", "benchmarks.bench_memory", "--rows", "2000000"],
    "benchmarks.bench_train_step": ["-m", "benchmarks.bench_train_step", "--rows", "400000", "--dim", "64"],
    "benchmarks.bench_dump_restore": ["-m", "benchmarks.bench_dump_restore", "--rows", "400000", "--dim", "64"],
}
STOP_AT_THE_DIRECTORY = {"benchmarks.bench_memory"}


def _wait_for(tmp: str, proc: subprocess.Popen, store: bool, timeout: float = 240) -> None:
    """Until a store's data file (``store``), or anything, appears under ``tmp``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if not store and os.listdir(tmp):
            return
        if any("data.mdb" in files for _, _, files in os.walk(tmp)):
            return
        time.sleep(0.02)
    raise AssertionError(f"nothing appeared in {tmp} (exit {proc.poll()}): {proc.communicate()[1][-3000:]}")


@pytest.mark.parametrize("name, signum", [(name, signal.SIGTERM) for name in TEMP_STORE_SCRIPTS]
                         + [("demo", signal.SIGINT)], ids=lambda v: getattr(v, "name", v))
def test_a_terminated_script_removes_its_temporary_stores(tmp_path, name, signum):
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir()
    args = [a.format(out=out) for a in TEMP_STORE_SCRIPTS[name]]
    proc = subprocess.Popen([sys.executable, *args], env=subprocess_env() | {"TMPDIR": str(tmp)}, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(str(tmp), proc, store=name not in STOP_AT_THE_DIRECTORY)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = os.listdir(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    assert proc.returncode != 0 and left == [], f"exit {proc.returncode}, left behind {left}: {err[-2000:]}"


def test_benchmarks_make_their_scratch_directories_through_scratch_dir():
    """Every temporary directory of a benchmark comes from benchmarks/scratch.py (removed on SIGTERM too)."""
    offenders = []
    for path in glob.glob(os.path.join(ROOT, "benchmarks", "*.py")):
        if path.endswith("scratch.py"):
            continue
        for lineno, line in enumerate(open(path), 1):
            if "mkdtemp(" in line or "TemporaryDirectory(" in line:
                if 'prefix="bench-out-"' not in line:  # run.py's results directory of a quick run is kept
                    offenders.append(f"{os.path.relpath(path, ROOT)}:{lineno}")
    assert not offenders, offenders


def _fake_repo(tmp_path) -> tuple[str, str]:
    """A copy of setup_env.sh and pyproject.toml beside a fake .venv whose python logs what it is asked."""
    repo = tmp_path / "repo"
    (repo / "tools").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "tools", "setup_env.sh"), repo / "tools")
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), repo)
    (repo / ".venv" / "bin").mkdir(parents=True)
    log = str(tmp_path / "calls.log")
    fake = repo / ".venv" / "bin" / "python"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    return str(repo), log


def test_setup_env_installs_only_when_something_changed(tmp_path):
    repo, log = _fake_repo(tmp_path)

    def run() -> list[str]:
        if os.path.exists(log):
            os.unlink(log)
        proc = subprocess.run(["bash", os.path.join(repo, "tools", "setup_env.sh")], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        return [line for line in open(log).read().splitlines() if line.startswith("-m pip install")]

    assert len(run()) == 3  # a new .venv: pip, torch, the project
    assert run() == []  # nothing changed: nothing installed
    with open(os.path.join(repo, "pyproject.toml"), "a") as f:
        f.write("\n# a changed dependency\n")
    assert len(run()) == 3
    assert run() == []
    os.unlink(os.path.join(repo, ".venv", ".setup-stamp"))  # a .venv made some other way
    assert len(run()) == 3
