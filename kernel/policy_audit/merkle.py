"""RFC 6962 / RFC 9162 Merkle tree hashing, proofs and their verifiers.

Leaf hash SHA-256(0x00 || entry), node hash SHA-256(0x01 || left || right).
A tree of size n stores the hash of every *complete* (perfect, aligned)
subtree: node (level, index) covers leaves [index * 2**level, (index + 1) *
2**level). Appending needs only the frontier (the rightmost complete node of
each level), and a proof is O(log n) node reads: any range the RFC's
recursion asks for is a complete node or a right edge made of O(log n) of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

EMPTY_ROOT = hashlib.sha256(b"").digest()
HASH_SIZE = 32

#: A complete subtree: (level, index).
Node = tuple[int, int]


def leaf_hash(data: bytes) -> bytes:
    """SHA-256(0x00 || data)."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def split_point(n: int) -> int:
    """The largest power of two strictly less than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_of(leaves: Sequence[bytes]) -> bytes:
    """MTH over leaf hashes, by the RFC's recursive definition (for tests and small trees)."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = split_point(len(leaves))
    return node_hash(root_of(leaves[:k]), root_of(leaves[k:]))


@dataclass
class Frontier:
    """The compact state of a tree: its size and the rightmost complete node per level."""

    size: int = 0
    #: ``nodes[level]`` is set exactly when bit ``level`` of size is set.
    nodes: list[bytes | None] = field(default_factory=list)

    def copy(self) -> Frontier:
        """An independent copy."""
        return Frontier(self.size, list(self.nodes))

    def append(self, leaf: bytes) -> list[tuple[Node, bytes]]:
        """Add a leaf hash; return the complete nodes it created, lowest level first."""
        index = self.size
        created: list[tuple[Node, bytes]] = [((0, index), leaf)]
        cur, level = leaf, 0
        while index >> level & 1:
            left = self.nodes[level]
            assert left is not None
            cur = node_hash(left, cur)
            self.nodes[level] = None
            level += 1
            created.append(((level, index >> level), cur))
        if level == len(self.nodes):
            self.nodes.append(None)
        self.nodes[level] = cur
        self.size += 1
        return created

    def root(self) -> bytes:
        """The tree's root hash."""
        acc: bytes | None = None
        for node in self.nodes:
            if node is not None:
                acc = node if acc is None else node_hash(node, acc)
        return acc if acc is not None else EMPTY_ROOT

    @staticmethod
    def nodes_for(size: int) -> list[Node]:
        """Which stored nodes make up the frontier of a tree of ``size``."""
        return [(lvl, (size >> lvl) - 1) for lvl in range(size.bit_length()) if size >> lvl & 1]

    @classmethod
    def from_nodes(cls, size: int, hashes: Sequence[bytes]) -> Frontier:
        """Rebuild from the hashes of ``nodes_for(size)``, in that order."""
        levels: list[bytes | None] = [None] * size.bit_length()
        for (lvl, _), h in zip(cls.nodes_for(size), hashes, strict=True):
            levels[lvl] = h
        return cls(size, levels)


def range_nodes(lo: int, hi: int) -> list[Node]:
    """The complete nodes that make up leaves [lo, hi), left to right.

    For the ranges RFC 6962's recursion produces, folding their hashes right
    to left gives MTH(D[lo:hi]).
    """
    out: list[Node] = []
    while lo < hi:
        level = (lo & -lo).bit_length() - 1 if lo else (hi - lo).bit_length() - 1
        while (1 << level) > hi - lo:
            level -= 1
        out.append((level, lo >> level))
        lo += 1 << level
    return out


def fold(hashes: Sequence[bytes]) -> bytes:
    """Fold the hashes of ``range_nodes`` into the range's MTH."""
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = node_hash(h, acc)
    return acc


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """The leaf ranges whose hashes form PATH(index, D[size]), leaf to root."""
    if not 0 <= index < size:
        raise ValueError(f"index {index} is not in a tree of size {size}")
    out: list[tuple[int, int]] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = split_point(hi - lo)
        if index < lo + k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            lo += k
    return out[::-1]


def consistency_ranges(old: int, new: int) -> list[tuple[int, int]]:
    """The leaf ranges whose hashes form PROOF(old, D[new]) (RFC 6962 2.1.2)."""
    if not 0 <= old <= new:
        raise ValueError(f"cannot prove {old} -> {new}")
    if old in (0, new):
        return []
    out: list[tuple[int, int]] = []
    lo, hi, m, complete = 0, new, old, True
    while True:
        if m == hi - lo:
            if not complete:
                out.append((lo, hi))
            break
        k = split_point(hi - lo)
        if m <= k:
            out.append((lo + k, hi))
            hi = lo + k
        else:
            out.append((lo, lo + k))
            m -= k
            lo += k
            complete = False
    return out[::-1]


def proof_nodes(ranges: Sequence[tuple[int, int]]) -> list[Node]:
    """The stored nodes a proof made of ``ranges`` needs, in the order ``assemble`` takes them."""
    return [n for lo, hi in ranges for n in range_nodes(lo, hi)]


def assemble(ranges: Sequence[tuple[int, int]], hashes: Sequence[bytes]) -> list[bytes]:
    """Fold the hashes of ``proof_nodes(ranges)`` into one hash per range."""
    out, at = [], 0
    for lo, hi in ranges:
        width = len(range_nodes(lo, hi))
        out.append(fold(hashes[at : at + width]))
        at += width
    return out


def prove(
    ranges: Sequence[tuple[int, int]], read: Callable[[Sequence[Node]], Sequence[bytes]]
) -> list[bytes]:
    """Hash each range from stored nodes, fetched with one ``read`` call."""
    nodes = proof_nodes(ranges)
    return assemble(ranges, list(read(nodes)) if nodes else [])


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 section 2.1.3.2: does ``proof`` place ``leaf`` at ``index`` under ``root``?"""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    old: int, new: int, proof: Sequence[bytes], old_root: bytes, new_root: bytes
) -> bool:
    """RFC 9162 section 2.1.4.2: is the tree (old, old_root) a prefix of (new, new_root)?"""
    if not 0 <= old <= new:
        return False
    if old == new:
        return not proof and old_root == new_root
    if old == 0:
        return not proof and old_root == EMPTY_ROOT
    if not proof:
        return False
    path = list(proof)
    if old & (old - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old - 1, new - 1
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
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == old_root and sr == new_root and sn == 0
