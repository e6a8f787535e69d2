"""Side-by-side benchmarks of lmdb_embeddings against what a user would otherwise write.

Entry point: ``python -m benchmarks.run --suite quick|full`` (see ``benchmarks/run.py``).
Each (implementation, workload) pair runs in its own subprocess (``benchmarks.worker``)
so peak memory and bytes written are per implementation.
"""
