"""Verifying the stored log against a trusted checkpoint, and naming what broke.

The verifier trusts only a checkpoint it checked with a pinned key. It
rehashes every stored entry in the range, rebuilds the root from them (and
from stored complete nodes outside the range), and compares it with the
checkpoint's. When they differ it walks down from the trusted root: at each
level the stored children must hash to the trusted parent, and the first
child whose recomputed hash differs leads to the entry that changed. If the
stored nodes were rewritten too, it names the smallest range it can prove.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from autoecoops.kernel.policy_audit import merkle
from autoecoops.kernel.policy_audit.checkpoint import CheckpointBody
from autoecoops.kernel.policy_audit.store import AuditStore

MISSING = b"\xff" * 32  # stands in for an entry absent from the store


@dataclass
class Finding:
    """One problem: the index (or first index of a range) and what is wrong."""

    index: int
    message: str
    end: int | None = None
    #: What kind of problem: changed, missing, truncated, fork or other.
    kind: str = "changed"

    def __str__(self) -> str:
        where = (
            f"index {self.index}" if self.end is None else f"indexes {self.index}..{self.end - 1}"
        )
        return f"{where}: {self.message}"


@dataclass
class Verification:
    """The outcome of ``verify``."""

    tree_size: int
    start: int
    end: int
    checked: int = 0
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing was found."""
        return not self.findings


class _Tree:
    """Subtree hashes over [0, size): recomputed inside the range, stored outside."""

    def __init__(self, store: AuditStore, start: int, leaves: list[bytes]) -> None:
        self.store = store
        self.start = start
        self.end = start + len(leaves)
        self.leaves = leaves
        self._memo: dict[tuple[int, int], bytes] = {}

    async def stored(self, lo: int, hi: int) -> bytes:
        """MTH(lo, hi) from stored nodes only (b'' if a node is missing)."""
        nodes = merkle.range_nodes(lo, hi)
        hashes = await self.store.nodes(nodes)
        if any(not h for h in hashes):
            return b""
        return merkle.fold(hashes)

    async def recomputed(self, lo: int, hi: int) -> bytes:
        """MTH(lo, hi) with every leaf in the range rehashed from its entry."""
        if hi <= self.start or lo >= self.end:
            return await self.stored(lo, hi)
        if hi - lo == 1:
            return self.leaves[lo - self.start]
        key = (lo, hi)
        got = self._memo.get(key)
        if got is None:
            k = merkle.split_point(hi - lo)
            got = merkle.node_hash(
                await self.recomputed(lo, lo + k), await self.recomputed(lo + k, hi)
            )
            self._memo[key] = got
        return got


async def _locate(tree: _Tree, lo: int, hi: int, trusted: bytes) -> Finding:
    """Descend from a trusted subtree hash to the first leaf that differs."""
    while hi - lo > 1:
        k = merkle.split_point(hi - lo)
        left, right = await tree.stored(lo, lo + k), await tree.stored(lo + k, hi)
        if not left or not right or merkle.node_hash(left, right) != trusted:
            return Finding(
                lo,
                "the stored tree nodes were changed as well; the change is within this range",
                end=hi,
            )
        if await tree.recomputed(lo, lo + k) != left:
            hi, trusted = lo + k, left
        else:
            lo, trusted = lo + k, right
    return Finding(lo, "the stored entry does not hash to the leaf the checkpoint commits to")


async def _explain(store: AuditStore, finding: Finding) -> Finding:
    """Say whether a changed entry looks moved (its own index differs) or edited."""
    if finding.end is not None:
        return finding
    data = await store.entry(finding.index)
    if data is None:
        finding.message = "the entry is missing from the store (deleted)"
        return finding
    try:
        claimed = int(json.loads(data).get("index", "0"))
    except (ValueError, AttributeError):
        finding.message = "the stored entry is not valid JSON (modified)"
        return finding
    if claimed != finding.index:
        finding.message = f"the entry stored here is entry {claimed} (entries were inserted, deleted or reordered)"
    else:
        finding.message = "the entry's content was modified"
    return finding


