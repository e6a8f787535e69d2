"""The ``lmdb-embeddings`` command-line tool.

Each sub-command lives in a function ``cmd_<name>``; errors the user can fix print one
line to stderr and exit 2, failed checks exit 1, never a traceback for bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import EmbeddingStoreError

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(path=args.path, rows=args.rows, dim=args.dim, batch_size=args.batch_size,
             workers=args.workers, epochs=args.epochs, keep=args.keep)
    return EXIT_OK


def cmd_import_cosir(args: argparse.Namespace) -> int:
    from .cosir_import import import_cosir

    summary = import_cosir(args.dir, args.path, progress=not args.quiet and sys.stderr.isatty(), overwrite=args.force)
    print(f"imported {summary['rows']} rows x {summary['dim']} ({summary['dtype']}) from {summary['files']} "
          f"chunk files into {summary['path']}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmdb-embeddings",
                                     description="Inspect, dump, restore and verify lmdb_embeddings stores.")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser("demo", help="train one epoch against a 1M x 64 store with 2 DataLoader workers")
    demo.add_argument("--path", default=None, help="store directory (default: a new temporary directory)")
    demo.add_argument("--rows", type=int, default=1_000_000)
    demo.add_argument("--dim", type=int, default=64)
    demo.add_argument("--batch-size", type=int, default=1024)
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--epochs", type=int, default=1)
    demo.add_argument("--keep", action="store_true", help="keep the store directory afterwards")
    demo.set_defaults(func=cmd_demo)

    p = sub.add_parser("import-cosir", help="convert a directory of original embeddings_chunk_*.pt files")
    p.add_argument("dir", help="directory holding embeddings_chunk_<i>.pt files")
    p.add_argument("path", help="store directory to create")
    p.add_argument("--force", action="store_true", help="replace an existing store at PATH")
    p.set_defaults(func=cmd_import_cosir)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (EmbeddingStoreError, OSError) as exc:
        print(f"lmdb-embeddings {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"lmdb-embeddings {args.command}: interrupted", file=sys.stderr)
        return 130
