"""RFC 6962 tree hashing and proofs against Certificate Transparency's published vectors."""

from __future__ import annotations

import pytest

from autoecoops.kernel.policy_audit import merkle

# The leaf inputs and roots of CT's merkle_tree_test (RFC 6962 reference tests).
LEAVES = [
    bytes.fromhex(h)
    for h in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]
ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
# (leaf index, tree size, audit path) from the same suite.
INCLUSION = [
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]  # fmt: skip
CONSISTENCY = [
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]  # fmt: skip

HASHES = [merkle.leaf_hash(x) for x in LEAVES]


def tree(leaves: list[bytes]) -> tuple[merkle.Frontier, dict[merkle.Node, bytes]]:
    """A frontier plus every complete node it created (what the store keeps)."""
    frontier, nodes = merkle.Frontier(), {}
    for leaf in leaves:
        nodes.update(frontier.append(leaf))
    return frontier, nodes


def test_roots_match_rfc6962_for_sizes_0_to_8() -> None:
    assert merkle.EMPTY_ROOT.hex() == ROOTS[0]
    frontier = merkle.Frontier()
    for n in range(1, 9):
        frontier.append(HASHES[n - 1])
        assert frontier.root().hex() == ROOTS[n]
        assert merkle.root_of(HASHES[:n]).hex() == ROOTS[n]


@pytest.mark.parametrize(("index", "size", "path"), INCLUSION)
def test_inclusion_proofs_match_the_published_paths(index: int, size: int, path: list[str]) -> None:
    _, nodes = tree(HASHES[:size])
    proof = merkle.prove(merkle.inclusion_ranges(index, size), lambda ns: [nodes[n] for n in ns])
    assert [p.hex() for p in proof] == path
    root = bytes.fromhex(ROOTS[size])
    assert merkle.verify_inclusion(index, size, HASHES[index], proof, root)


@pytest.mark.parametrize(("old", "new", "path"), CONSISTENCY)
def test_consistency_proofs_match_the_published_paths(old: int, new: int, path: list[str]) -> None:
    _, nodes = tree(HASHES[:new])
    proof = merkle.prove(merkle.consistency_ranges(old, new), lambda ns: [nodes[n] for n in ns])
    assert [p.hex() for p in proof] == path
    assert merkle.verify_consistency(
        old, new, proof, bytes.fromhex(ROOTS[old]), bytes.fromhex(ROOTS[new])
    )


SIZES = [0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 128, 129]


@pytest.mark.parametrize("size", SIZES)
def test_every_proof_verifies_and_any_tampering_fails(size: int) -> None:
    leaves = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(size)]
    frontier, nodes = tree(leaves)
    root = frontier.root()
    assert root == merkle.root_of(leaves)

    def read(ns: object) -> list[bytes]:
        return [nodes[n] for n in ns]  # type: ignore[attr-defined]

    for i in range(size):
        proof = merkle.prove(merkle.inclusion_ranges(i, size), read)
        assert merkle.verify_inclusion(i, size, leaves[i], proof, root)
        assert not merkle.verify_inclusion(i, size, merkle.leaf_hash(b"other"), proof, root)
        if proof:
            bent = [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]
            assert not merkle.verify_inclusion(i, size, leaves[i], bent, root)
            assert not merkle.verify_inclusion(i, size, leaves[i], proof[:-1], root)
    for old in range(size + 1):
        old_root = merkle.root_of(leaves[:old])
        proof = merkle.prove(merkle.consistency_ranges(old, size), read)
        assert merkle.verify_consistency(old, size, proof, old_root, root)
        if 0 < old < size:
            wrong = merkle.leaf_hash(b"forged")
            assert not merkle.verify_consistency(old, size, proof, wrong, root)
            assert not merkle.verify_consistency(old, size, proof, old_root, wrong)
            assert not merkle.verify_consistency(old, size, proof[:-1], old_root, root)


def test_frontier_rebuilds_from_its_stored_nodes() -> None:
    leaves = [merkle.leaf_hash(bytes([i])) for i in range(37)]
    frontier, nodes = tree(leaves)
    coords = merkle.Frontier.nodes_for(37)
    rebuilt = merkle.Frontier.from_nodes(37, [nodes[c] for c in coords])
    assert rebuilt.root() == frontier.root()
    rebuilt.append(merkle.leaf_hash(b"next"))
    frontier.append(merkle.leaf_hash(b"next"))
    assert rebuilt.root() == frontier.root()


def test_an_append_creates_log_n_nodes() -> None:
    frontier = merkle.Frontier()
    for _ in range(1023):
        frontier.append(merkle.leaf_hash(b"x"))
    # Leaf 1023 completes a subtree at every level up to 10.
    assert len(frontier.append(merkle.leaf_hash(b"x"))) == 11


def test_ranges_past_the_tree_are_refused() -> None:
    with pytest.raises(ValueError):
        merkle.inclusion_ranges(5, 5)
    with pytest.raises(ValueError):
        merkle.consistency_ranges(6, 5)
