"""What lives on disk and in files: metadata records, chunk values, table layouts, dumps.

Nothing here knows about open handles, caches or processes beyond one read transaction
(``snapshot``): the store, the ops and the CLI all speak these formats through this package.
"""
