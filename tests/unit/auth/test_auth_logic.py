"""auth's plain logic: permission matching, key rotation timing, the JWKS cache
and the verified-token cache, with a fake clock where time matters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from autoecoops.kernel.auth.keys import KeyRing
from autoecoops.kernel.auth.rbac import Binding, Policy, Role, Subject, matches
from autoecoops.kernel.auth.tokens import Issuer
from autoecoops.kernel.auth.verify import IssuerPolicy, JwksCache, JwtVerifier
from autoecoops.kernel.mesh.auth import Principal
from autoecoops.kernel.mesh.errors import PermissionDenied, Unauthenticated


@pytest.mark.parametrize(
    ("granted", "wanted", "ok"),
    [
        ("*", "memory.documents.search", True),
        ("memory.*", "memory.documents.search", True),
        ("memory.*", "memory.*", True),
        ("memory.*", "auth.roles.get", False),
        ("memory.documents.search", "memory.documents.search", True),
        ("memory.documents.search", "memory.documents.*", False),
        ("*.*.get", "auth.roles.get", True),
        ("*.*.get", "auth.roles.list", False),
        ("*.*.get", "auth.roles", False),
        ("memory.documents", "memory.documents.search", False),
    ],
)
def test_permission_patterns(granted: str, wanted: str, ok: bool) -> None:
    assert matches(granted, wanted) is ok


def test_policy_grants_by_role_group_and_namespace() -> None:
    policy = Policy(
        {"reader": Role("reader", ("memory.*.get",)), "admin": Role("admin", ("*",))},
        (Binding("b", "reader", (Subject("group", "team-a"),), "team-a"),),
    )
    bob = Principal("bob", groups=("team-a",))
    assert policy.allowed(bob, "memory.documents.get", "team-a") == "binding b"
    assert policy.allowed(bob, "memory.documents.get", "team-b") is None
    assert policy.allowed(bob, "memory.documents.get") is None  # namespace-scoped, not cluster-wide
    assert (
        policy.allowed(Principal("root", roles=("admin",)), "anything.at.all") == "token role admin"
    )
    # A down-scoped token is limited to its scopes even with admin.
    scoped = Principal("root", roles=("admin",), claims={"scope": "memory.*"})
    assert policy.allowed(scoped, "auth.roles.create") is None
    with pytest.raises(PermissionDenied) as info:
        policy.check(bob, "memory.documents.delete", "team-a")
    assert info.value.metadata == {"permission": "memory.documents.delete", "namespace": "team-a"}


def test_rotation_publishes_first_and_retires_after_the_last_token(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path, publish_delay=300, max_token_ttl=3600)
    ring.load_or_create("ES256")
    first = ring.keys[0].meta.kid
    t0 = ring.keys[0].meta.created + 10
    new = ring.rotate("RS256", now=t0)
    assert [k["kid"] for k in ring.jwks(now=t0)] == [first, new.meta.kid]
    assert ring.signer(now=t0 + 299).meta.kid == first  # published, not yet signing
    assert ring.signer(now=t0 + 300).meta.kid == new.meta.kid
    # The old key stays published until its last token (signed at t0+300) expires.
    assert first in [k["kid"] for k in ring.jwks(now=t0 + 300 + 3599)]
    assert [k["kid"] for k in ring.jwks(now=t0 + 300 + 3601)] == [new.meta.kid]
    # And the ring survives a restart from disk.
    again = KeyRing(tmp_path, publish_delay=300, max_token_ttl=3600)
    again.load_or_create()
    assert [k.meta.kid for k in again.keys] == [new.meta.kid]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_jwks_cache_ttl_cooldown_negative_cache_and_outage() -> None:
    clock = Clock()
    calls: list[float] = []
    jwks: list[Mapping[str, Any]] = []
    broken = False

    async def fetch() -> Sequence[Mapping[str, Any]]:
        calls.append(clock.now)
        if broken:
            raise ConnectionError("issuer down")
        return list(jwks)

    ring = KeyRing(Path("/nonexistent"), publish_delay=0, max_token_ttl=60)
    from autoecoops.kernel.auth.keys import KeyMeta, SigningKey, generate

    key = SigningKey(KeyMeta("k1", "ES256", 0, 0), generate("ES256"))
    del ring
    jwks.append(key.jwk())
    cache = JwksCache(fetch, ttl=100, cooldown=10, clock=clock)
    assert (await cache.key("k1")) is not None and len(calls) == 1
    clock.now = 50
    assert (await cache.key("k1")) is not None and len(calls) == 1  # fresh: no fetch
    for i in range(100):
        assert await cache.key(f"bogus-{i}") is None
    assert len(calls) == 2  # one refetch for the whole flood
    clock.now = 55
    assert await cache.key("bogus-1") is None and len(calls) == 2  # negative cache
    clock.now = 200  # stale, and the issuer is down: the known key keeps serving
    broken = True
    assert (await cache.key("k1")) is not None
    assert len(calls) == 3
    # A kid seen while the issuer is down is not remembered as unknown, and the
    # fetch is tried again a second later, not after the whole cooldown: a
    # restarted issuer's new key is accepted as soon as its JWKS answers.
    assert await cache.key("k2") is None and len(calls) == 3  # tried at 200 already
    clock.now = 201.5
    jwks.append(dict(jwks[0], kid="k2"))
    broken = False
    assert (await cache.key("k2")) is not None and len(calls) == 4


async def test_verified_tokens_are_cached_until_exp(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path, publish_delay=0, max_token_ttl=3600)
    ring.load_or_create()
    issuer = Issuer("https://iss", ring)

    class Keys:
        fetches = 0

        async def key(self, kid: str) -> tuple[str, Any] | None:
            Keys.fetches += 1
            return ring.public_keys().get(kid)

    clock = Clock()
    import time as _time

    clock.now = _time.time()
    verifier = JwtVerifier([IssuerPolicy("https://iss", Keys(), frozenset({"aud"}))], clock=clock)
    token = issuer.issue("alice", "aud", ttl=60).token
    first = await verifier.verify(token)
    second = await verifier.verify(token)
    assert first is second and Keys.fetches == 1
    # Past exp by the cache's clock, the entry is dropped and the token verified
    # again (PyJWT, on the real clock, still finds it valid).
    clock.now += 61
    third = await verifier.verify(token)
    assert third is not first and Keys.fetches == 2
    with pytest.raises(Unauthenticated):
        await verifier.verify(token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1])


def test_replicas_starting_together_on_one_data_dir_share_one_first_key(tmp_path: Path) -> None:
    """Auth-service replicas on a shared data directory, started at the same moment:
    one creates the first key, the others load it (not a key of their own that
    nobody else publishes). flock excludes across threads as across processes."""
    import threading

    for attempt in range(10):
        directory = tmp_path / f"keys{attempt}"
        start = threading.Barrier(6)
        kids: list[str] = []

        def replica(
            directory: Path = directory, start: threading.Barrier = start, kids: list[str] = kids
        ) -> None:
            ring = KeyRing(directory, publish_delay=0, max_token_ttl=60)
            start.wait()
            ring.load_or_create()
            kids.append(ring.signer().meta.kid)

        threads = [threading.Thread(target=replica) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(kids) == 6 and len(set(kids)) == 1, kids
