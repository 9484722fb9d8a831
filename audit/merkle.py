"""The RFC 9162 Merkle tree: leaf and node hashes, roots, inclusion and consistency proofs.

    leaf hash  = SHA-256(0x00 || entry bytes)
    node hash  = SHA-256(0x01 || left || right)
    MTH(D[n])  = hash of the tree whose left part holds the largest power of two < n leaves

:class:`HashTree` computes roots and proofs from the hashes of *perfect* subtrees (2^h
leaves starting at a multiple of 2^h), wherever they are kept: :class:`MerkleTree` keeps
all of them in memory (about 2n hashes), so appending is O(log n) and any proof is
O(log² n); the server keeps them in stored tiles (:mod:`civicdp.audit.tiles`). The verification
functions are the algorithms of RFC 9162 §2.1.3.2 and §2.1.4.2, and need nothing but hashes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

_sha256 = hashlib.sha256
EMPTY_ROOT = _sha256(b"").digest()


def leaf_hash(entry: bytes) -> bytes:
    return _sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return _sha256(b"\x01" + left + right).digest()


def _split(size: int) -> int:
    """The largest power of two strictly below ``size`` (size >= 2)."""
    return 1 << ((size - 1).bit_length() - 1)


def root_of(leaves: Sequence[bytes]) -> bytes:
    """MTH of leaf hashes, level by level (an odd last node moves up unchanged, as in RFC 9162)."""
    if not leaves:
        return EMPTY_ROOT
    level = list(leaves)
    while len(level) > 1:
        nxt = [_sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


class HashTree:
    """Roots and RFC 9162 proofs of a tree of ``len(self)`` leaves, from its perfect subtree hashes.

    Subclasses say how many leaves there are and give :meth:`perfect`, the hash of leaves
    ``[index * 2^height, (index + 1) * 2^height)``; everything else is computed from those.
    """

    def __len__(self) -> int:
        raise NotImplementedError

    def perfect(self, height: int, index: int) -> bytes:
        raise NotImplementedError

    def leaf(self, index: int) -> bytes:
        return self.perfect(0, index)

    def hash(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for the ranges RFC 9162 proofs use (start aligned to the split)."""
        size = end - start
        if size <= 0:
            return EMPTY_ROOT
        if size & (size - 1) == 0 and start % size == 0:
            height = size.bit_length() - 1
            return self.perfect(height, start >> height)
        k = _split(size)
        return node_hash(self.hash(start, start + k), self.hash(start + k, end))

    def root(self, size: int | None = None) -> bytes:
        size = len(self) if size is None else size
        self._check_size(size)
        return self.hash(0, size)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """PATH(index, D[size]) of RFC 9162 §2.1.3.1."""
        self._check_size(size)
        if not 0 <= index < size:
            raise ValueError(f"entry {index} is not in a tree of {size} entries")
        return self._path(index, 0, size)

    def _path(self, index: int, start: int, end: int) -> list[bytes]:
        size = end - start
        if size == 1:
            return []
        k = _split(size)
        if index < k:
            return self._path(index, start, start + k) + [self.hash(start + k, end)]
        return self._path(index - k, start + k, end) + [self.hash(start, start + k)]

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """PROOF(first, D[second]) of RFC 9162 §2.1.4.1."""
        self._check_size(second)
        if not 0 <= first <= second:
            raise ValueError(f"a consistency proof needs 0 <= first ({first}) <= second ({second})")
        if first == 0 or first == second:
            return []
        return self._subproof(first, 0, second, True)

    def _subproof(self, m: int, start: int, end: int, whole: bool) -> list[bytes]:
        size = end - start
        if m == size:
            return [] if whole else [self.hash(start, end)]
        k = _split(size)
        if m <= k:
            return self._subproof(m, start, start + k, whole) + [self.hash(start + k, end)]
        return self._subproof(m - k, start + k, end, False) + [self.hash(start, start + k)]

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= len(self):
            raise ValueError(f"the log has {len(self)} entries, not {size}")


class MerkleTree(HashTree):
    """An append-only tree of leaf hashes in memory, with O(log n) appends and roots of any prefix."""

    def __init__(self, leaves: Iterable[bytes] = ()) -> None:
        # levels[h][i] is the hash of leaves [i * 2^h, (i + 1) * 2^h): perfect subtrees only.
        self.levels: list[list[bytes]] = [[]]
        for leaf in leaves:
            self.append(leaf)

    @classmethod
    def from_leaves(cls, leaves: list[bytes]) -> MerkleTree:
        """The tree of many leaves at once: each level in one pass (much faster than appends)."""
        tree = cls()
        level = list(leaves)
        tree.levels = [level]
        while len(level) > 1:
            level = [_sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
            tree.levels.append(level)
        return tree

    def __len__(self) -> int:
        return len(self.levels[0])

    def append(self, leaf: bytes) -> None:
        self.levels[0].append(leaf)
        height = 0
        while len(self.levels[height]) % 2 == 0:
            level = self.levels[height]
            if height + 1 == len(self.levels):
                self.levels.append([])
            self.levels[height + 1].append(node_hash(level[-2], level[-1]))
            height += 1

    def perfect(self, height: int, index: int) -> bytes:
        return self.levels[height][index]

    def leaf(self, index: int) -> bytes:
        return self.levels[0][index]


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """RFC 9162 §2.1.3.2: is ``leaf`` entry ``index`` of the tree of ``size`` with ``root``?"""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes,
                       proof: Sequence[bytes]) -> bool:
    """RFC 9162 §2.1.4.2: is the tree of ``first`` entries a prefix of the tree of ``second``?"""
    if not 0 <= first <= second:
        return False
    if first == second:
        return not proof and first_root == second_root
    if first == 0:
        return not proof  # the empty tree is a prefix of every tree
    if not proof:
        return False
    path = list(proof)
    if first & (first - 1) == 0:
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == first_root and sr == second_root
