"""Merkle tree hashing, proofs and their verification after RFC 6962 / RFC 9162 section 2.

Leaves are hashed as SHA-256(0x00 || data) and interior nodes as SHA-256(0x01 || left ||
right), so a leaf can never be passed off as a node. All functions are pure.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

EMPTY_ROOT = hashlib.sha256(b"").digest()


class ProofError(ValueError):
    """A proof that does not verify; the message says which check failed."""


HASH_SIZE = 32


def _check_hashes(**hashes: bytes | Sequence[bytes]) -> None:
    for name, value in hashes.items():
        for item in [value] if isinstance(value, bytes) else value:
            if len(item) != HASH_SIZE:
                raise ProofError(f"{name} holds a {len(item)}-byte value; SHA-256 hashes are {HASH_SIZE}")


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """MTH over already-hashed leaves."""
    if not hashes:
        return EMPTY_ROOT
    level = list(hashes)
    # Bottom-up, carrying an odd last node upwards: the same tree as RFC 6962's recursion.
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


class CompactRange:
    """The roots of the perfect subtrees covering all leaves so far (at most log2(n) of them).

    Appending is amortised O(1) hashes and the root is O(log n), so a log can commit to
    every prefix of itself without re-hashing everything each time.
    """

    def __init__(self) -> None:
        self.size = 0
        self._peaks: list[bytes] = []  # left to right, largest subtree first

    def append(self, leaf: bytes) -> None:
        self._peaks.append(leaf)
        size = self.size
        while size & 1:  # merge equal-sized subtrees, as in binary addition
            right = self._peaks.pop()
            self._peaks[-1] = node_hash(self._peaks[-1], right)
            size >>= 1
        self.size += 1

    def root(self) -> bytes:
        if not self._peaks:
            return EMPTY_ROOT
        root = self._peaks[-1]
        for peak in reversed(self._peaks[:-1]):
            root = node_hash(peak, root)
        return root


def prefix_roots(hashes: Sequence[bytes]) -> list[bytes]:
    """Root of every prefix: ``result[k]`` is the root of the first ``k + 1`` leaves."""
    compact, roots = CompactRange(), []
    for leaf in hashes:
        compact.append(leaf)
        roots.append(compact.root())
    return roots


def inclusion_proof(hashes: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(index, D[n]) from RFC 6962 section 2.1.1."""
    if not 0 <= index < len(hashes):
        raise ValueError(f"leaf index {index} outside a tree of size {len(hashes)}")
    if len(hashes) == 1:
        return []
    k = _split(len(hashes))
    if index < k:
        return inclusion_proof(hashes[:k], index) + [root_from_leaf_hashes(hashes[k:])]
    return inclusion_proof(hashes[k:], index - k) + [root_from_leaf_hashes(hashes[:k])]


def consistency_proof(hashes: Sequence[bytes], old_size: int) -> list[bytes]:
    """PROOF(m, D[n]) from RFC 6962 section 2.1.2."""
    if not 0 < old_size <= len(hashes):
        raise ValueError(f"old size {old_size} not in 1..{len(hashes)}")

    def subproof(m: int, leaves: Sequence[bytes], complete: bool) -> list[bytes]:
        n = len(leaves)
        if m == n:
            return [] if complete else [root_from_leaf_hashes(leaves)]
        k = _split(n)
        if m <= k:
            return subproof(m, leaves[:k], complete) + [root_from_leaf_hashes(leaves[k:])]
        return subproof(m - k, leaves[k:], False) + [root_from_leaf_hashes(leaves[:k])]

    return subproof(old_size, hashes, True)


def verify_inclusion(
    *, leaf: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """RFC 9162 section 2.1.3.2; ``leaf`` is the leaf hash. Raises ProofError."""
    _check_hashes(leaf=leaf, root=root, proof=proof)
    if index >= tree_size or index < 0:
        raise ProofError(f"leaf index {index} outside a tree of size {tree_size}")
    fn, sn, r = index, tree_size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("proof is longer than the tree allows")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("proof is shorter than the tree needs")
    if r != root:
        raise ProofError("computed root does not match")


def verify_consistency(
    *, old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """RFC 9162 section 2.1.4.2: the tree of ``new_size`` extends the one of ``old_size``."""
    if old_size > new_size:
        raise ProofError(f"old size {old_size} is larger than new size {new_size}")
    if old_size == 0:
        raise ProofError("consistency with an empty tree proves nothing")
    if old_size == new_size:
        if proof:
            raise ProofError("equal sizes need an empty proof")
        if old_root != new_root:
            raise ProofError("equal sizes but different roots")
        return
    _check_hashes(old_root=old_root, new_root=new_root, proof=proof)
    if not proof:
        raise ProofError("empty proof")
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is itself a node
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("proof is longer than the trees allow")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("proof is shorter than the trees need")
    if fr != old_root:
        raise ProofError("proof does not lead to the old root")
    if sr != new_root:
        raise ProofError("proof does not lead to the new root")
