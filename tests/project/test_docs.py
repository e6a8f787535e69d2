"""Every line the README and docs/*.md tell a user to run, runs as written.

* Python: the ```python blocks of each file run in order, in ONE interpreter, each block seeing
  what the blocks above it defined (the quick start's store feeds the DataLoader and training
  blocks), in a fresh temporary directory (relative paths such as "emb.lmdb" land there). The
  environment is that of ``torchrun --nproc_per_node=1`` (RANK, WORLD_SIZE, MASTER_ADDR/PORT), so
  a block that calls ``dist.init_process_group`` runs as a job of one rank.
* Shell: every command of a ```bash block, and every inline `python ...`, `pytest ...`,
  `lmdb-embeddings ...`, `torchrun ...`, `bash ...` span, is checked as written: pytest commands
  collect (``--collect-only``), the others are run up to their argument parsing by
  tests/_support/docs_dry_run.py (the module or script imports and accepts exactly those arguments; the
  long runs themselves are exercised with small arguments by the tests named in ``EXERCISED``).
  A span that names a command without arguments (`lmdb-embeddings verify`) is checked with --help.

A block that cannot run here is marked on the line right before its fence with
``<!-- docs-test: skip (the reason) -->``; use it sparingly: the reason is shown in the test output.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import shlex
import socket
import subprocess
import sys

import pytest
from checkout import ROOT, SUPPORT, subprocess_env

DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\b(.*?)-->")
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
COMMAND_WORDS = ("python ", "python3 ", "pytest ", "bash ", "torchrun ", "lmdb-embeddings", "pip ")
PIP_EXEMPT = "installs packages from the index: tools/setup_env.sh runs them (tests/project/test_scripts.py)"

# documented commands whose real runs (with small arguments) are tests of their own
EXERCISED = {
    "bash tools/demo.sh": "tests/project/test_scripts.py::test_the_demo_reports_progress_during_the_epoch",
    "bash tools/test.sh": "CI itself (.ci/run)",
    "bash tools/setup_env.sh": "tests/project/test_scripts.py::test_setup_env_installs_only_when_something_changed",
    "examples/train_sharded.py": "tests/distributed/test_distributed_training.py::test_the_example_runs_under_torchrun",
    "benchmarks.run": "tests/project/test_benchmarks_quick.py",
}


def fenced_blocks(path: str, languages: tuple[str, ...]) -> list[tuple[int, str, str | None]]:
    """(first line, code, skip reason or None) of every fenced block in one of ``languages``."""
    lines = open(os.path.join(ROOT, path)).read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, language = match.group(1), match.group(2)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        if language in languages:
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            skip = SKIP.search(before)
            code = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1:end])
            blocks.append((i + 2, code, skip.group(1).strip(" ()") if skip else None))
        i = end + 1
    return blocks


def shell_commands(path: str) -> list[tuple[int, str, bool]]:
    """(line, command, named-only) of every shell command the file shows: the lines of ```bash blocks
    and the inline code spans that start with a command word (``named-only``: a bare mention)."""
    found = []
    for line, code, skip in fenced_blocks(path, ("bash", "sh", "shell", "console")):
        if skip is None:
            for k, text in enumerate(code.splitlines()):
                command = text.split(" #")[0].strip()
                if command and not command.startswith("#"):
                    found.append((line + k, command, False))
    text = open(os.path.join(ROOT, path)).read()
    prose = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    for match in re.finditer(r"`([^`]+)`", prose):
        command = " ".join(match.group(1).split())
        if command.startswith(COMMAND_WORDS) or command in ("pytest", "lmdb-embeddings"):
            words = shlex.split(command)
            bare = (words[0] in ("lmdb-embeddings", "python", "python3")
                    and len(words) <= (3 if words[1:2] == ["-m"] else 2))
            found.append((prose.count("\n", 0, match.start()) + 1, command, bare))
    return found


def _python_env() -> dict:
    env = subprocess_env()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    return env


RUN_BLOCKS = r"""
import json, sys, traceback
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for name, line, code in blocks:
    print(f"--- {name}:{line}", flush=True)
    try:
        exec(compile(code, f"{name}:{line}", "exec"), namespace)
    except BaseException:
        print(f"the python block at {name} line {line} failed:", file=sys.stderr)
        traceback.print_exc()
        sys.exit(1)
print("all blocks ran", flush=True)
"""


@pytest.mark.parametrize("doc", DOCS)
def test_python_blocks_run_in_order(doc, tmp_path):
    blocks = fenced_blocks(doc, ("python", "py"))
    runnable = [(doc, line, code) for line, code, skip in blocks if skip is None]
    for line, _, skip in blocks:
        if skip is not None:
            print(f"{doc}:{line}: skipped ({skip})")
    if not runnable:
        return
    (tmp_path / "blocks.json").write_text(json.dumps(runnable))
    proc = subprocess.run([sys.executable, "-c", RUN_BLOCKS, str(tmp_path / "blocks.json")], cwd=tmp_path,
                          env=_python_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "all blocks ran" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-6000:]
    ours = [line for line in proc.stderr.splitlines() if "Warning" in line and "lmdb_embeddings" in line]
    assert not ours, f"warnings of ours while the {doc} blocks ran: {ours}"


def _all_commands() -> dict[str, list[str]]:
    """command -> where the docs show it (file:line), without repeats."""
    commands: dict[tuple[str, bool], list[str]] = {}
    for doc in DOCS:
        for line, command, bare in shell_commands(doc):
            commands.setdefault((command, bare), []).append(f"{doc}:{line}")
    return commands


def _user_env() -> dict:
    """A user's shell in the repository root after `source .venv/bin/activate`: the venv's bin first on
    PATH, no PYTHONPATH (unless the package is not installed in this interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    installed = subprocess.run([sys.executable, "-c", "import lmdb_embeddings"], env=env, cwd="/",
                               capture_output=True).returncode == 0
    return env if installed else subprocess_env() | {"PATH": env["PATH"]}


def check_command(command: str, bare: bool) -> str:
    """Check one documented command as written; returns how (raises AssertionError if it does not run)."""
    words = shlex.split(command)
    env = _user_env()
    if words[0] == "pip":
        return f"not run: {PIP_EXEMPT}"
    if words[0] == "source":
        assert words[1:] == [".venv/bin/activate"], command
        return "the venv tools/setup_env.sh makes"
    if words[0] == "bash":
        script = os.path.join(ROOT, words[1])
        proc = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
        assert proc.returncode == 0 and os.path.isfile(script), proc.stderr
        return f"syntax checked; run by {EXERCISED.get(command, 'its own test')}"
    if words[0] == "pytest" or words[:3] == ["python", "-m", "pytest"]:
        pytest_args = words[1:] if words[0] == "pytest" else words[3:]
        exe = os.path.join(os.path.dirname(sys.executable), "pytest") if words[0] == "pytest" else sys.executable
        argv = [exe, *([] if words[0] == "pytest" else ["-m", "pytest"]), *pytest_args, "--collect-only", "-q",
                "-p", "no:cacheprovider"]
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command}: {proc.stdout[-3000:]}{proc.stderr[-2000:]}"
        return "collects"
    dry_run = [sys.executable, os.path.join(SUPPORT, "docs_dry_run.py")]
    proc = subprocess.run([*dry_run, *words], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode == 2 and bare:  # a command named in prose without the arguments it needs
        proc = subprocess.run([*dry_run, *words, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        how = "named without its arguments: --help runs"
    else:
        how = "parses as written"
    assert proc.returncode == 0, f"{command}: exit {proc.returncode}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    return how


def test_the_docs_show_the_commands_this_test_checks():
    commands = {command for command, _ in _all_commands()}
    assert "bash tools/demo.sh" in commands and "bash tools/test.sh" in commands
    assert "pytest -m torture" in commands
    assert any(c.startswith("python -m benchmarks.ab_order --pretouch-gb") for c in commands)


@pytest.mark.parametrize("command, bare", sorted(_all_commands()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_shell_command_runs_as_written(command, bare):
    print(f"{command}: {check_command(command, bare)} (shown at {', '.join(_all_commands()[(command, bare)])})")


def test_the_console_script_is_installed_where_the_docs_say():
    if not os.path.exists(os.path.join(os.path.dirname(sys.executable), "lmdb-embeddings")):
        pytest.skip("the package is not installed in this interpreter's environment (bash tools/setup_env.sh)")
    proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "lmdb-embeddings"), "--version"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("lmdb-embeddings "), proc.stderr



# Files of upstream CoSiR's repository that docs/MIGRATING.md and test docstrings quote: not ours.
UPSTREAM_TEST_FILES = {"tests/debug_embedding_init.py", "tests/verify_embedding_fix.py",
                       "tests/test_nocache_manager.py", "tests/test_template_embedding.py",
                       "tests/test_cosir_evaluator_corrected.py"}
# ``tests/<file>.py``, ``tests/<file>.py::name``, or ``::name`` (of the file named last); a ``[parameter]`` is
# not checked
TEST_REFERENCE = re.compile(r"(?<![\w/.])(?:(tests/[\w/]+\.py)(?:::(\w+))?|::(\w+))")
BARE_TEST_FILE = re.compile(r"(?<![\w/.])test_\w+\.py")


def _defined_names(path: str) -> set[str]:
    """Functions and classes of a test file, at top level and inside its classes."""
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def _files_naming_tests() -> list[str]:
    """The docs, and every source, script and note that may name a test file."""
    patterns = ["lmdb_embeddings/**/*.py", "benchmarks/**/*.py", "benchmarks/**/*.md", "tools/*", "examples/*.py",
                "tests/**/*.py", "tests/**/*.md", "pyproject.toml"]
    found = {os.path.relpath(p, ROOT) for pattern in patterns
             for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)}
    return sorted(set(DOCS) | {p for p in found if os.path.isfile(os.path.join(ROOT, p))})


def _wrong_test_references(doc: str) -> list[str]:
    text = open(os.path.join(ROOT, doc)).read()
    wrong, current = [], None
    for match in TEST_REFERENCE.finditer(text):
        path, name = match.group(1), match.group(2) or match.group(3)
        if path in UPSTREAM_TEST_FILES:
            current = None
            continue
        if path and not os.path.isfile(os.path.join(ROOT, path)):
            wrong.append(f"{doc}: {path} does not exist")
            current = None
            continue
        current = path or current
        if name and doc in DOCS:
            if current is None:
                wrong.append(f"{doc}: ::{name} follows no test file of ours")
            elif name not in _defined_names(current):
                wrong.append(f"{doc}: {current}::{name} is not defined there")
    if doc in DOCS:
        wrong += [f"{doc}: {m.group(0)}: name it from the repository root (tests/...)" for m in
                  BARE_TEST_FILE.finditer(text)]
    return wrong


def test_every_test_the_docs_name_exists():
    """Every ``tests/<file>.py`` named in the repository (docs, docstrings, comments) is a file, and every test
    the docs name (``tests/<file>.py::name``, then ``::name`` for the same file) is defined in it, so the map
    from promise to test in docs/GUARANTEES.md stays true when tests move or are renamed."""
    wrong = [line for doc in _files_naming_tests() for line in _wrong_test_references(doc)]
    assert not wrong, "\n".join(wrong)
