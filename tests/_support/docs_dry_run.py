"""Run a documented command only as far as its argument parsing, then stop (exit 0).

That proves the program is there, imports (``python -m benchmarks.X`` from the repository
root, a script's own imports) and accepts the arguments exactly as written, without doing its
work (a full benchmark run, hours of torture). tests/project/test_docs.py runs every shell command of
the README and docs/ through it::

    python tests/_support/docs_dry_run.py python -m benchmarks.run --suite full --rounds 3
    python tests/_support/docs_dry_run.py lmdb-embeddings info /tmp/sharded
    python tests/_support/docs_dry_run.py torchrun --nproc_per_node=2 examples/train_sharded.py --path /tmp/s

Prints ``parsed`` when the program's ``ArgumentParser.parse_args`` returned; ``--help`` (exit 0)
counts as parsed too; a usage error exits 2 with argparse's message.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys


class _Parsed(BaseException):
    """Raised once the program has parsed its arguments: nothing after that runs."""


def _as_python(words: list[str]) -> list[str]:
    """The ``python ...`` command that ``words`` runs (console scripts and torchrun unwrapped)."""
    if words[0] == "lmdb-embeddings":
        return ["python", "-m", "lmdb_embeddings", *words[1:]]
    if words[0] == "torchrun":
        from torch.distributed.run import get_args_parser  # only for torchrun lines

        launcher = get_args_parser().parse_args(words[1:])  # torchrun's own flags, as it reads them
        script = ["-m", launcher.training_script] if launcher.module else [launcher.training_script]
        return ["python", *script, *launcher.training_script_args]
    if words[0] in ("python", "python3"):
        return words
    raise SystemExit(f"docs_dry_run: cannot run {words[0]!r} (python, python3, lmdb-embeddings or torchrun)")


def main(words: list[str]) -> int:
    command = _as_python(words)
    real_parse_args = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        real_parse_args(self, args, namespace)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_args
    try:
        if command[1] == "-m":
            sys.argv = [command[2], *command[3:]]
            sys.path[0] = os.getcwd()  # as `python -m` does
            runpy.run_module(command[2], run_name="__main__", alter_sys=True)
        else:
            sys.argv = command[1:]
            sys.path[0] = os.path.dirname(os.path.abspath(command[1]))  # as `python script.py` does
            runpy.run_path(command[1], run_name="__main__")
    except _Parsed:
        print("parsed")
        return 0
    print("ran without parsing any argument")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
