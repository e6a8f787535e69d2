"""The sub-commands of ``lmdb-embeddings``: parse, call the library function, print.

Each sub-command lives in a function ``cmd_<name>`` that prints the result; the work is
done by ``lmdb_embeddings.ops`` (and ``compat.files`` for the CoSiR import/export). Exit
codes: 0 ok; 1 a failed operation or bad input (a missing store, a corrupt or truncated
dump, damage found by verify, an output that could not be written completely); 2 usage
errors only (what argparse rejects). Errors print ONE line to stderr, never a traceback;
``--traceback`` (before or after the sub-command) shows it for unexpected errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np

from ..errors import EmbeddingStoreError, InvalidInputError, StoreExistsError, one_line
from ..format.init import INIT_KINDS
from ..inputs import SUPPORTED_DTYPES
from ..ops import compact_store, dump_store, restore_store, store_info, verify_store
from ..optional import import_needing
from ..processes.staging import check_replace_target
from ..store import EmbeddingStore
from ..version import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
NPY_MAGIC = b"\x93NUMPY"
STORE = "store directory (or a sharded store's directory)"
STORE_TO_CREATE = "store directory to create (must not exist, or be empty, unless --force)"
QUIET_HELP = "no progress bars and no summary lines"
TRACEBACK_HELP = "show the traceback of unexpected errors"


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=1, sort_keys=True, default=str))


def progress_wanted(quiet: bool) -> bool:
    """A bar is shown only on a terminal and without ``--quiet``."""
    return not quiet and sys.stderr.isatty()


def cmd_create(args: argparse.Namespace) -> int:
    check_replace_target(os.path.abspath(args.path), args.force, "pass --force")  # before reading any input
    ids = _load_npy(args.ids, "--ids") if args.ids else None
    if args.from_npy:
        init = _load_npy(args.from_npy, "--from-npy")
        if init.ndim != 2:
            raise InvalidInputError(f"--from-npy {args.from_npy}: an array of shape (rows, dim) is needed, "
                                    f"got shape {init.shape}")
        rows, dim = init.shape
    else:
        init, rows, dim = args.init or "normal", args.rows, args.dim
    store = EmbeddingStore.create(args.path, rows if ids is None else ids, dim, dtype=args.dtype,
                                  chunk_rows=args.chunk_rows, init=init, seed=args.seed, overwrite=args.force,
                                  progress=progress_wanted(args.quiet))
    result = {"path": store.path, "rows": len(store), "dim": store.dim, "dtype": store.dtype.name,
              "chunk_rows": store.chunk_rows, "init": "array" if args.from_npy else init}
    store.close()
    if args.json:
        _print_json(result)
    elif not args.quiet:
        print(f"created {result['path']}: {result['rows']} x {result['dim']} {result['dtype']} "
              f"({result['init']}, {result['chunk_rows']} rows per chunk)")
    return EXIT_OK


def _create_usage_problem(args: argparse.Namespace) -> str | None:
    """What argparse cannot say about ``create``'s flags alone (a usage error, exit 2)."""
    if not (args.from_npy or args.rows or args.ids):
        return "give the rows: --from-npy FILE, or --rows N (or --ids FILE) with --dim D"
    if args.rows and args.ids:
        return "--rows and --ids both give the rows; --ids alone gives len(ids) rows"
    if args.from_npy and (args.dim is not None or args.init is not None):
        return "--dim and --init go with --rows or --ids; --from-npy gives the rows and their width"
    if not args.from_npy and args.dim is None:
        return "--dim D is needed with --rows or --ids"
    return None


