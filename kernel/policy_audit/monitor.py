"""Verifying the running log through its API, as a transparency-log monitor does.

Nothing the server says is taken on trust but what its pinned key signed:
the monitor fetches the latest signed checkpoint and opens it with the key it
was given; it fetches every entry in the range, rehashes each entry's exact
bytes into its leaf, checks the server's inclusion proof of that leaf against
the signed root (and, for the whole log, rebuilds the root from the leaves);
and for every checkpoint the user kept from an earlier run it checks a
consistency proof, so a log that was rewritten, rolled back or forked since
then is caught. It needs no access to Redis.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from autoecoops.audit.v1 import audit_pb2, audit_pb2_grpc
from autoecoops.kernel.mesh.errors import AutoEcoOpsError, from_rpc_error
from autoecoops.kernel.policy_audit import merkle
from autoecoops.kernel.policy_audit.checkpoint import CheckpointBody, NoteVerifier
from autoecoops.kernel.policy_audit.verify import Finding, Verification, collapse_missing


class LogApi(Protocol):
    """The read RPCs of the audit log that a monitor uses."""

    async def checkpoint(self) -> str:
        """The latest signed checkpoint (a C2SP signed note)."""
        ...

    async def entry(self, index: int) -> tuple[bytes, bytes]:
        """Entry ``index``: its exact bytes and the leaf hash the server claims."""
        ...

    async def inclusion(self, index: int, size: int) -> list[bytes]:
        """The audit path of entry ``index`` in the tree of ``size``."""
        ...

    async def consistency(self, old: int, new: int) -> list[bytes]:
        """A consistency proof from the tree of ``old`` to the tree of ``new``."""
        ...


@dataclass
class Monitored(Verification):
    """A ``Verification`` that also carries the signed checkpoint it checked."""

    note: str = ""
    body: CheckpointBody | None = None


async def monitor(
    api: LogApi,
    verifier: NoteVerifier,
    kept: Sequence[CheckpointBody] = (),
    start: int = 0,
    end: int | None = None,
    concurrency: int = 16,
) -> Monitored:
    """Check entries [start, end) of the served log against its latest signed
    checkpoint, and every ``kept`` checkpoint against that one.

    Raises ``checkpoint.NoteError`` when the served checkpoint does not verify
    with ``verifier`` (the server signs with another key, or lies).
    """
    note = await api.checkpoint()
    latest = CheckpointBody.parse(verifier.open(note))
    size = latest.size
    end = size if end is None else end
    if not 0 <= start <= end <= size:
        raise ValueError(f"range {start}..{end} is not within the served log's {size} entries")
    result = Monitored(size, start, end)
    result.note, result.body = note, latest
    leaves: dict[int, bytes] = {}
    gate = asyncio.Semaphore(concurrency)

    async def check(index: int) -> None:
        async with gate:
            try:
                data, claimed = await api.entry(index)
                leaf = merkle.leaf_hash(data)
                proof = await api.inclusion(index, size)
            except AutoEcoOpsError as err:
                result.findings.append(
                    Finding(
                        index,
                        f"the server cannot serve an entry its checkpoint commits to ({err.message})",
                        kind="missing",
                    )
                )
                return
        leaves[index] = leaf
        if claimed and claimed != leaf:
            result.findings.append(
                Finding(index, "the server's leaf hash is not the hash of the entry's bytes")
            )
        if not merkle.verify_inclusion(index, size, leaf, proof, latest.root_hash):
            result.findings.append(Finding(index, _why_not_included(index, data), kind="changed"))

    await asyncio.gather(*(check(i) for i in range(start, end)))
    result.checked = len(leaves)
    if start == 0 and end == size and len(leaves) == size:
        frontier = merkle.Frontier()
        for i in range(size):
            frontier.append(leaves[i])
        if frontier.root() != latest.root_hash and not result.findings:
            result.findings.append(
                Finding(0, "the entries do not hash to the signed root", end=size)
            )
    for older in kept:
        await _check_kept(api, latest, older, result)
    result.findings = collapse_missing(result.findings, size)
    return result


def _why_not_included(index: int, data: bytes) -> str:
    try:
        claimed = int(json.loads(data).get("index", "0"))
    except (ValueError, AttributeError):
        return "the entry is not valid JSON and is not in the signed tree (modified)"
    if claimed != index:
        return f"the entry served here is entry {claimed} (entries were inserted, deleted or reordered)"
    return "the entry's content was modified: it is not in the signed tree at this index"


async def _check_kept(
    api: LogApi, latest: CheckpointBody, kept: CheckpointBody, result: Verification
) -> None:
    """The served log must extend a checkpoint the user kept from an earlier run."""
    if kept.origin != latest.origin:
        result.findings.append(
            Finding(0, f"the kept checkpoint is of another log ({kept.origin})", kind="other")
        )
        return
    if kept.size > latest.size:
        result.findings.append(
            Finding(
                latest.size,
                f"the log was truncated or rolled back: the server signs size {latest.size} "
                f"now, but signed size {kept.size} before; these entries are gone",
                end=kept.size,
                kind="truncated",
            )
        )
        return
    if kept.size == latest.size:
        consistent = kept.root_hash == latest.root_hash
    elif kept.size == 0:
        consistent = kept.root_hash == merkle.EMPTY_ROOT
    else:
        try:
            proof = await api.consistency(kept.size, latest.size)
        except AutoEcoOpsError as err:
            result.findings.append(
                Finding(
                    0,
                    f"the server gives no consistency proof from size {kept.size}: {err.message}",
                    kind="other",
                )
            )
            return
        consistent = merkle.verify_consistency(
            kept.size, latest.size, proof, kept.root_hash, latest.root_hash
        )
    if consistent:
        result.notes.append(
            f"consistent with the kept checkpoint of size {kept.size}: the log of size "
            f"{latest.size} extends it (consistency proof verified)"
        )
        return
    result.findings.append(
        Finding(
            0,
            f"FORK: the signed checkpoint of size {kept.size} you kept and the server's signed "
            f"checkpoint of size {latest.size} contradict each other (no consistency proof "
            "joins them): the log was rewritten or forked since you kept it",
            end=kept.size or None,
            kind="fork",
        )
    )


class GrpcLogApi:
    """``LogApi`` over the AuditService of a running policy-audit."""

    def __init__(
        self,
        stub: audit_pb2_grpc.AuditServiceStub,
        metadata: Sequence[tuple[str, str]],
        timeout: float,
    ) -> None:
        self._stub = stub
        self._md = list(metadata)
        self._timeout = timeout

    async def _call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self._stub, method)(
                request, metadata=self._md, timeout=self._timeout
            )
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None

    async def checkpoint(self) -> str:
        """The latest signed checkpoint."""
        got = await self._call("GetCheckpoint", audit_pb2.GetCheckpointRequest())
        return str(got.checkpoint.signed_note)

    async def entry(self, index: int) -> tuple[bytes, bytes]:
        """Entry bytes and the server's leaf hash."""
        got = await self._call("GetEntry", audit_pb2.GetEntryRequest(index=index))
        return bytes(got.entry_bytes), bytes(got.leaf_hash)

    async def inclusion(self, index: int, size: int) -> list[bytes]:
        """An inclusion proof."""
        got = await self._call(
            "GetInclusionProof", audit_pb2.GetInclusionProofRequest(index=index, tree_size=size)
        )
        return list(got.hashes)

    async def consistency(self, old: int, new: int) -> list[bytes]:
        """A consistency proof."""
        got = await self._call(
            "GetConsistencyProof",
            audit_pb2.GetConsistencyProofRequest(old_size=old, new_size=new),
        )
        return list(got.hashes)
