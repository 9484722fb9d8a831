"""The tree kept as tiles answers exactly what the tree in memory answers, however it was appended."""

from __future__ import annotations

import random

import pytest

from civicdp.audit.merkle import MerkleTree, leaf_hash, verify_consistency, verify_inclusion
from civicdp.audit.tiles import TILE_WIDTH, TileBuilder, TileTree, tile_width

SIZES = [0, 1, 2, 255, 256, 257, 511, 512, 513, 65535, 65536, 65537, 70_001]
LEAVES = [leaf_hash(i.to_bytes(4, "big")) for i in range(max(SIZES))]
MEMORY = MerkleTree.from_leaves(LEAVES)


def _store(chunks: list[int]) -> tuple[dict[tuple[int, int], bytes], int]:
    """Append LEAVES in chunks the way the server does: each chunk from the stored right edge."""
    tiles: dict[tuple[int, int], bytes] = {}
    size = 0
    for chunk in chunks:
        edges = [[tiles[(lv, ix)][i * 32:(i + 1) * 32] for i in range(width)] if width else []
                 for lv, ix, width in TileBuilder.edge_tiles(size)]
        builder = TileBuilder(size, edges)
        builder.extend(LEAVES[size:size + chunk])
        for level, index, data in builder.take_full() + builder.partial():
            old = tiles.get((level, index), b"")
            assert data.startswith(old), "a tile only grows"
            tiles[(level, index)] = data
        size += chunk
    return tiles, size


def _fetch(tiles: dict[tuple[int, int], bytes]):  # type: ignore[no-untyped-def]
    def fetch(level: int, index: int, width: int) -> bytes:
        return tiles[(level, index)]
    return fetch


@pytest.mark.parametrize("chunking", ["one", "random"])
def test_tiles_give_the_roots_and_proofs_of_the_tree_in_memory(chunking: str) -> None:
    rng = random.Random(7)
    total = max(SIZES)
    chunks = [total] if chunking == "one" else []
    while sum(chunks) < total:
        chunks.append(min(total - sum(chunks), rng.choice([1, 3, 255, 256, 1000, 4097])))
    tiles, size = _store(chunks)
    assert size == total
    assert all(len(data) == tile_width(size, lv, ix) * 32 for (lv, ix), data in tiles.items())
    assert len(tiles) < total / 250
    tree = TileTree(size, _fetch(tiles))
    for n in SIZES:
        view = TileTree(n, _fetch(tiles))
        assert view.root() == MEMORY.root(n) == tree.root(n)
        for index in {0, n // 3, n - 1} if n else set():
            proof = view.inclusion_proof(index, n)
            assert proof == MEMORY.inclusion_proof(index, n)
            assert verify_inclusion(LEAVES[index], index, n, proof, view.root())
        for first in {1, n // 2, n - 1} if n > 1 else set():
            proof = tree.consistency_proof(first, n)
            assert proof == MEMORY.consistency_proof(first, n)
            assert verify_consistency(first, n, MEMORY.root(first), MEMORY.root(n), proof)


def test_the_builder_knows_the_root_at_every_size() -> None:
    builder = TileBuilder()
    for n, leaf in enumerate(LEAVES[:2 * TILE_WIDTH + 3]):
        assert builder.root() == MEMORY.root(n)
        builder.add(leaf)


def test_a_view_refuses_what_lies_beyond_its_size() -> None:
    tiles, size = _store([300])
    with pytest.raises(ValueError, match="not 301"):
        TileTree(size, _fetch(tiles)).root(301)
    with pytest.raises(ValueError, match="no subtree"):
        TileTree(size, _fetch(tiles)).perfect(9, 0)


def test_an_edge_that_does_not_fit_the_size_is_refused() -> None:
    with pytest.raises(ValueError, match="edge of level 0"):
        TileBuilder(5, [[LEAVES[0]]])