def _load_npy(path: str, flag: str) -> np.ndarray:
    """An .npy file, memory-mapped (its rows are read a chunk at a time), or a clear error."""
    with open(path, "rb") as f:
        if f.read(len(NPY_MAGIC)) != NPY_MAGIC:
            raise InvalidInputError(f"{flag} {path}: not an .npy file (save the array with numpy.save)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError) as exc:  # truncated, or an object array
        raise InvalidInputError(f"{flag} {path}: not a readable .npy array ({one_line(exc)})") from None


def cmd_info(args: argparse.Namespace) -> int:
    info = store_info(args.path)
    if args.json:
        _print_json(info)
        return EXIT_OK
    lm = info["lmdb"]
    writer = f"yes (pid {info['writer_pid']})" if info["writer_active"] else "no"
    lines = [
        f"path:            {info['path']}",
        f"rows:            {info['rows']}",
        f"dim:             {info['dim']}",
        f"dtype:           {info['dtype']}",
        f"chunk_rows:      {info['chunk_rows']}",
        f"chunks:          {info['chunks']}",
        f"columns:         {', '.join(info['columns']) or '(embeddings only)'}",
        f"format version:  {info['format_version']}",
        f"commits:         {info['commit_count']}",
        f"last commit:     {info['last_commit']}",
        f"bytes on disk:   {info['bytes_on_disk']} ({_human_bytes(info['bytes_on_disk'])})",
        f"lmdb pages:      {lm['pages_in_use']} in use, {lm['free_pages']} free, {lm['page_size']} bytes each",
        f"lmdb map size:   {lm['map_size']} ({_human_bytes(lm['map_size'])})",
        f"writer active:   {writer}",
    ]
    if "sharded" in info:  # a sharded store: the figures above are summed over its shards
        lines.append(f"shards:          {info['sharded']['world_size']} (rows per shard: "
                     f"{', '.join(str(s['rows']) for s in info['sharded']['shards'])})")
    print("\n".join(lines))
    return EXIT_OK


def cmd_dump(args: argparse.Namespace) -> int:
    _refuse_existing_out(args.out, args.format, args.force)
    result = dump_store(args.path, args.out, fmt=args.format, progress=progress_wanted(args.quiet))
    if args.json and args.out != "-":
        _print_json(result)
    elif not args.quiet:  # with OUT '-' the dump itself is on stdout: the summary goes to stderr
        print(f"dumped {result['rows']} rows ({', '.join(result['columns'])}) of commit {result['commit']} "
              f"to {result['out']} ({_human_bytes(result['bytes'])}, {result['seconds']:.2f} s)",
              file=sys.stderr if args.out == "-" else sys.stdout)
    return EXIT_OK


def _refuse_existing_out(out: str, fmt: str, force: bool) -> None:
    """``dump`` never replaces an existing OUT (a file, or a non-empty directory for npy) without --force."""
    if force or out == "-" or not os.path.lexists(out):
        return
    if fmt == "npy" and os.path.isdir(out) and not os.path.islink(out) and not os.listdir(out):
        return  # an empty directory made for the dump
    raise StoreExistsError(f"{out} already exists; pass --force to replace it")


def cmd_restore(args: argparse.Namespace) -> int:
    fmt = None if args.format == "auto" else args.format
    result = restore_store(args.input, args.path, shards=args.shards, force=args.force, fmt=fmt,
                           chunk_rows=args.chunk_rows, progress=progress_wanted(args.quiet))
    if args.json:
        _print_json(result)
    elif not args.quiet:
        action = "replaced" if result["replaced"] else "created"
        sharded = f", sharded for {result['shards']} ranks" if args.shards else ""
        print(f"{action} {result['path']}: {result['rows']} x {result['dim']} {result['dtype']} "
              f"({', '.join(result['columns'])}{sharded}) from {result['source']} in {result['seconds']:.2f} s")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    report = verify_store(args.path, progress=progress_wanted(args.quiet))
    if args.json:
        _print_json(report.as_dict())
    elif report.ok:
        print(f"OK: {report['path']}: {report['chunks_checked']} chunks of {report['rows']} rows "
              f"({', '.join(report['columns'])}) are sound")
    else:
        more = report.get("problems_not_listed", 0)
        print(f"FAILED: {report['path']}: {len(report['problems']) + more} problem(s); bad chunks: "
              f"{', '.join(map(str, report['bad_chunks'])) or 'none (metadata/ids)'}{', ...' if more else ''}")
        for p in report["problems"]:
            chunk = f"chunk {p['chunk']}: " if p["chunk"] is not None else ""
            print(f"  {p['part']}: {chunk}{p['error']}")
        if more:
            print(f"  ... and {more} more problem(s), not listed")
    return EXIT_OK if report["ok"] else EXIT_FAILED


def cmd_compact(args: argparse.Namespace) -> int:
    result = compact_store(args.path, progress=progress_wanted(args.quiet))
    if args.json:
        _print_json(result)
    elif not args.quiet:
        if result["compacted"]:
            print(f"compacted {result['path']}: {_human_bytes(result['bytes_before'])} -> "
                  f"{_human_bytes(result['bytes_after'])}")
        else:
            print(f"{result['path']} is already compact ({_human_bytes(result['bytes_before'])}); left unchanged")
    return EXIT_OK


def cmd_import_cosir(args: argparse.Namespace) -> int:
    # the .pt reader needs torch, which the rest of the CLI never imports: load it only for this command
    import_cosir = import_needing("lmdb_embeddings.compat.files", "torch", "import-cosir").import_cosir
    result = import_cosir(args.dir, args.path, progress=progress_wanted(args.quiet), overwrite=args.force,
                          chunk_rows=args.chunk_rows)
    if not args.quiet:
        print(f"imported {result['rows']} rows x {result['dim']} ({result['dtype']}) from {result['files']} "
              f"chunk files into {result['path']}")
    return EXIT_OK


def cmd_export_cosir(args: argparse.Namespace) -> int:
    # the .pt writer needs torch, which the rest of the CLI never imports: load it only for this command
    export_cosir = import_needing("lmdb_embeddings.compat.files", "torch", "export-cosir").export_cosir
    result = export_cosir(args.path, args.dir, overwrite=args.force, progress=progress_wanted(args.quiet))
    if not args.quiet:
        print(f"exported {result['rows']} rows x {result['dim']} ({result['dtype']}) of commit {result['commit']} "
              f"into {result['files']} chunk files of {result['chunk_rows']} rows in {result['path']}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmdb-embeddings",
                                     description="Create, inspect, dump, restore and verify lmdb_embeddings stores.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--quiet", "-q", action="store_true", help=QUIET_HELP)
    parser.add_argument("--traceback", action="store_true", help=TRACEBACK_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        # the global flags are accepted after the sub-command too (SUPPRESS: one given before is kept)
        p.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
        p.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS, help=TRACEBACK_HELP)
        p.set_defaults(func=func, parser=p)
        return p

    def json_flag(p: argparse.ArgumentParser, what: str = "the result") -> None:
        p.add_argument("--json", action="store_true", help=f"print {what} as one JSON object")

    create = command("create", cmd_create, "create a new store: from an .npy file of rows, or N rows initialised")
    create.set_defaults(usage_problem=_create_usage_problem)
    create.add_argument("path", metavar="PATH", help=STORE_TO_CREATE)
    source = create.add_mutually_exclusive_group()
    source.add_argument("--from-npy", metavar="FILE", help="an .npy file of shape (rows, dim): the initial rows")
    source.add_argument("--rows", type=_positive_int, metavar="N", help="N rows, IDs 0..N-1")
    create.add_argument("--dim", type=_positive_int, metavar="D", help="row width (with --rows or --ids)")
    create.add_argument("--init", choices=INIT_KINDS, default=None, help="initial values (with --rows or --ids; "
                        "default normal: N(0, 0.01^2))")
    create.add_argument("--ids", metavar="FILE", help="an .npy file of unique int64 sample IDs, one per row "
                        "(default: 0..N-1)")
    create.add_argument("--dtype", choices=SUPPORTED_DTYPES, default="float32", help="default float32")
    create.add_argument("--chunk-rows", type=_positive_int, default=None,
                        help="row slots per chunk (default: chosen from dim and dtype, as create(chunk_rows=None))")
    create.add_argument("--seed", type=int, default=0, help="seed of the initial values (default 0)")
    create.add_argument("--force", action="store_true", help="replace an existing store at PATH (atomically)")
    json_flag(create)

    info = command("info", cmd_info, "describe a store: rows, dim, dtype, chunks, disk use, last commit, writer")
    info.add_argument("path", metavar="PATH", help=STORE)
    json_flag(info)

    dump = command("dump", cmd_dump, "write a consistent snapshot of the committed state to a file")
    dump.add_argument("path", metavar="PATH", help=STORE)
    dump.add_argument("out", metavar="OUT", help="dump file (native; '-': the standard output) or directory (npy)")
    dump.add_argument("--format", choices=("native", "npy"), default="native",
                      help="native: one checksummed file (default); npy: OUT/ids.npy + OUT/embeddings.npy")
    dump.add_argument("--force", action="store_true", help="replace an existing OUT")
    json_flag(dump, "the summary (not with OUT '-')")

    restore = command("restore", cmd_restore, "build a store from a dump (native file or npy directory)")
    restore.add_argument("input", metavar="IN", help="dump file or npy directory ('-': a native dump on the "
                         "standard input)")
    restore.add_argument("path", metavar="PATH", help=STORE_TO_CREATE)
    restore.add_argument("--force", action="store_true", help="replace an existing store at PATH (atomically)")
    restore.add_argument("--format", choices=("auto", "native", "npy"), default="auto",
                         help="input format (default: a directory is npy, a file native)")
    restore.add_argument("--chunk-rows", type=_positive_int, default=None,
                         help="rows per chunk for an npy input without table.json (default: chosen from dim and "
                         "dtype, as create's chunk_rows=None)")
    restore.add_argument("--shards", type=_positive_int, default=None, metavar="W",
                         help="build a store sharded for W ranks (ShardedEmbeddingStore); default: a plain store")
    json_flag(restore)

    verify = command("verify", cmd_verify, "check every chunk's checksum, the row counts, IDs and metadata")
    verify.add_argument("path", metavar="PATH", help=STORE)
    json_flag(verify, "the report")

    compact = command("compact", cmd_compact, "rewrite the store without free pages, atomically")
    compact.add_argument("path", metavar="PATH", help="store directory (no writer may hold it)")
    json_flag(compact)

    cosir = command("import-cosir", cmd_import_cosir,
                    "convert a directory of original CoSiR embeddings_chunk_*.pt files into a store")
    cosir.add_argument("dir", metavar="DIR", help="directory holding embeddings_chunk_<i>.pt files")
    cosir.add_argument("path", metavar="PATH", help=STORE_TO_CREATE)
    cosir.add_argument("--force", action="store_true", help="replace an existing store at PATH")
    cosir.add_argument("--chunk-rows", type=_positive_int, default=None,
                       help="rows per store chunk (default: the rows of the first file, the original chunk_size)")

    export = command("export-cosir", cmd_export_cosir,
                     "write a store's committed rows as original CoSiR embeddings_chunk_*.pt files (one per chunk)")
    export.add_argument("path", metavar="PATH", help=STORE)
    export.add_argument("dir", metavar="DIR", help="directory to write embeddings_chunk_<i>.pt files into")
    export.add_argument("--force", action="store_true",
                        help="replace DIR if it already holds CoSiR files (never anything else)")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)  # a usage error exits 2 here, with argparse's message
    problem = getattr(args, "usage_problem", lambda _: None)(args)
    if problem:
        args.parser.error(problem)
    prefix = f"lmdb-embeddings {args.command}"
    try:
        return args.func(args)
    except BrokenPipeError:  # `... | head`: the reader left before the output was complete
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        print(f"{prefix}: error: the output was closed before it was complete (broken pipe)", file=sys.stderr)
        return EXIT_FAILED
    except (EmbeddingStoreError, OSError) as exc:  # bad input, missing path, damage found, refused operation
        print(f"{prefix}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.traceback:
            raise
        print(f"{prefix}: unexpected error: {type(exc).__name__}: {one_line(exc)} (rerun with --traceback "
              "and report it)", file=sys.stderr)
        return EXIT_FAILED

