"""The command line's conventions (SPEC "Command-line tool"): --version, exit codes, dump's --force and
a dump cut short, --json everywhere, --traceback after the sub-command, help for every argument, the
``create`` sub-command, and progress bars that move."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from checkout import ROOT, run_cli, subprocess_env
from cli_helpers import assert_one_line_error, ok, read_store, stderr_on_tty
from tqdm import tqdm

import lmdb_embeddings as le
from lmdb_embeddings.cli import build_parser
from lmdb_embeddings.ops import compact as compact_module
from lmdb_embeddings.processes.environment import SharedEnv


def test_version_prints_the_library_version():
    proc = ok("--version")
    assert proc.stdout.strip() == f"lmdb-embeddings {le.__version__}"


def test_exit_codes_are_1_for_a_failed_operation_and_2_only_for_usage(tmp_path):
    missing, store = str(tmp_path / "nope"), str(tmp_path / "s")
    le.EmbeddingStore.create(store, 100, 4, chunk_rows=16).close()
    not_a_dump = tmp_path / "junk.lemb"
    not_a_dump.write_bytes(b"not a dump at all")
    for args in (("info", missing), ("verify", missing), ("compact", missing), ("dump", missing, "-"),
                 ("restore", str(not_a_dump), str(tmp_path / "r")), ("restore", missing, str(tmp_path / "r"))):
        proc = run_cli(*args)
        assert_one_line_error(proc)
        assert proc.returncode == 1, (args, proc.returncode)
    for args in (("info",), ("nosuchcommand",), ("info", store, "--no-such-flag"), ("dump", store, "x", "--format",
                                                                                      "zip")):
        proc = run_cli(*args)
        assert proc.returncode == 2 and "usage:" in proc.stderr, (args, proc.returncode, proc.stderr)
    assert sorted(os.listdir(tmp_path)) == ["junk.lemb", "s"]


def test_dump_refuses_an_existing_out_without_force(tmp_path):
    store, out, npy = str(tmp_path / "s"), tmp_path / "notes.txt", tmp_path / "npy"
    le.EmbeddingStore.create(store, 100, 4, chunk_rows=16).close()
    out.write_text("my notes")
    assert "--force" in assert_one_line_error(run_cli("dump", store, str(out)))
    assert out.read_text() == "my notes"  # untouched
    ok("dump", store, str(out), "--force")
    ok("restore", str(out), str(tmp_path / "back"))
    npy.mkdir()  # an empty directory made for an npy dump is fine ...
    ok("dump", store, str(npy), "--format", "npy")
    proc = run_cli("dump", store, str(npy), "--format", "npy")  # ... a dump there already is not
    assert proc.returncode == 1 and "--force" in assert_one_line_error(proc)
    ok("dump", store, str(npy), "--format", "npy", "--force")


def test_a_dump_to_a_pipe_closed_early_exits_non_zero(tmp_path):
    """``lmdb-embeddings dump PATH - | head -c 100``: the dump did not complete, and says so."""
    store = str(tmp_path / "s")
    le.EmbeddingStore.create(store, 20_000, 32, chunk_rows=256).close()  # 2.5 MB: far more than a pipe holds
    proc = subprocess.Popen([sys.executable, "-m", "lmdb_embeddings", "dump", store, "-"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=subprocess_env(), cwd=ROOT)
    head = proc.stdout.read(100)
    proc.stdout.close()  # as `head -c 100` does
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1 and len(head) == 100
    assert stderr.count("\n") == 1 and "broken pipe" in stderr and "Traceback" not in stderr, stderr


def test_json_on_dump_restore_compact_and_create(tmp_path):
    store, dump, back = str(tmp_path / "s"), str(tmp_path / "s.lemb"), str(tmp_path / "back")
    made = json.loads(ok("create", store, "--rows", "300", "--dim", "4", "--chunk-rows", "64", "--json").stdout)
    assert made["rows"] == 300 and made["dim"] == 4 and made["chunk_rows"] == 64
    dumped = json.loads(ok("dump", store, dump, "--json").stdout)
    assert dumped["rows"] == 300 and dumped["out"] == dump and dumped["bytes"] == os.path.getsize(dump)
    restored = json.loads(ok("restore", dump, back, "--json").stdout)
    assert restored["rows"] == 300 and restored["path"] == back and restored["replaced"] is False
    compacted = json.loads(ok("compact", back, "--json").stdout)
    assert {"bytes_before", "bytes_after", "compacted"} <= set(compacted)


def test_global_flags_are_accepted_after_the_sub_command(tmp_path):
    store = str(tmp_path / "s")
    le.EmbeddingStore.create(store, 10, 4).close()
    assert "rows:" in ok("info", store, "--traceback").stdout
    assert ok("dump", store, str(tmp_path / "d.lemb"), "--quiet", "--traceback").stdout == ""
    args = build_parser().parse_args(["info", store, "--traceback"])
    assert args.traceback is True
    assert build_parser().parse_args(["--traceback", "info", store]).traceback is True


def test_every_argument_has_help_text():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {action.dest}" for name, sub in subparsers.choices.items() for action in sub._actions
               if action.help in (None, "") and not isinstance(action, argparse._HelpAction)]
    assert not missing, f"arguments without help: {missing}"


def test_create_from_rows_dim_init(tmp_path):
    store = str(tmp_path / "s")
    ok("create", store, "--rows", "1000", "--dim", "8", "--init", "zeros", "--chunk-rows", "128")
    with le.EmbeddingStore.open(store, readonly=True) as s:
        assert len(s) == 1000 and s.dim == 8 and s.chunk_rows == 128 and not s.get(s.ids).any()
    ok("create", str(tmp_path / "n"), "--rows", "50", "--dim", "3", "--seed", "7")
    expected = le.EmbeddingStore.create(str(tmp_path / "py"), 50, 3, seed=7)
    try:
        assert np.array_equal(read_store(str(tmp_path / "n"))["rows"], expected.get(np.arange(50)))
    finally:
        expected.close()
    proc = run_cli("create", store, "--rows", "10", "--dim", "8")  # an existing store needs --force
    assert proc.returncode == 1 and "--force" in assert_one_line_error(proc)
    ok("create", store, "--rows", "10", "--dim", "8", "--force")
    assert read_store(store)["ids"].tolist() == list(range(10))


def test_create_from_an_npy_file_with_ids(tmp_path):
    rows = np.random.default_rng(3).standard_normal((700, 5)).astype(np.float32)
    ids = np.random.default_rng(4).permutation(np.arange(-350, 350, dtype=np.int64) * 11)
    np.save(tmp_path / "rows.npy", rows)
    np.save(tmp_path / "ids.npy", ids)
    store = str(tmp_path / "s")
    ok("create", store, "--from-npy", str(tmp_path / "rows.npy"), "--ids", str(tmp_path / "ids.npy"))
    got = read_store(store)
    assert np.array_equal(got["ids"], ids) and np.array_equal(got["rows"], rows)
    ok("create", str(tmp_path / "ids_only"), "--ids", str(tmp_path / "ids.npy"), "--dim", "2", "--init", "zeros")
    assert np.array_equal(read_store(str(tmp_path / "ids_only"))["ids"], ids)


@pytest.mark.parametrize("args, rc, needle", [
    (("--rows", "10"), 2, "--dim"),
    ((), 2, "--from-npy"),
    (("--rows", "10", "--ids", "IDS", "--dim", "2"), 2, "--ids"),
    (("--from-npy", "ROWS", "--dim", "2"), 2, "--from-npy"),
    (("--from-npy", "JUNK"), 1, "not an .npy file"),
    (("--from-npy", "IDS"), 1, "shape (rows, dim)"),
    (("--from-npy", "MISSING"), 1, "No such file"),
    (("--from-npy", "ROWS", "--ids", "IDS"), 1, "shape"),  # 3 rows, 4 IDs
    (("--rows", "10", "--dim", "2", "--dtype", "int8"), 2, "--dtype"),
])
def test_create_usage_and_input_errors(tmp_path, args, rc, needle):
    np.save(tmp_path / "rows.npy", np.zeros((3, 2), np.float32))
    np.save(tmp_path / "ids.npy", np.arange(4))
    (tmp_path / "junk.npy").write_text("hello")
    names = {"ROWS": "rows.npy", "IDS": "ids.npy", "JUNK": "junk.npy", "MISSING": "missing.npy"}
    proc = run_cli("create", str(tmp_path / "s"), *[str(tmp_path / names[a]) if a in names else a for a in args])
    assert proc.returncode == rc, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    if rc == 1:
        assert_one_line_error(proc)
    assert not (tmp_path / "s").exists()


def test_create_shows_progress_in_python_and_on_a_terminal(tmp_path, capsys):
    le.EmbeddingStore.create(str(tmp_path / "quiet"), 5000, 4).close()
    assert capsys.readouterr().err == ""
    le.EmbeddingStore.create(str(tmp_path / "bar"), 5000, 4, chunk_rows=100, progress=True).close()
    err = capsys.readouterr().err
    assert "create:" in err and "/5.00k" in err and "rows/s" in err, err
    on_tty = stderr_on_tty("create", str(tmp_path / "cli"), "--rows", "200000", "--dim", "4")
    assert "create:" in on_tty and "/200k" in on_tty, on_tty
    assert stderr_on_tty("create", str(tmp_path / "q"), "--rows", "200000", "--dim", "4", "-q") == ""


def test_compact_bar_advances_while_the_copy_runs(tmp_path, monkeypatch):
    """The bar follows the copy's bytes (it used to be one step, 0/1 until the copy had ended)."""
    path = str(tmp_path / "s")
    with le.EmbeddingStore.create(path, 20_000, 32, chunk_rows=256) as store:
        for value in (1.0, 2.0):  # free pages to compact away
            store.put(store.ids, np.full((len(store), 32), value, np.float32))
            store.commit()
    bars: list[tqdm] = []

    def recording_bar(total, desc, enabled, unit="B"):
        bars.append(tqdm(total=total, desc=desc, file=io.StringIO(), disable=not enabled, mininterval=0))
        return bars[-1]

    seen_while_copying = []
    real_copy = SharedEnv.copy_compacted

    def copy_then_wait_for_the_bar(self, target):
        real_copy(self, target)
        deadline = time.monotonic() + 30  # the copy thread is still running: the bar must move now
        while time.monotonic() < deadline and not (bars and bars[0].n > 0):
            time.sleep(0.02)
        seen_while_copying.append(bars[0].n if bars else None)

    monkeypatch.setattr(compact_module, "bar", recording_bar)
    monkeypatch.setattr(SharedEnv, "copy_compacted", copy_then_wait_for_the_bar)
    result = le.compact_store(path, progress=True)
    assert result["compacted"]
    assert bars[0].desc == "compact" and bars[0].total > 20_000 * 32 * 4
    assert seen_while_copying and seen_while_copying[0] and seen_while_copying[0] > 0, seen_while_copying
    assert bars[0].n == bars[0].total
