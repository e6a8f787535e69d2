"""Everything about sharing a store between processes and threads: the per-process LMDB
environment registry, the one-writer lock, the fork guard, and building a store beside its
path before swapping it in."""
