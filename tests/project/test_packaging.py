"""The package as a user installs and types it: public names, types, the license, the sdist, and the
optional dependencies (torch, pytest) reported by name when they are missing."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap

import pytest
from checkout import FIXTURES, ROOT, run_python, subprocess_env
from cli_helpers import assert_one_line_error

import lmdb_embeddings as le

TYPED_SCRIPT = os.path.join(FIXTURES, "typed_user_script.py")
TORCH_HINT = "needs torch: pip install torch==2.13.0"


def test_every_public_name_resolves():
    missing = [name for name in le.__all__ if not hasattr(le, name)]
    assert not missing, f"in __all__ but not importable: {missing}"
    assert len(set(le.__all__)) == len(le.__all__)
    for name in le.__all__:  # the lazily imported ones too, each from the module that defines it
        value = getattr(le, name)
        assert value is not None, name
        if isinstance(value, type) and issubclass(value, BaseException):
            assert issubclass(value, le.EmbeddingStoreError), f"{name} is not an EmbeddingStoreError"


@pytest.fixture(scope="module")
def installed_python(tmp_path_factory):
    """An interpreter that sees the package as INSTALLED (site-packages, py.typed), as a user's does,
    with this environment's numpy and torch beside it. Type checkers check what a user's script
    does with the package, not the package's own source."""
    home = tmp_path_factory.mktemp("installed")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(home / "venv")], check=True, timeout=120)
    python = str(home / "venv" / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (home / "pkg").mkdir()
    os.symlink(os.path.join(ROOT, "lmdb_embeddings"), home / "pkg" / "lmdb_embeddings")
    with open(os.path.join(site, "lmdb_embeddings_under_test.pth"), "w") as f:
        f.write(f"{home / 'pkg'}\n{sysconfig.get_paths()['purelib']}\n")
    shutil.copy(TYPED_SCRIPT, home / "user_script.py")
    return home, python


def test_mypy_strict_finds_no_error_in_a_user_script(installed_python):
    home, python = installed_python
    proc = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--python-executable", python,
                           "--cache-dir", str(home / ".mypy_cache"), "user_script.py"],
                          capture_output=True, text=True, cwd=home, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_pyright_strict_finds_no_error_in_a_user_script(installed_python):
    pytest.importorskip("pyright", reason="pyright is not installed (pip install 'pyright[nodejs]')")
    home, python = installed_python
    (home / "pyrightconfig.json").write_text('{"typeCheckingMode": "strict", "include": ["user_script.py"]}')
    proc = subprocess.run([sys.executable, "-m", "pyright", "--pythonpath", python, "user_script.py"],
                          capture_output=True, text=True, cwd=home, timeout=1200)
    assert proc.returncode == 0 and "0 errors" in proc.stdout, proc.stdout + proc.stderr


def test_the_typed_user_script_runs(installed_python):
    home, python = installed_python
    proc = subprocess.run([python, "user_script.py"], capture_output=True, text=True, cwd=home, timeout=300)
    assert proc.returncode == 0 and "typed user script ok" in proc.stdout, proc.stdout + proc.stderr


def test_the_license_is_the_mit_license_pyproject_declares():
    text = open(os.path.join(ROOT, "LICENSE")).read()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text
    assert 'license = "MIT"' in open(os.path.join(ROOT, "pyproject.toml")).read()


def test_the_sdist_ships_the_license_and_no_half_test_suite(tmp_path):
    """Tests without their conftest, helpers and data cannot run: the sdist ships none of them."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True)
    if files.returncode != 0:
        pytest.skip("not a git checkout")
    tree = tmp_path / "tree"
    for name in files.stdout.splitlines():
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(tree / os.path.dirname(name), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), tree / name)
    build = "from setuptools import build_meta; import sys; print(build_meta.build_sdist(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", build, str(tmp_path / "dist")], cwd=tree, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with tarfile.open(tmp_path / "dist" / proc.stdout.strip().splitlines()[-1]) as sdist:
        names = [name.split("/", 1)[1] for name in sdist.getnames() if "/" in name]
    assert "LICENSE" in names and "README.md" in names and "lmdb_embeddings/py.typed" in names
    assert "lmdb_embeddings/cli/commands.py" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "tools/", "examples/"))], names


BLOCK = "import sys\nfor name in {names!r}:\n    sys.modules[name] = None  # as if it were not installed\n"


def _without(*packages: str, code: str, check: bool = False):
    return run_python(BLOCK.format(names=list(packages)) + textwrap.dedent(code), check=check)


def test_without_torch_the_tensor_api_says_to_install_it(tmp_path):
    store = str(tmp_path / "s")
    le.EmbeddingStore.create(store, 10, 4).close()
    proc = _without("torch", code=f"""
        import lmdb_embeddings as le
        store = le.EmbeddingStore.open({store!r})
        assert store.get([1]).shape == (1, 4)  # the core works
        for call in (lambda: store.get_tensor([1]), lambda: le.EmbeddingDataset(store),
                     lambda: le.TrainableEmbeddingManager):
            try:
                call()
            except le.MissingDependencyError as exc:
                assert isinstance(exc, ImportError) and {TORCH_HINT!r} in str(exc), exc
                print("refused:", exc)
            else:
                raise AssertionError("no error without torch")
        store.close()
        """, check=True)
    assert proc.stdout.count("refused:") == 3, proc.stdout
    assert "lmdb_embeddings.EmbeddingDataset needs torch" in proc.stdout and "get_tensor needs torch" in proc.stdout


@pytest.mark.parametrize("command", ["import-cosir", "export-cosir"])
def test_without_torch_the_cosir_commands_say_to_install_it(tmp_path, command):
    store, files = str(tmp_path / "s"), str(tmp_path / "pt")
    le.EmbeddingStore.create(store, 10, 4).close()
    args = [files, str(tmp_path / "new")] if command == "import-cosir" else [store, files]
    proc = _without("torch", code=f"""
        from lmdb_embeddings.cli import main
        raise SystemExit(main({[command, *args]!r}))
        """)
    line = assert_one_line_error(proc, f"{command} needs torch: pip install torch==2.13.0")
    assert proc.returncode == 1 and "unexpected" not in line


def test_testing_says_it_needs_pytest():
    proc = _without("pytest", code="""
        import lmdb_embeddings as le
        try:
            import lmdb_embeddings.testing
        except le.MissingDependencyError as exc:
            assert isinstance(exc, ImportError)
            print(exc)
        """, check=True)
    assert "lmdb_embeddings.testing needs pytest: pip install pytest" in proc.stdout, proc.stdout
    assert importlib.import_module("lmdb_embeddings.testing").StoreContract  # with pytest: there


def test_the_test_extra_lists_the_type_checkers():
    pyproject = open(os.path.join(ROOT, "pyproject.toml")).read()
    test_extra = next(line for line in pyproject.splitlines() if line.startswith("test = ["))
    assert '"mypy' in test_extra and '"pyright[nodejs]' in test_extra
    assert subprocess.run([sys.executable, "-m", "mypy", "--version"], capture_output=True,
                          env=subprocess_env()).returncode == 0
