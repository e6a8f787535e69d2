"""The house rules of the package layout (docs/ARCHITECTURE.md), checked on the source itself.

No import cycle between modules; imports at module top level (the only exception: ``torch``,
imported where the tensor API needs it, so the core and the CLI start without it); no class
over 400 lines and no module over 700; ``format/`` never imports the store; the core, the
formats, the processes and the ops never import torch; every exception class lives in ``errors.py``;
folders import only downwards, in the order of ``LAYERS``; tests/ mirrors the package, helpers in tests/_support/.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import subprocess
import sys

import pytest

PACKAGE = "lmdb_embeddings"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), PACKAGE)
MAX_CLASS_LINES, MAX_MODULE_LINES = 400, 700
TORCH_FREE = ("inputs", "core", "format", "processes", "sharding", "ops", "cli")

# The folders (and top-level modules) from the bottom up: a module imports only from its own layer or
# the ones below it. ``sharding`` (a sharded store's directory, no torch) lies under the store and ops, so
# one ops function per verb serves plain and sharded stores; ``torch``, ``compat``, ``distributed`` and
# ``testing`` extend the store above ops.
LAYERS = (
    ("errors, options", ("errors", "options", "inputs", "results", "optional", "fsutil", "progress", "version")),
    ("format", ("format",)),
    ("processes", ("processes",)),
    ("core", ("core",)),
    ("sharding", ("sharding",)),
    ("store", ("store", "store_base", "store_metadata", "store_reads", "store_writes", "handle")),
    ("ops", ("ops",)),
    ("extensions", ("torch", "compat", "distributed", "testing")),
    ("cli", ("cli", "__main__")),
)


def _modules() -> dict[str, str]:
    """Dotted module name -> path, for every module of the package."""
    found = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found[".".join(rel)] = path
    return found


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: str, modules: dict) -> tuple[set[str], list[tuple[int, str]]]:
    """(package modules imported at top level, [(line, name)] of imports inside functions)."""
    tree = ast.parse(open(path).read())
    is_package = path.endswith("__init__.py")
    top, nested = set(), []

    def targets(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        base = _resolve(module, is_package, node)
        names = [f"{base}.{alias.name}" for alias in node.names]
        return [n if n in modules else base for n in names]

    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            top.update(t for t in targets(node) if t.split(".")[0] == PACKAGE)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    nested.extend((inner.lineno, t) for t in targets(inner))
    return top, nested


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        top, _ = _imports(module, path, modules)
        deps = set()
        for target in top:  # importing a.b.c runs a/__init__ and a/b/__init__ too
            parts = target.split(".")
            deps.update(".".join(parts[:i]) for i in range(2, len(parts) + 1) if ".".join(parts[:i]) in modules)
        own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
        graph[module] = deps - own_packages  # a module's own packages are being imported already
    return graph


def test_no_import_cycle_between_modules():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_imports_are_at_module_top_level_except_torch():
    modules = _modules()
    offenders = []
    for module, path in modules.items():
        for line, target in _imports(module, path, modules)[1]:
            if target.split(".")[0] != "torch":
                offenders.append(f"{path}:{line} imports {target} inside a function")
    assert not offenders, "\n".join(offenders)


def test_no_class_over_400_lines_and_no_module_over_700():
    too_long = []
    for path in _modules().values():
        source = open(path).read()
        if source.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{path}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                too_long.append(f"{path}: class {node.name} has {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, "\n".join(too_long)


def test_format_never_imports_the_store_and_the_core_never_imports_torch():
    graph = _graph()
    modules = _modules()
    for module, deps in graph.items():
        if module.startswith(f"{PACKAGE}.format"):
            assert not any(d == f"{PACKAGE}.store" or d.startswith(f"{PACKAGE}.core.") and d.endswith(
                ("writes", "readers", "session", "table")) for d in deps), (module, deps)
    for module, path in modules.items():
        if module.split(".")[1:2] and module.split(".")[1] in TORCH_FREE:
            top, _ = _imports(module, path, modules)
            source = open(path).read()
            assert "\nimport torch" not in source and "\nfrom torch" not in source, module


@pytest.mark.parametrize("command", [
    "import lmdb_embeddings",
    "import lmdb_embeddings.cli; lmdb_embeddings.cli.build_parser()",
    "import lmdb_embeddings.ops",
])
def test_the_core_and_the_cli_start_without_torch(command):
    code = f"import sys; {command}; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(ROOT))
    assert proc.returncode == 0, proc.stderr


def _exception_classes_outside_errors() -> list[str]:
    """Every class of the package that derives from ``BaseException``, outside ``errors.py``.

    Decided from the source: a class is an exception if one of its bases (by its last dotted name) is a
    builtin exception or a class already found to be one, repeated until nothing changes.
    """
    exceptions = {name for name, value in vars(builtins).items()
                  if isinstance(value, type) and issubclass(value, BaseException)}
    classes = []  # (path, line, name, base names)
    for path in _modules().values():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b).split(".")[-1] for b in node.bases]
                classes.append((path, node.lineno, node.name, bases))
    found: set[tuple[str, int]] = set()
    while True:
        new = {(path, line) for path, line, name, bases in classes
               if (path, line) not in found and any(b in exceptions for b in bases)}
        if not new:
            break
        found |= new
        exceptions |= {name for path, line, name, _ in classes if (path, line) in new}
    errors_py = os.path.join(ROOT, "errors.py")
    return sorted(f"{path}:{line} class {name}" for path, line, name, _ in classes
                  if (path, line) in found and path != errors_py)


def test_every_exception_class_is_in_errors_py():
    offenders = _exception_classes_outside_errors()
    assert not offenders, "exception classes outside lmdb_embeddings/errors.py (move them there):\n" + "\n".join(
        offenders)


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package's __init__ re-exports the public surface from every layer
    for rank, (_, members) in enumerate(LAYERS):
        if parts[1] in members:
            return rank
    raise AssertionError(f"{module} is in no layer of tests/project/test_layout.py LAYERS: place it there")


def test_folders_import_only_downwards():
    graph = _graph()
    upwards = []
    for module, deps in sorted(graph.items()):
        rank = _layer(module)
        if rank is None:
            continue
        # importing a.b.c also runs the package a.b: judge the module imported, not its package
        named = {d for d in deps if not any(other.startswith(d + ".") for other in deps)}
        for dep in sorted(named):
            dep_rank = _layer(dep)
            if dep_rank is None or dep_rank <= rank:
                continue
            upwards.append(f"{module} ({LAYERS[rank][0]}) imports {dep} ({LAYERS[dep_rank][0]})")
    assert not upwards, ("imports against the folder order (errors/options -> format -> processes -> core -> "
                         "sharding -> store -> ops -> extensions -> cli):\n" + "\n".join(upwards))


TESTS = os.path.join(os.path.dirname(ROOT), "tests")
# Test folders that mirror no package folder: ``store`` (the facade: the package's top-level modules),
# ``project`` (this file, the docs, packaging, scripts, benchmarks) and ``torture`` (tools/torture.py runs it).
TEST_FOLDERS_OF_THEIR_OWN = ("store", "project", "torture")
SUPPORT, FIXTURES = "_support", "data"  # helpers and child scripts; files the tests read


def _tracked_test_tree() -> list[str]:
    """Paths under tests/ that the repository holds (git's list; every file there outside a git checkout):
    files dropped in beside them (acceptance tests, say) are not the repository's to arrange."""
    proc = subprocess.run(["git", "ls-files", "-z", "--", "tests"], cwd=os.path.dirname(ROOT), capture_output=True)
    if proc.returncode == 0 and proc.stdout:
        return [os.path.relpath(p, "tests") for p in proc.stdout.decode().split("\0") if p]
    return [os.path.relpath(os.path.join(folder, name), TESTS) for folder, _, files in os.walk(TESTS) for name in files]


def test_tests_mirror_the_package_and_helpers_live_in_support():
    """tests/core/ tests lmdb_embeddings/core/, and so on: every test file sits in a folder mirroring a package
    folder (or one of TEST_FOLDERS_OF_THEIR_OWN); everything else only in tests/_support/ (and tests/conftest.py)
    or, as data, in tests/data/. Pytest runs in importlib mode (pyproject.toml), so no test file is put on
    ``sys.path``: two may share a name, and a test never imports another (shared code lives in _support)."""
    package_folders = {os.path.relpath(folder, ROOT) for folder, _, files in os.walk(ROOT) if "__init__.py" in files}
    allowed = (package_folders - {"."}) | set(TEST_FOLDERS_OF_THEIR_OWN)
    misplaced = []
    for path in sorted(_tracked_test_tree()):
        where, name = os.path.split(path)
        if where.split(os.sep)[0] in (SUPPORT, FIXTURES) or "__pycache__" in path.split(os.sep):
            continue
        if name.startswith("test_") and name.endswith(".py"):
            if where not in allowed:
                misplaced.append(f"tests/{path}: move it to tests/<the package folder it tests>/ "
                                 f"(one of {sorted(allowed)})")
            source = open(os.path.join(TESTS, path), encoding="utf-8").read()
            if re.search(r"^\s*(from|import) test_\w+", source, re.M):
                misplaced.append(f"tests/{path}: imports another test file: move what they share to tests/{SUPPORT}/")
        elif path != "conftest.py" and not name.endswith(".pyc"):
            misplaced.append(f"tests/{path}: not a test file: helpers go in tests/{SUPPORT}/, "
                             f"data in tests/{FIXTURES}/")
    assert not misplaced, "\n".join(misplaced)
