"""How much map and disk a write needs: every sizing formula of the package, in one place.

Two budgets, two different resources:

* the **map** (virtual address space LMDB maps the file into): it can grow only while no
  transaction is open in this process, so room is made before a write transaction begins;
  it grows geometrically and costs no disk (the file is sparse).
* the **disk** (blocks of ``data.mdb``): under ``writemap`` a store into a hole of the sparse
  file on a full disk is ``SIGBUS``, so every block a transaction may write is allocated
  first (``processes/data_file.DataFile.reserve``). A value larger than half a page lives on
  overflow pages, a run of whole pages after a header: its disk cost is :meth:`value_bytes`.
  A value written twice in one transaction is rewritten in place by LMDB (its pages are
  already dirty), so a transaction's disk need is its DISTINCT values (``processes/transaction``).
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20


@dataclass(frozen=True)
class SpaceBudget:
    """The sizing rules for one environment's pages of ``page_size`` bytes."""

    page_size: int = 4096

    MIN_MAP = 256 * MIB  # the smallest map: small stores never resize
    MAP_SLACK = 64 * MIB  # added to every map growth target
    VALUE_HEADER = 64  # an overflow value's page header and node, rounded up
    RESERVE_SLACK = 2 * MIB  # fixed disk slack of a reservation (meta, root and free-list pages)
    RESERVE_TREE = 32  # ... plus 1/32 of the values for B-tree branch and leaf pages
    AHEAD_MIN = 8 * MIB  # a spill reserves at least this much ahead (one fallocate for many spills)
    AHEAD_FRACTION = 16  # ... or 1/16 of the table, whichever is more
    STATE_SLACK = MIB  # a commit's records besides its chunks (the state record's own pages are counted)
    ID_BYTES = 16  # map room per row for the ID index and B-tree of a growing table

    # -- disk ------------------------------------------------------------------------------------
    def value_bytes(self, nbytes: int, count: int = 1) -> int:
        """Disk ``count`` values of ``nbytes`` each take as LMDB overflow pages."""
        psize = self.page_size
        return count * (-(-(nbytes + self.VALUE_HEADER) // psize) * psize)

    def reservation_end(self, start: int, values: int) -> int:
        """File offset up to which blocks must be allocated before ``values`` bytes of values are
        written by a transaction that began with the committed data ending at ``start``.

        LMDB takes free pages inside the file first and appends the rest, so the file never grows
        past its committed end plus what the transaction writes (and its tree pages)."""
        return start + values + values // self.RESERVE_TREE + self.RESERVE_SLACK

    def ahead(self, table_bytes: int) -> int:
        """How much more than needed a spill reserves, so one ``fallocate`` serves many spills."""
        return max(self.AHEAD_MIN, table_bytes // self.AHEAD_FRACTION)

    # -- map -------------------------------------------------------------------------------------
    def map_size(self, current: int, used: int, needed: int) -> int:
        """The map size to set so ``needed`` more bytes fit after ``used`` (``current`` if they do):
        doubled until it holds twice the need plus slack."""
        want = used + 2 * needed + self.MAP_SLACK
        size = max(current, self.MIN_MAP)
        while size < want:
            size *= 2
        return size

    def pending_headroom(self, table_bytes: int, rows: int, free_disk: int) -> int:
        """Map room to make before a spill opens the pending transaction: the whole table rewritten
        with its IDs, or half of what the disk can hold, whichever is more.

        The map cannot grow while the transaction is open, and a writer may rewrite every chunk
        and keep adding rows (and spilling) before it commits; the map is virtual, not disk."""
        return max(table_bytes + self.ID_BYTES * max(rows, 1) + self.AHEAD_MIN, free_disk // 2)

    def commit_headroom(self, dirty_bytes: int, rows: int, copies: int, map_was_full: bool = False) -> int:
        """Map room for a commit without a pending transaction: its dirty chunks and records (and
        their pre-images, ``copies`` = 2 with the undo log), and the IDs; four times that when the
        first try met a full map."""
        need = copies * dirty_bytes + self.STATE_SLACK + self.ID_BYTES * max(rows, 1)
        return 4 * need if map_was_full else need

    @classmethod
    def build_map_size(cls, table_bytes: int) -> int:
        """The map of a store being built (every value written once, in order)."""
        return max(2 * table_bytes + cls.MAP_SLACK, cls.MIN_MAP)
