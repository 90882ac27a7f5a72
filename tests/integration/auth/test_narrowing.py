"""Issue 12, cases 1-9: a token only ever narrows, and audience-bound tokens are
enforced, against running services, a real Redis and a real local OIDC issuer."""

from __future__ import annotations

import time
from typing import Any

import grpc
import jwt
import pytest
from google.rpc import error_details_pb2, status_pb2

from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc
from autoecoops.kernel.auth.store import AuthStore
from autoecoops.kernel.mesh.errors import STATUS_DETAILS_KEY
from autoecoops.kernel.mesh.server import Mesh
from autoecoops.memory.v1 import memory_pb2
from tests.conftest import MintToken, StartMesh
from tests.integration.auth.test_auth_service import (
    OidcIssuer,
    auth_stub,
    bearer,
    memory_stub,
    reason,
)


def body(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


async def settle(mesh: Mesh) -> None:
    """Wait until the mesh's authorizer holds the RBAC version in the store."""
    version = await AuthStore(mesh.runtime.redis, mesh.runtime.key("auth")).rbac_version()
    assert await mesh.runtime.authorizer.wait_for_version(version, 5.0)  # type: ignore[union-attr]


async def exchange(auth: auth_pb2_grpc.AuthServiceStub, subject: str, **kw: Any) -> str:
    kw.setdefault("audience", "autoecoops")
    reply = await auth.ExchangeToken(auth_pb2.ExchangeTokenRequest(subject_token=subject, **kw))
    return str(reply.access_token)


async def denied(call: Any) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return reason(info.value)


# -- 1. scope ---------------------------------------------------------------------


async def test_re_exchange_never_widens_the_scope(mesh: Mesh, mint_token: MintToken) -> None:
    auth, memory = auth_stub(mesh), memory_stub(mesh)
    user = mint_token("u", ["admin"])
    narrow = await exchange(auth, user, scopes=["memory.namespaces.list"])
    assert body(narrow)["scope"] == "memory.namespaces.list"
    await memory.ListNamespaces(memory_pb2.ListNamespacesRequest(), metadata=bearer(narrow))
    code, why, meta = await denied(
        auth.ListRoles(auth_pb2.ListRolesRequest(), metadata=bearer(narrow))
    )
    assert (code, why, meta["permission"]) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_MISSING",
        "auth.roles.list",
    )
    # No scope asked: the subject token's scope, not a full token.
    again = await exchange(auth, narrow)
    assert body(again)["scope"] == "memory.namespaces.list"
    for call in (
        auth.ListRoles(auth_pb2.ListRolesRequest(), metadata=bearer(again)),
        memory.CreateNamespace(
            memory_pb2.CreateNamespaceRequest(namespace=memory_pb2.Namespace(name="grab")),
            metadata=bearer(again),
        ),
    ):
        assert (await denied(call))[:2] == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_MISSING")
    # Asking for more than the subject token carries is refused, nothing issued.
    for wider in (["*"], ["auth.*"], ["memory.namespaces.list", "auth.roles.list"]):
        code, why, meta = await denied(
            auth.ExchangeToken(
                auth_pb2.ExchangeTokenRequest(
                    subject_token=narrow, audience="autoecoops", scopes=wider
                )
            )
        )
        assert (code, why) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_WIDENING"), wider
        assert meta["scope"] in wider
    # The same scope, or a narrower token of it, is fine; the reply names it.
    reply = await auth.ExchangeToken(
        auth_pb2.ExchangeTokenRequest(
            subject_token=narrow, audience="autoecoops", scopes=["memory.namespaces.list"]
        )
    )
    assert body(reply.access_token)["scope"] == "memory.namespaces.list"
    assert list(reply.scopes) == ["memory.namespaces.list"]
    # An unscoped token may be scoped to what its subject holds, not beyond.
    viewer = mint_token("v", ["viewer"])
    code, why, _ = await denied(
        auth.ExchangeToken(
            auth_pb2.ExchangeTokenRequest(
                subject_token=viewer, audience="autoecoops", scopes=["auth.keys.rotate"]
            )
        )
    )
    assert (code, why) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_WIDENING")


