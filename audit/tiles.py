"""The Merkle tree kept as tiles: fixed-size blocks of hashes that are written once and only grow.

The layout is that of C2SP's tlog-tiles. A tile at *level* ``L`` and *index* ``t`` holds up
to 256 consecutive hashes of height ``8L`` (level 0: leaf hashes; level 1: roots of 256
leaves; ...), concatenated, 32 bytes each: hash ``j`` of that height lies in tile
``j // 256`` at position ``j % 256``. A tile is *full* at 256 hashes and never changes
again; only the rightmost tile of each level is partial, and it only grows (a prefix of
it never changes). A tree of ``n`` leaves therefore needs ``n / 255`` tiles, about 32
bytes per leaf in all, and any perfect subtree hash is computed from at most 128 hashes
of one tile, so a root or a proof reads O(log n) tiles.

:class:`TileTree` answers roots and RFC 9162 proofs from tiles fetched on demand;
:class:`TileBuilder` turns leaves into tiles (appending to a stored tree, or rebuilding
one from the entries to compare with what is stored) and gives the root at any point.
Nothing here touches a database.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from civicdp.audit.merkle import HashTree, node_hash, root_of

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT  # 256 hashes
HASH_SIZE = 32

#: ``fetch(level, index, width)``: the stored bytes of that tile, at least ``width`` hashes long.
Fetch = Callable[[int, int, int], bytes]


def hashes_at(size: int, level: int) -> int:
    """How many hashes of height ``8 * level`` a tree of ``size`` leaves has."""
    return size >> (TILE_HEIGHT * level)


def tile_width(size: int, level: int, index: int) -> int:
    """How many hashes tile (``level``, ``index``) holds in a tree of ``size`` leaves (0: none)."""
    return max(0, min(TILE_WIDTH, hashes_at(size, level) - index * TILE_WIDTH))


def split_hashes(data: bytes) -> list[bytes]:
    return [data[i:i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)]


class TileTree(HashTree):
    """The tree of the first ``size`` leaves, read from tiles through ``fetch``."""

    def __init__(self, size: int, fetch: Fetch) -> None:
        self.size = size
        self.fetch = fetch

    def __len__(self) -> int:
        return self.size

    def perfect(self, height: int, index: int) -> bytes:
        if height < 0 or index < 0 or (index + 1) << height > self.size:
            raise ValueError(f"no subtree of height {height} at {index} in a tree of {self.size} entries")
        level, rest = divmod(height, TILE_HEIGHT)
        first = index << rest  # the first hash of height 8 * level below this node
        tile, offset = divmod(first, TILE_WIDTH)
        count = 1 << rest
        data = self.fetch(level, tile, offset + count)
        if len(data) < (offset + count) * HASH_SIZE:
            raise LookupError(f"tile {level}/{tile} holds {len(data) // HASH_SIZE} hashes, "
                              f"{offset + count} are needed")
        if count == 1:
            return data[offset * HASH_SIZE:(offset + 1) * HASH_SIZE]
        return root_of(split_hashes(data[offset * HASH_SIZE:(offset + count) * HASH_SIZE]))


class TileBuilder:
    """Appends leaves to a tree kept as tiles, collecting the tiles that changed.

    Start from an empty tree, or from a stored one of ``size`` leaves given its right
    edge (``edges[L]``: the hashes of the partial tile of level ``L``, as
    :meth:`edge_tiles` names them). :attr:`full` collects each tile as it becomes full;
    :meth:`partial` gives the partial tiles at the end.
    """

    def __init__(self, size: int = 0, edges: list[list[bytes]] | None = None) -> None:
        self.size = size
        self.edges: list[list[bytes]] = [list(e) for e in edges] if edges else [[]]
        self.counts = [hashes_at(size, level) for level in range(len(self.edges))]
        for level, edge in enumerate(self.edges):
            if len(edge) != self.counts[level] % TILE_WIDTH:
                raise ValueError(f"the edge of level {level} holds {len(edge)} hashes, "
                                 f"a tree of {size} entries has {self.counts[level] % TILE_WIDTH} there")
        self.full: list[tuple[int, int, bytes]] = []
        self._touched: set[int] = set()

    @staticmethod
    def edge_tiles(size: int) -> list[tuple[int, int, int]]:
        """The partial tiles (level, index, width) that form the right edge of a tree of ``size``."""
        out = []
        level = 0
        while level == 0 or hashes_at(size, level):
            count = hashes_at(size, level)
            out.append((level, count // TILE_WIDTH, count % TILE_WIDTH))
            level += 1
        return out

    def add(self, leaf: bytes) -> None:
        level, value = 0, leaf
        while True:
            if level == len(self.edges):
                self.edges.append([])
                self.counts.append(0)
            edge = self.edges[level]
            edge.append(value)
            self.counts[level] += 1
            if len(edge) < TILE_WIDTH:
                self._touched.add(level)
                break
            self.full.append((level, (self.counts[level] - 1) // TILE_WIDTH, b"".join(edge)))
            self._touched.discard(level)
            value = root_of(edge)
            self.edges[level] = []
            level += 1
        self.size += 1

    def extend(self, leaves: Iterable[bytes]) -> None:
        for leaf in leaves:
            self.add(leaf)

    def take_full(self) -> list[tuple[int, int, bytes]]:
        full, self.full = self.full, []
        return full

    def partial(self, touched_only: bool = True) -> list[tuple[int, int, bytes]]:
        """The partial tiles (level, index, bytes) of the right edge (by default those that grew)."""
        return [(level, self.counts[level] // TILE_WIDTH, b"".join(self.edges[level]))
                for level in range(len(self.edges))
                if self.edges[level] and (level in self._touched or not touched_only)]

    def root(self) -> bytes:
        """The root of the tree of the leaves added so far (RFC 9162 MTH)."""
        peaks: list[bytes] = []  # perfect subtrees, left to right
        for level in range(len(self.edges) - 1, -1, -1):
            edge = self.edges[level]
            start = 0
            for bit in range(TILE_HEIGHT - 1, -1, -1):
                if len(edge) >> bit & 1:
                    peaks.append(root_of(edge[start:start + (1 << bit)]))
                    start += 1 << bit
        if not peaks:
            return root_of([])
        value = peaks[-1]
        for peak in reversed(peaks[:-1]):
            value = node_hash(peak, value)
        return value
