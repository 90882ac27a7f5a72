"""The plain logic behind issue 12: what a scope may ask for, the per-service
audience view of the verifier, the issuer URL, JWK members, and a watcher's
copy of RBAC applying snapshots, changes and bookmarks."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoecoops.kernel.auth.authority import audiences_of, check_token_type, scopes_of
from autoecoops.kernel.auth.keys import KeyRing
from autoecoops.kernel.auth.mesh import ServiceVerifier
from autoecoops.kernel.auth.rbac import Binding, Policy, Role, Subject
from autoecoops.kernel.auth.settings import AuthSettings
from autoecoops.kernel.auth.store import Change
from autoecoops.kernel.auth.tokens import Issuer
from autoecoops.kernel.auth.verify import IssuerPolicy, JwtVerifier
from autoecoops.kernel.auth.watch import Bookmark, RbacState, Snapshot
from autoecoops.kernel.mesh.auth import Principal
from autoecoops.kernel.mesh.config import MeshConfig
from autoecoops.kernel.mesh.errors import InvalidArgument, Unauthenticated


def test_holds_anywhere_counts_roles_and_bindings_in_any_namespace() -> None:
    policy = Policy(
        {
            "viewer": Role("viewer", ("*.*.get", "*.*.list")),
            "writer": Role("writer", ("memory.documents.*",)),
        },
        [Binding("w", "writer", (Subject("serviceaccount", "ci"),), namespace="team-a")],
    )
    ci = Principal(subject="ci", roles=("viewer",))
    assert policy.holds_anywhere(ci, "auth.roles.list")
    assert policy.holds_anywhere(ci, "memory.documents.delete")  # held in team-a
    assert not policy.holds_anywhere(ci, "auth.keys.rotate")
    assert not policy.holds_anywhere(ci, "*")
    assert not policy.holds_anywhere(ci, "memory.*")  # wider than memory.documents.*


def test_claims_helpers() -> None:
    assert audiences_of({"aud": "autoecoops"}) == ("autoecoops",)
    assert audiences_of({"aud": ["memory-hub", "event-bus"]}) == ("memory-hub", "event-bus")
    assert scopes_of({"scope": "a.b.c  d.e.f"}) == ("a.b.c", "d.e.f")
    assert scopes_of({}) is None and scopes_of({"scope": " "}) is None
    check_token_type("", "subject_token_type")
    check_token_type("urn:ietf:params:oauth:token-type:jwt", "subject_token_type")
    with pytest.raises(InvalidArgument) as info:
        check_token_type("urn:ietf:params:oauth:token-type:refresh_token", "subject_token_type")
    assert [v.field for v in info.value.field_violations] == ["subject_token_type"]


class _Keys:
    def __init__(self, ring: KeyRing) -> None:
        self.ring = ring

    async def key(self, kid: str) -> tuple[str, object] | None:
        return self.ring.public_keys().get(kid)


async def test_each_service_accepts_the_mesh_audience_and_its_own(tmp_path: Path) -> None:
    ring = KeyRing(tmp_path, publish_delay=0, max_token_ttl=3600)
    ring.load_or_create("ES256")
    issuer = Issuer("https://iss", ring)
    audiences = frozenset({"autoecoops", "memory-hub", "event-bus"})
    inner = JwtVerifier([IssuerPolicy("https://iss", _Keys(ring), audiences)])
    memory = ServiceVerifier(inner, "autoecoops").for_service("memory-hub")
    bus = ServiceVerifier(inner, "autoecoops").for_service("event-bus")
    everywhere = issuer.issue("u", "autoecoops", 60).token
    for_bus = issuer.issue("u", "event-bus", 60).token
    both = issuer.issue("u", ["event-bus", "memory-hub"], 60).token
    assert (await memory.verify(everywhere)).subject == "u"
    assert (await bus.verify(for_bus)).subject == "u"
    assert (await memory.verify(both)).subject == "u"
    for _ in range(2):  # a cached verification is still checked against the service
        with pytest.raises(Unauthenticated) as info:
            await memory.verify(for_bus)
        assert info.value.reason == "AUDIENCE_MISMATCH"


@pytest.mark.parametrize(
    ("env", "issuer"),
    [
        ({}, "http://127.0.0.1:8080"),
        ({"AUTOECOOPS_GATEWAY_PORT": "9090"}, "http://127.0.0.1:9090"),
        ({"AUTOECOOPS_GATEWAY_PORT": "0"}, "http://127.0.0.1:8080"),
        (
            {"AUTOECOOPS_GATEWAY_PORT": "9090", "AUTOECOOPS_AUTH_ISSUER": "https://id.example/"},
            "https://id.example",
        ),
    ],
)
def test_issuer_follows_the_gateway_unless_set(env: dict[str, str], issuer: str) -> None:
    assert AuthSettings.from_env(MeshConfig(), env).issuer == issuer


def test_issuer_on_all_interfaces_and_ipv6() -> None:
    assert AuthSettings.from_env(MeshConfig(host="0.0.0.0"), {}).issuer == "http://127.0.0.1:8080"
    assert AuthSettings.from_env(MeshConfig(host="::1"), {}).issuer == "http://[::1]:8080"


@pytest.mark.parametrize(
    ("alg", "members"),
    [("ES256", {"crv", "x", "y"}), ("RS256", {"n", "e"})],
)
def test_jwk_members_are_exactly_those_of_the_key_type(
    tmp_path: Path, alg: str, members: set[str]
) -> None:
    ring = KeyRing(tmp_path, publish_delay=0, max_token_ttl=3600)
    ring.load_or_create(alg)
    (jwk,) = ring.jwks()
    assert set(jwk) == {"kty", "kid", "use", "alg"} | members
    assert all(isinstance(v, str) and v for v in jwk.values())


def test_rbac_state_applies_snapshot_changes_and_bookmarks() -> None:
    state = RbacState()
    bob = Principal(subject="bob")
    state.apply(Bookmark(3))  # nothing to be current with yet: still no policy
    assert state.policy is None and state.version == 0
    state.apply(Snapshot(5, (Role("reader", ("memory.*.get",)),), ()))
    assert state.version == 5 and state.policy is not None
    assert state.policy.allowed(bob, "memory.documents.get") is None
    binding = Binding("b", "reader", (Subject("user", "bob"),))
    state.apply(Change(6, "rolebinding", "create", "b", binding))
    assert state.policy.allowed(bob, "memory.documents.get") == "binding b"
    # Built-in roles are always there, even before a store has them.
    state.apply(Change(7, "rolebinding", "update", "b", Binding("b", "viewer", binding.subjects)))
    assert state.policy.allowed(bob, "auth.roles.list") == "binding b"
    state.apply(Change(8, "rolebinding", "delete", "b", None))
    assert state.policy.allowed(bob, "auth.roles.list") is None
    state.apply(Bookmark(8))
    assert state.version == 8
    # A new snapshot replaces everything held.
    state.apply(Snapshot(20, (), (binding,)))
    assert state.version == 20 and state.policy.allowed(bob, "memory.documents.get") is None