# -- 2 and 3. audience ------------------------------------------------------------


async def test_a_service_bound_token_is_accepted_only_by_that_service(
    mesh: Mesh, mint_token: MintToken
) -> None:
    auth, memory = auth_stub(mesh), memory_stub(mesh)
    user = mint_token("u", ["admin"])
    for bound in (
        await exchange(auth, user, audience="event-bus"),
        mint_token("u", ["admin"], audience="event-bus"),
    ):
        assert body(bound)["aud"] == "event-bus"
        for call in (
            memory.ListNamespaces(memory_pb2.ListNamespacesRequest(), metadata=bearer(bound)),
            auth.ListRoles(auth_pb2.ListRolesRequest(), metadata=bearer(bound)),
        ):
            assert (await denied(call))[:2] == (
                grpc.StatusCode.UNAUTHENTICATED,
                "AUDIENCE_MISMATCH",
            )
    # A token for memory-hub works at memory-hub only; the mesh-wide one everywhere.
    for_memory = await exchange(auth, user, audience="memory-hub")
    await memory.ListNamespaces(memory_pb2.ListNamespacesRequest(), metadata=bearer(for_memory))
    assert (await denied(auth.ListRoles(auth_pb2.ListRolesRequest(), metadata=bearer(for_memory))))[
        1
    ] == "AUDIENCE_MISMATCH"
    await memory.ListNamespaces(memory_pb2.ListNamespacesRequest(), metadata=bearer(user))
    await auth.ListRoles(auth_pb2.ListRolesRequest(), metadata=bearer(user))
    # A plain user token carries the mesh-wide audience.
    assert body(user)["aud"] == "autoecoops"


async def test_re_exchange_never_widens_the_audience(mesh: Mesh, mint_token: MintToken) -> None:
    auth = auth_stub(mesh)
    for_memory = await exchange(auth, mint_token("u", ["admin"]), audience="memory-hub")
    for wider in ("autoecoops", "event-bus"):
        code, why, meta = await denied(
            auth.ExchangeToken(
                auth_pb2.ExchangeTokenRequest(subject_token=for_memory, audience=wider)
            )
        )
        assert (code, why, meta["audience"]) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "AUDIENCE_WIDENING",
            wider,
        )
    assert body(await exchange(auth, for_memory, audience="memory-hub"))["aud"] == "memory-hub"


# -- 4. act -----------------------------------------------------------------------


async def test_act_is_kept_and_nested_and_never_outlives_the_subject(
    mesh: Mesh, mint_token: MintToken
) -> None:
    auth = auth_stub(mesh)
    alice = mint_token("alice", ["viewer"], ttl=120)
    platform, agent = mint_token("platform", ["viewer"]), mint_token("agent", ["viewer"])
    delegated = await exchange(auth, alice, actor_token=platform, audience="memory-hub")
    assert body(delegated)["act"] == {"sub": "platform"}
    # Re-exchanged without an actor: still delegated, not a plain user token.
    kept = await exchange(auth, delegated, audience="memory-hub")
    assert body(kept)["sub"] == "alice" and body(kept)["act"] == {"sub": "platform"}
    # With another actor the chain grows, the newest actor outermost.
    chained = await exchange(auth, kept, actor_token=agent, audience="memory-hub")
    assert body(chained)["act"] == {"sub": "agent", "act": {"sub": "platform"}}
    admin = bearer(mint_token("root", ["admin"]))
    seen = await auth.VerifyToken(auth_pb2.VerifyTokenRequest(token=chained), metadata=admin)
    assert list(seen.principal.actors) == ["agent", "platform"]
    for token in (delegated, kept, chained):
        assert body(token)["exp"] <= body(alice)["exp"]


# -- 5. IssueToken scopes ---------------------------------------------------------


