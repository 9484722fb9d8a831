"""RFC 9162 proofs: every pair of sizes up to 64 verifies; every mutated proof is rejected."""

from __future__ import annotations

import hashlib

import pytest

from civicdp.audit.merkle import (EMPTY_ROOT, MerkleTree, leaf_hash, node_hash, root_of, verify_consistency,
                          verify_inclusion)

N = 64
LEAVES = [leaf_hash(f"entry {i}".encode()) for i in range(N)]
TREE = MerkleTree(LEAVES)


def reference_root(leaves: list[bytes]) -> bytes:
    """MTH straight from RFC 9162 §2.1.1, recursively."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return node_hash(reference_root(leaves[:k]), reference_root(leaves[k:]))


def test_hashes_are_domain_separated_as_rfc_9162_says() -> None:
    assert leaf_hash(b"abc") == hashlib.sha256(b"\x00abc").digest()
    assert node_hash(b"L" * 32, b"R" * 32) == hashlib.sha256(b"\x01" + b"L" * 32 + b"R" * 32).digest()
    assert MerkleTree().root() == EMPTY_ROOT == hashlib.sha256(b"").digest()


@pytest.mark.parametrize("size", range(N + 1))
def test_roots_of_every_prefix_match_the_rfc_definition(size: int) -> None:
    expected = reference_root(LEAVES[:size])
    assert TREE.root(size) == expected == root_of(LEAVES[:size])


def _mutations(proof: list[bytes]) -> list[list[bytes]]:
    """Each element with one bit flipped, each element dropped, one element too many, reversed."""
    out = []
    for i, element in enumerate(proof):
        out.append(proof[:i] + [bytes([element[0] ^ 1]) + element[1:]] + proof[i + 1:])
        out.append(proof[:i] + proof[i + 1:])
    out.append(proof + [b"\x00" * 32])
    if len(proof) > 1 and proof != proof[::-1]:
        out.append(proof[::-1])
    return out


@pytest.mark.parametrize("size", range(1, N + 1))
def test_inclusion_proofs_verify_and_mutated_ones_do_not(size: int) -> None:
    root = TREE.root(size)
    for index in range(size):
        proof = TREE.inclusion_proof(index, size)
        assert verify_inclusion(LEAVES[index], index, size, proof, root)
        for bad in _mutations(proof):
            assert not verify_inclusion(LEAVES[index], index, size, bad, root)
        assert not verify_inclusion(LEAVES[index], index, size, proof, TREE.root(size - 1) if size > 1 else b"x")
        other = (index + 1) % size
        if other != index:
            assert not verify_inclusion(LEAVES[other], index, size, proof, root)
            assert not verify_inclusion(LEAVES[index], other, size, proof, root)


@pytest.mark.parametrize("second", range(1, N + 1))
def test_consistency_proofs_verify_and_mutated_ones_do_not(second: int) -> None:
    second_root = TREE.root(second)
    for first in range(0, second + 1):
        first_root = TREE.root(first)
        proof = TREE.consistency_proof(first, second)
        assert verify_consistency(first, second, first_root, second_root, proof)
        if 0 < first < second:
            for bad in _mutations(proof):
                assert not verify_consistency(first, second, first_root, second_root, bad)
            # A rewritten history: the same sizes, another first root.
            assert not verify_consistency(first, second, leaf_hash(b"forged"), second_root, proof)
            assert not verify_consistency(first, second, first_root, leaf_hash(b"forged"), proof)


def test_a_smaller_log_after_a_larger_one_is_never_consistent() -> None:
    assert not verify_consistency(10, 9, TREE.root(10), TREE.root(9), TREE.consistency_proof(9, 10))


def test_out_of_range_requests_are_refused() -> None:
    with pytest.raises(ValueError, match="not in a tree"):
        TREE.inclusion_proof(64, 64)
    with pytest.raises(ValueError, match="has 64 entries"):
        TREE.consistency_proof(3, 65)


@pytest.mark.parametrize("size", [0, 1, 2, 3, 5, 8, 13, 64])
def test_a_tree_built_at_once_equals_one_built_by_appends(size: int) -> None:
    bulk, grown = MerkleTree.from_leaves(LEAVES[:size]), MerkleTree(LEAVES[:size])
    assert bulk.levels[: len(grown.levels)] == grown.levels or size == 0
    for n in range(size + 1):
        assert bulk.root(n) == grown.root(n)
    if size:
        bulk.append(LEAVES[0])
        grown.append(LEAVES[0])
        assert bulk.root() == grown.root()
