"""``python -m lmdb_embeddings`` runs the command-line tool."""

from .cli import main

raise SystemExit(main())