async def test_issue_token_refuses_scopes_the_account_does_not_hold(
    mesh: Mesh, mint_token: MintToken
) -> None:
    auth = auth_stub(mesh)
    admin = bearer(mint_token("root", ["admin"]))
    created = await auth.CreateServiceAccount(
        auth_pb2.CreateServiceAccountRequest(
            service_account=auth_pb2.ServiceAccount(name="reader", roles=["viewer"])
        ),
        metadata=admin,
    )
    creds = {"client_id": "reader", "client_secret": created.client_secret}
    for scopes in (["*", "auth.keys.rotate"], ["auth.keys.rotate"], ["*"], ["auth.roles.*"]):
        code, why, _ = await denied(
            auth.IssueToken(auth_pb2.IssueTokenRequest(scopes=scopes, **creds))
        )
        assert (code, why) == (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_WIDENING"), scopes
    # Held scopes are granted, and the token carries exactly those.
    issued = await auth.IssueToken(
        auth_pb2.IssueTokenRequest(scopes=["auth.roles.list", "memory.documents.search"], **creds)
    )
    assert body(issued.access_token)["scope"] == "auth.roles.list memory.documents.search"
    assert list(issued.scopes) == ["auth.roles.list", "memory.documents.search"]
    # Bad credentials are still INVALID_CLIENT first, whatever the scopes.
    code, why, _ = await denied(
        auth.IssueToken(
            auth_pb2.IssueTokenRequest(client_id="reader", client_secret="x" * 40, scopes=["*"])
        )
    )
    assert (code, why) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CLIENT")


# -- 6. token types ---------------------------------------------------------------


async def test_exchange_accepts_only_the_documented_token_types(
    mesh: Mesh, mint_token: MintToken
) -> None:
    auth = auth_stub(mesh)
    user = mint_token("u", ["viewer"])
    for request, field in (
        (
            auth_pb2.ExchangeTokenRequest(
                subject_token=user,
                subject_token_type="urn:ietf:params:oauth:token-type:refresh_token",
                audience="autoecoops",
            ),
            "subject_token_type",
        ),
        (
            auth_pb2.ExchangeTokenRequest(
                subject_token=user, subject_token_type="saml2", audience="autoecoops"
            ),
            "subject_token_type",
        ),
        (
            auth_pb2.ExchangeTokenRequest(
                subject_token=user,
                actor_token=user,
                actor_token_type="urn:ietf:params:oauth:token-type:id_token",
                audience="autoecoops",
            ),
            "actor_token_type",
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await auth.ExchangeToken(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        bad = error_details_pb2.BadRequest()
        raw = dict(info.value.trailing_metadata() or ())[STATUS_DETAILS_KEY]
        assert any(d.Unpack(bad) for d in status_pb2.Status.FromString(raw).details)
        assert [v.field for v in bad.field_violations] == [field]
    for kind in (
        "urn:ietf:params:oauth:token-type:access_token",
        "urn:ietf:params:oauth:token-type:jwt",
    ):
        await exchange(auth, user, subject_token_type=kind)


# -- 7. the same principal both ways ----------------------------------------------


async def test_verify_names_an_external_principal_as_its_exchanged_token(
    mesh: Mesh, mint_token: MintToken, oidc: OidcIssuer
) -> None:
    auth = auth_stub(mesh)
    admin = bearer(mint_token("root", ["admin"]))
    await auth.CreateTrustedIssuer(
        auth_pb2.CreateTrustedIssuerRequest(
            trusted_issuer=auth_pb2.TrustedIssuer(
                name="corp",
                issuer_url=oidc.url,
                audiences=["autoecoops"],
                algorithms=["RS256"],
                group_roles=[auth_pb2.GroupRoleMapping(group="sre", roles=["viewer"])],
            )
        ),
        metadata=admin,
    )
    external = oidc.token("alice", "k1", ["sre", "dev"])
    direct = (
        await auth.VerifyToken(auth_pb2.VerifyTokenRequest(token=external), metadata=admin)
    ).principal
    ours = await exchange(auth, external)
    via_exchange = (
        await auth.VerifyToken(auth_pb2.VerifyTokenRequest(token=ours), metadata=admin)
    ).principal
    assert direct.subject == via_exchange.subject == "corp:alice"
    assert list(direct.groups) == list(via_exchange.groups) == ["corp:sre", "corp:dev"]
    assert list(direct.roles) == list(via_exchange.roles) == ["viewer"]
    assert direct.issuer == oidc.url and via_exchange.issuer == mesh_issuer(mesh)


def mesh_issuer(mesh: Mesh) -> str:
    from autoecoops.kernel.auth.settings import AuthSettings

    return AuthSettings.from_env(mesh.config).issuer


# -- 8. discovery and JWKS --------------------------------------------------------


async def test_discovery_follows_the_gateway_and_jwks_members_fit_the_key_type(
    start_mesh: StartMesh, mint_token: MintToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOECOOPS_GATEWAY_PORT", "18123")
    mesh = await start_mesh(["auth-service", "policy-audit"], secure=True)
    auth = auth_stub(mesh)
    doc = await auth.GetOpenIdConfiguration(auth_pb2.GetOpenIdConfigurationRequest())
    assert doc.issuer == "http://127.0.0.1:18123"
    assert doc.jwks_uri == "http://127.0.0.1:18123/.well-known/jwks.json"
    assert doc.token_endpoint == "http://127.0.0.1:18123/v1/auth/token"
    # Our tokens name the same issuer (tokens of the default one are not ours here).
    own = await mesh.runtime.clients.token_source.token()  # type: ignore[union-attr]
    assert body(own)["iss"] == "http://127.0.0.1:18123"
    # The JWK Set: exactly the members of each key type.
    admin = bearer(
        jwt.encode(
            {
                "iss": "http://127.0.0.1:18123",
                "sub": "root",
                "aud": "autoecoops",
                "iat": int(time.time()),
                "exp": int(time.time()) + 60,
                "roles": ["admin"],
            },
            mint_token.ring.signer().private,
            algorithm="ES256",
            headers={"kid": mint_token.ring.signer().meta.kid},
        )
    )
    await auth.RotateSigningKey(auth_pb2.RotateSigningKeyRequest(algorithm="RS256"), metadata=admin)
    reply = await auth.GetJwks(auth_pb2.GetJwksRequest())
    keys = {k["kty"]: k for k in reply.jwk_set["keys"]}
    assert set(keys["EC"]) == {"kty", "kid", "use", "alg", "crv", "x", "y"}
    assert set(keys["RSA"]) == {"kty", "kid", "use", "alg", "n", "e"}
    assert (keys["EC"]["alg"], keys["EC"]["crv"], keys["RSA"]["alg"]) == ("ES256", "P-256", "RS256")
    assert [k.kid for k in reply.keys] == [k["kid"] for k in reply.jwk_set["keys"]]


async def test_an_explicit_issuer_wins_over_the_gateway_address(
    start_mesh: StartMesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOECOOPS_GATEWAY_PORT", "18124")
    monkeypatch.setenv("AUTOECOOPS_AUTH_ISSUER", "https://id.example.com/")
    mesh = await start_mesh(["auth-service", "policy-audit"], secure=True)
    doc = await auth_stub(mesh).GetOpenIdConfiguration(auth_pb2.GetOpenIdConfigurationRequest())
    assert (doc.issuer, doc.jwks_uri) == (
        "https://id.example.com",
        "https://id.example.com/.well-known/jwks.json",
    )


# -- 9. namespace-scoped delegation -----------------------------------------------


async def test_a_namespace_admin_delegates_inside_its_namespace_only(
    mesh: Mesh, mint_token: MintToken
) -> None:
    auth = auth_stub(mesh)
    admin = bearer(mint_token("root", ["admin"]))
    for name, permissions in (
        ("ns-admin", ["auth.rolebindings.*", "memory.*"]),
        ("searcher", ["memory.documents.search"]),
    ):
        await auth.CreateRole(
            auth_pb2.CreateRoleRequest(role=auth_pb2.Role(name=name, permissions=permissions)),
            metadata=admin,
        )
    await auth.CreateRoleBinding(
        auth_pb2.CreateRoleBindingRequest(
            role_binding=auth_pb2.RoleBinding(
                name="nadia-admin-team-a",
                role="ns-admin",
                namespace="team-a",
                subjects=[auth_pb2.Subject(kind=auth_pb2.SUBJECT_KIND_USER, name="nadia")],
            )
        ),
        metadata=admin,
    )
    await settle(mesh)
    nadia = bearer(mint_token("nadia"))

    def binding(name: str, role: str, namespace: str) -> auth_pb2.CreateRoleBindingRequest:
        return auth_pb2.CreateRoleBindingRequest(
            role_binding=auth_pb2.RoleBinding(
                name=name,
                role=role,
                namespace=namespace,
                subjects=[auth_pb2.Subject(kind=auth_pb2.SUBJECT_KIND_USER, name="omar")],
            )
        )

    made = await auth.CreateRoleBinding(
        binding("omar-search", "searcher", "team-a"), metadata=nadia
    )
    assert made.role_binding.namespace == "team-a"
    listed = await auth.ListRoleBindings(
        auth_pb2.ListRoleBindingsRequest(namespace="team-a"), metadata=nadia
    )
    assert {b.name for b in listed.role_bindings} == {"nadia-admin-team-a", "omar-search"}
    # Not in another namespace, not cluster-wide: the permission is missing there.
    for namespace in ("team-b", ""):
        code, why, meta = await denied(
            auth.CreateRoleBinding(
                binding(f"omar-{namespace or 'all'}", "searcher", namespace), metadata=nadia
            )
        )
        assert (code, why, meta["permission"]) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "PERMISSION_MISSING",
            "auth.rolebindings.create",
        )
    # Escalation checks are unchanged: not a role it does not hold in team-a.
    code, why, _ = await denied(
        auth.CreateRoleBinding(binding("omar-admin", "admin", "team-a"), metadata=nadia)
    )
    assert (code, why) == (grpc.StatusCode.PERMISSION_DENIED, "ESCALATION_DENIED")
    all_bindings = await auth.ListRoleBindings(auth_pb2.ListRoleBindingsRequest(), metadata=admin)
    assert {b.name for b in all_bindings.role_bindings} == {"nadia-admin-team-a", "omar-search"}


async def test_the_gateway_serves_discovery_and_an_exact_jwk_set_at_its_own_address(
    start_mesh: StartMesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx

    from autoecoops.gateway.server import start_gateway
    from autoecoops.gateway.settings import GatewaySettings
    from tests.conftest import free_port

    port = free_port()
    monkeypatch.setenv("AUTOECOOPS_GATEWAY_PORT", str(port))
    mesh = await start_mesh(["auth-service", "policy-audit"], secure=True)
    gateway = await start_gateway(mesh.config, GatewaySettings.from_env())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            doc = (await http.get("/.well-known/openid-configuration")).json()
            jwks = (await http.get(doc["jwks_uri"].removeprefix(f"http://127.0.0.1:{port}"))).json()
    finally:
        await gateway.stop()
    assert doc["issuer"] == f"http://127.0.0.1:{port}"
    assert doc["jwks_uri"] == f"http://127.0.0.1:{port}/.well-known/jwks.json"
    assert doc["token_endpoint"] == f"http://127.0.0.1:{port}/v1/auth/token"
    (key,) = jwks["keys"]
    assert set(jwks) == {"keys"}
    assert set(key) == {"kty", "kid", "use", "alg", "crv", "x", "y"}
    assert (key["kty"], key["crv"], key["alg"], key["use"]) == ("EC", "P-256", "ES256", "sig")
