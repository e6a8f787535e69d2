"""A sharded store's directory, read and written without torch or a process group.

Which rank owns an ID (``ownership``), the manifest that decides the store's commit
(``manifest``), shards built from rows in global order (``creation``, ``table_sink``) and the
shards read back as one table (``snapshot``). ``distributed/`` runs the live store over a
process group on top of these; ``ops`` reads, verifies and restores sharded directories with
them, so ``info``, ``verify``, ``dump`` and ``restore --shards`` need neither.
"""
