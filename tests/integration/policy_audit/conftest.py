"""An audit log on the real Redis, under the test's own key prefix."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from autoecoops.audit.v1 import audit_pb2
from autoecoops.kernel.mesh.redis import connect
from autoecoops.kernel.policy_audit.checkpoint import NoteSigner
from autoecoops.kernel.policy_audit.store import AuditStore
from autoecoops.kernel.policy_audit.trail import AuditLog
from tests.conftest import base_key

ORIGIN = "test.autoecoops/audit"


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def signer() -> NoteSigner:
    return NoteSigner.generate(ORIGIN)


@pytest.fixture
async def audit(
    redis_client: aioredis.Redis, redis_url: str, key_prefix: str, signer: NoteSigner
) -> AsyncIterator[AuditLog]:
    log = AuditLog(
        AuditStore(redis_client, base_key(redis_url, key_prefix, "policy-audit") + ":{audit}"),
        signer,
        ORIGIN,
        max_entry_bytes=4096,
    )
    yield log
    await log.close()


def entry(n: int, **over: object) -> audit_pb2.AuditEntry:
    """A plausible entry numbered ``n``."""
    fields: dict[str, object] = {
        "type": "deployment.applied",
        "service": "iaops",
        "action": "deployments.create",
        "resource": f"iaops/deployments/web-{n}",
        "outcome": audit_pb2.OUTCOME_SUCCESS,
    }
    fields.update(over)
    e = audit_pb2.AuditEntry(**fields)  # type: ignore[arg-type]
    e.actor.subject = "alice"
    e.details.update({"n": n})
    return e
