"""The in-process table: ID index, argument checks, initial values, chunk caches, and the two
sessions a handle can hold on its LMDB environment (a writer's pending transaction, a reader's
catch-up with the latest commit)."""