async def verify(
    store: AuditStore,
    trusted: CheckpointBody,
    start: int = 0,
    end: int | None = None,
    earlier: CheckpointBody | None = None,
) -> Verification:
    """Check entries [start, end) of the stored log against ``trusted`` (and ``earlier``)."""
    size = trusted.size
    end = size if end is None else end
    result = Verification(size, start, end)
    if not 0 <= start <= end <= size:
        raise ValueError(f"range {start}..{end} is not within the checkpoint's {size} entries")
    leaves: list[bytes] = []
    frontier = merkle.Frontier() if start == 0 else None
    earlier_root: bytes | None = None
    expected = start
    if start < end:
        async for batch in store.scan(start, end):
            for position, data in batch:
                if position < expected:
                    result.findings.append(
                        Finding(position, "a second entry with this index was inserted")
                    )
                    continue
                while expected < position:  # a gap: deleted entries
                    leaves.append(MISSING)
                    result.findings.append(
                        Finding(
                            expected,
                            "the entry is missing from the store (deleted)",
                            kind="missing",
                        )
                    )
                    if frontier is not None:
                        frontier.append(MISSING)
                    expected += 1
                leaf = merkle.leaf_hash(data)
                leaves.append(leaf)
                if frontier is not None:
                    frontier.append(leaf)
                    if earlier is not None and frontier.size == earlier.size:
                        earlier_root = frontier.root()
                expected += 1
    while expected < end:
        leaves.append(MISSING)
        result.findings.append(
            Finding(expected, "the entry is missing from the store (deleted)", kind="missing")
        )
        expected += 1
    result.checked = len(leaves)
    tree = _Tree(store, start, leaves)
    if frontier is not None and end == size:
        root = frontier.root() if len(leaves) == size else await tree.recomputed(0, size)
    else:
        root = await tree.recomputed(0, size) if size else merkle.EMPTY_ROOT
    if root != trusted.root_hash:
        located = await _locate(tree, 0, size, trusted.root_hash)
        if all(f.index != located.index for f in result.findings):
            inside = start <= located.index < start + len(leaves)
            if located.end is None and not (inside and leaves[located.index - start] is MISSING):
                located = await _explain(store, located)
            result.findings.append(located)
    if earlier is not None:
        await _check_earlier(store, trusted, earlier, earlier_root, tree, result)
    result.findings = collapse_missing(result.findings, (await store.head()).size)
    return result


def collapse_missing(findings: list[Finding], stored_size: int) -> list[Finding]:
    """Sorted findings with each run of missing entries as one range; a run
    that reaches past the stored log's end is reported as a truncation."""
    out: list[Finding] = []
    for f in sorted(findings, key=lambda f: f.index):
        last = out[-1] if out else None
        if (
            f.kind == "missing"
            and last is not None
            and last.kind in ("missing", "truncated")
            and (last.end or last.index + 1) == f.index
        ):
            last.end = f.index + 1
            continue
        out.append(f)
    for f in out:
        if f.kind == "missing" and f.end is not None:
            f.message = "the entries are missing from the store (deleted)"
        if f.kind == "missing" and f.index >= stored_size:
            f.kind = "truncated"
            f.end = f.end or f.index + 1
            f.message = (
                f"the log was truncated: the store ends at {stored_size} entries and these "
                "entries, which a signed checkpoint commits to, are gone"
            )
    return out


def _fork(older: CheckpointBody, newer: CheckpointBody, matches: CheckpointBody) -> Finding:
    """Two signed checkpoints that cannot both describe one append-only log."""
    other = older if matches is newer else newer
    return Finding(
        0,
        f"FORK: the signed checkpoints of size {older.size} and of size {newer.size} contradict "
        f"each other; the stored entries match the one of size {matches.size}, and the one of "
        f"size {other.size} commits to a different history of its first "
        f"{min(older.size, newer.size)} entries: the signer signed two versions of the log",
        end=min(older.size, newer.size) or None,
        kind="fork",
    )


async def _check_earlier(
    store: AuditStore,
    trusted: CheckpointBody,
    earlier: CheckpointBody,
    earlier_root: bytes | None,
    tree: _Tree,
    result: Verification,
) -> None:
    if earlier.origin != trusted.origin:
        result.findings.append(
            Finding(0, f"the earlier checkpoint is of another log ({earlier.origin})", kind="other")
        )
        return
    # The entries verified against the trusted checkpoint: what contradicts
    # them in another signed checkpoint is a fork, not a changed entry.
    trusted_ok = not result.findings
    if earlier.size > trusted.size:
        await _check_newer(store, trusted, earlier, tree, result, trusted_ok)
        return
    if earlier_root is None:
        earlier_root = await tree.recomputed(0, earlier.size) if earlier.size else merkle.EMPTY_ROOT
    if earlier_root != earlier.root_hash:
        if trusted_ok:
            result.findings.append(_fork(earlier, trusted, trusted))
            return
        located = await _locate(tree, 0, earlier.size, earlier.root_hash) if earlier.size else None
        finding = located or Finding(0, "the log's first entries changed")
        finding = await _explain(store, finding)
        finding.message += f" (against the earlier checkpoint of size {earlier.size})"
        result.findings.append(finding)
        return
    await _check_proof(store, earlier, trusted, result)


async def _check_newer(
    store: AuditStore,
    trusted: CheckpointBody,
    newer: CheckpointBody,
    tree: _Tree,
    result: Verification,
    trusted_ok: bool,
) -> None:
    """``--earlier`` named a checkpoint newer than the trusted one: the log
    must extend the trusted checkpoint to the newer one."""
    extra: list[bytes] = []
    missing: list[int] = []
    expected = trusted.size
    async for batch in store.scan(trusted.size, newer.size):
        for position, data in batch:
            if position < expected:
                continue
            while expected < position:
                missing.append(expected)
                extra.append(MISSING)
                expected += 1
            extra.append(merkle.leaf_hash(data))
            expected += 1
    while expected < newer.size:
        missing.append(expected)
        extra.append(MISSING)
        expected += 1
    for index in missing:
        result.findings.append(
            Finding(
                index,
                f"the entry is missing from the store (deleted; the checkpoint of size "
                f"{newer.size} commits to it)",
                kind="missing",
            )
        )
    if missing:
        return
    if tree.end == trusted.size:
        longer = _Tree(store, tree.start, tree.leaves + extra)
    else:
        longer = _Tree(store, trusted.size, extra)
    if await longer.recomputed(0, newer.size) == newer.root_hash:
        await _check_proof(store, trusted, newer, result)
        return
    located = await _locate(longer, 0, newer.size, newer.root_hash)
    if trusted_ok and located.index < trusted.size:
        result.findings.append(_fork(trusted, newer, trusted))
        return
    if located.end is None:
        located = await _explain(store, located)
    located.message += f" (against the newer checkpoint of size {newer.size})"
    result.findings.append(located)


async def _check_proof(
    store: AuditStore, older: CheckpointBody, newer: CheckpointBody, result: Verification
) -> None:
    """The stored tree's consistency proof from ``older`` to ``newer`` must
    also satisfy a standard RFC 6962 verifier."""
    ranges = merkle.consistency_ranges(older.size, newer.size)
    nodes = merkle.proof_nodes(ranges)
    hashes = await store.nodes(nodes)
    proof = merkle.assemble(ranges, hashes) if all(hashes) else []
    if not merkle.verify_consistency(
        older.size, newer.size, proof, older.root_hash, newer.root_hash
    ):
        result.findings.append(
            Finding(
                0,
                f"the stored tree's consistency proof from size {older.size} to {newer.size} "
                "does not verify",
                end=newer.size,
                kind="other",
            )
        )
    else:
        result.notes.append(
            f"consistent with the earlier checkpoint of size {older.size}: the log of size "
            f"{newer.size} extends it (consistency proof verified)"
        )
