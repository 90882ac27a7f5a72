"""auth-service and mesh authentication against running services and a real Redis.

Every rejection case goes through a real interceptor; federation runs against
a real local OIDC issuer (an HTTP server on 127.0.0.1 that signs its own
tokens and counts the requests it receives).
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.rpc import error_details_pb2, status_pb2
from jwt.algorithms import RSAAlgorithm

from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc
from autoecoops.kernel.mesh.errors import STATUS_DETAILS_KEY
from autoecoops.kernel.mesh.server import Mesh
from autoecoops.memory.v1 import memory_pb2, memory_pb2_grpc
from tests.conftest import MintToken, StartMesh

ISS = "http://127.0.0.1:8080"
#: Services re-check the RBAC store's version at most once a second.
RBAC_REFRESH = 1.1
#: JWKS refetch cooldown for these tests, in seconds.
COOLDOWN = 1.0


def reason(err: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    raw = dict(err.trailing_metadata() or ())[STATUS_DETAILS_KEY]
    info = error_details_pb2.ErrorInfo()
    for d in status_pb2.Status.FromString(raw).details:
        if d.Unpack(info):
            return err.code(), info.reason, dict(info.metadata)
    raise AssertionError("no ErrorInfo")


@pytest.fixture
async def mesh(
    start_mesh: StartMesh, mint_token: MintToken, monkeypatch: pytest.MonkeyPatch
) -> Mesh:
    monkeypatch.setenv("AUTOECOOPS_AUTH_JWKS_COOLDOWN_SECONDS", str(COOLDOWN))
    return await start_mesh(["auth-service", "policy-audit", "memory-hub"], secure=True)


def auth_stub(mesh: Mesh) -> auth_pb2_grpc.AuthServiceStub:
    return auth_pb2_grpc.AuthServiceStub(
        grpc.aio.insecure_channel(mesh.config.addr("auth-service"))
    )


def memory_stub(mesh: Mesh) -> memory_pb2_grpc.MemoryServiceStub:
    return memory_pb2_grpc.MemoryServiceStub(
        grpc.aio.insecure_channel(mesh.config.addr("memory-hub"))
    )


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def b64(data: dict[str, Any] | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {
        "iss": ISS,
        "sub": "mallory",
        "aud": "autoecoops",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "roles": ["admin"],
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


# -- rejection cases -----------------------------------------------------------


def _signed(mint_token: MintToken, **over: Any) -> str:
    """A token signed with the real key but with the given claims (None deletes one)."""
    key = mint_token.ring.signer()
    return jwt.encode(claims(**over), key.private, algorithm="ES256", headers={"kid": key.meta.kid})


def _forge_cases(mint_token: MintToken) -> dict[str, tuple[str, str]]:
    good = mint_token("mallory", ["admin"])
    head, body, sig = good.split(".")
    kid = jwt.get_unverified_header(good)["kid"]
    public_pem = mint_token.ring.signer().public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    hs = jwt.api_jws.PyJWS()
    hs._algorithms["HS256"].prepare_key = lambda k: k  # type: ignore[method-assign]
    hs256_with_public_key = hs.encode(
        json.dumps(claims()).encode(), public_pem, algorithm="HS256", headers={"kid": kid}
    )
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    return {
        "alg none": (f"{b64({'alg': 'none', 'kid': kid})}.{body}.", "ALGORITHM_NOT_ALLOWED"),
        "alg NoNe": (f"{b64({'alg': 'NoNe', 'kid': kid})}.{body}.", "ALGORITHM_NOT_ALLOWED"),
        "HS256 signed with the public key": (hs256_with_public_key, "ALGORITHM_NOT_ALLOWED"),
        "algorithm outside the allow-list": (
            jwt.encode(claims(), "x" * 64, algorithm="HS512", headers={"kid": kid}),
            "ALGORITHM_NOT_ALLOWED",
        ),
        "missing exp": (_signed(mint_token, exp=None), "CLAIM_MISSING"),
        "missing iat": (_signed(mint_token, iat=None), "CLAIM_MISSING"),
        "missing iss": (_signed(mint_token, iss=None), "CLAIM_MISSING"),
        "missing aud": (_signed(mint_token, aud=None), "CLAIM_MISSING"),
        "missing sub": (_signed(mint_token, sub=None), "CLAIM_MISSING"),
        "expired": (
            _signed(mint_token, exp=now - 120, iat=now - 600, nbf=now - 600),
            "TOKEN_EXPIRED",
        ),
        "nbf in the future": (_signed(mint_token, nbf=now + 600), "TOKEN_NOT_YET_VALID"),
        "iat in the future": (_signed(mint_token, iat=now + 600), "TOKEN_NOT_YET_VALID"),
        "wrong iss": (_signed(mint_token, iss="https://evil.example"), "ISSUER_UNTRUSTED"),
        "wrong aud": (_signed(mint_token, aud="someone-else"), "AUDIENCE_MISMATCH"),
        "unknown kid": (
            jwt.encode(claims(), other, algorithm="RS256", headers={"kid": "nope"}),
            "KEY_UNKNOWN",
        ),
        "bad signature": (f"{head}.{body}.{sig[:-6]}AAAAAA", "TOKEN_INVALID"),
        "signed by another key with our kid": (
            jwt.encode(claims(), other, algorithm="RS256", headers={"kid": kid}),
            "ALGORITHM_NOT_ALLOWED",
        ),
        "malformed": ("not-a-jwt", "TOKEN_MALFORMED"),
        "jku header is never followed": (
            jwt.encode(
                claims(),
                other,
                algorithm="RS256",
                headers={"kid": "attacker", "jku": "http://127.0.0.1:1/jwks"},
            ),
            "KEY_UNKNOWN",
        ),
    }


async def test_every_bad_token_is_unauthenticated_with_a_reason(
    mesh: Mesh, mint_token: MintToken
) -> None:
    auth, memory = auth_stub(mesh), memory_stub(mesh)
    for name, (token, want) in _forge_cases(mint_token).items():
        for call in (
            lambda md: auth.ListRoles(auth_pb2.ListRolesRequest(), metadata=md),
            lambda md: memory.ListNamespaces(memory_pb2.ListNamespacesRequest(), metadata=md),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(bearer(token))
            code, got, _ = reason(info.value)
            assert (code, got) == (grpc.StatusCode.UNAUTHENTICATED, want), name
            assert (
                "BEGIN" not in info.value.details() and "kid" not in info.value.details().lower()
            ), name
    # ...and a good token still works afterwards.
    reply = await auth.ListRoles(
        auth_pb2.ListRolesRequest(), metadata=bearer(mint_token("alice", ["admin"]))
    )
    assert "admin" in [r.name for r in reply.roles]


# -- RBAC -------------------------------------------------------------------------


async def test_rbac_allow_deny_and_namespace_scope(mesh: Mesh, mint_token: MintToken) -> None:
    auth, memory = auth_stub(mesh), memory_stub(mesh)
    admin = bearer(mint_token("root", ["admin"]))
    await auth.CreateRole(
        auth_pb2.CreateRoleRequest(
            role=auth_pb2.Role(
                name="searcher", permissions=["memory.documents.search", "memory.*.get"]
            )
        ),
        metadata=admin,
    )
    await auth.CreateRoleBinding(
        auth_pb2.CreateRoleBindingRequest(
            role_binding=auth_pb2.RoleBinding(
                name="team-a-search",
                role="searcher",
                namespace="team-a",
                subjects=[auth_pb2.Subject(kind=auth_pb2.SUBJECT_KIND_GROUP, name="team-a")],
            )
        ),
        metadata=admin,
    )
    member = bearer(mint_token("bob", groups=["team-a"]))
    # Allowed in team-a: the call passes auth and reaches memory-hub.
    await asyncio.sleep(RBAC_REFRESH)
    try:
        await memory.Search(
            memory_pb2.SearchRequest(namespace="team-a", query="disk full"), metadata=member
        )
    except grpc.aio.AioRpcError as err:
        assert err.code() not in (
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
        ), err.details()
    # Denied in team-b, naming the permission.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await memory.Search(
            memory_pb2.SearchRequest(namespace="team-b", query="disk full"), metadata=member
        )
    code, why, meta = reason(info.value)
    assert (code, why, meta["permission"], meta["namespace"]) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_MISSING",
        "memory.documents.search",
        "team-b",
    )
    # Denied for a permission the role does not have, even in team-a.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await memory.DeleteDocument(
            memory_pb2.DeleteDocumentRequest(namespace="team-a", document_id="x"), metadata=member
        )
    assert reason(info.value)[1] == "PERMISSION_MISSING"
    # CheckPermission answers the same question directly.
    check = await auth.CheckPermission(
        auth_pb2.CheckPermissionRequest(
            principal=auth_pb2.Principal(subject="bob", groups=["team-a"]),
            permission="memory.documents.search",
            namespace="team-a",
        ),
        metadata=admin,
    )
    assert check.allowed and check.granted_by == "binding team-a-search"
    check = await auth.CheckPermission(
        auth_pb2.CheckPermissionRequest(
            principal=auth_pb2.Principal(subject="bob", groups=["team-a"]),
            permission="memory.documents.search",
            namespace="team-b",
        ),
        metadata=admin,
    )
    assert not check.allowed


async def test_escalation_is_refused(mesh: Mesh, mint_token: MintToken) -> None:
    auth = auth_stub(mesh)
    admin = bearer(mint_token("root", ["admin"]))
    await auth.CreateRole(
        auth_pb2.CreateRoleRequest(
            role=auth_pb2.Role(
                name="rbac-manager", permissions=["auth.roles.*", "auth.rolebindings.*"]
            )
        ),
        metadata=admin,
    )
    manager = bearer(mint_token("carol", ["rbac-manager"]))
    await asyncio.sleep(RBAC_REFRESH)
    for role in (
        auth_pb2.Role(name="superuser", permissions=["*"]),
        auth_pb2.Role(name="sneaky", permissions=["auth.roles.create", "memory.documents.delete"]),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await auth.CreateRole(auth_pb2.CreateRoleRequest(role=role), metadata=manager)
        assert reason(info.value)[:2] == (grpc.StatusCode.PERMISSION_DENIED, "ESCALATION_DENIED")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await auth.CreateRoleBinding(
            auth_pb2.CreateRoleBindingRequest(
                role_binding=auth_pb2.RoleBinding(
                    name="carol-admin",
                    role="admin",
                    subjects=[auth_pb2.Subject(kind=auth_pb2.SUBJECT_KIND_USER, name="carol")],
                )
            ),
            metadata=manager,
        )
    assert reason(info.value)[:2] == (grpc.StatusCode.PERMISSION_DENIED, "ESCALATION_DENIED")
    # Within what it holds, the manager may act.
    made = await auth.CreateRole(
        auth_pb2.CreateRoleRequest(
            role=auth_pb2.Role(
                name="role-reader", permissions=["auth.roles.get", "auth.roles.list"]
            )
        ),
        metadata=manager,
    )
    assert made.role.name == "role-reader" and made.role.create_time.seconds > 0
    bindings = await auth.ListRoleBindings(auth_pb2.ListRoleBindingsRequest(), metadata=admin)
    assert "carol-admin" not in [b.name for b in bindings.role_bindings]


async def test_bad_rbac_input_is_invalid_argument_and_stores_nothing(
    mesh: Mesh, mint_token: MintToken
) -> None:
    auth = auth_stub(mesh)
    admin = bearer(mint_token("root", ["admin"]))
    for role, field in (
        (auth_pb2.Role(name="Bad Name", permissions=["x.y.z"]), "role.name"),
        (auth_pb2.Role(name="empty"), "role.permissions"),
        (auth_pb2.Role(name="weird", permissions=["memory..get"]), "role.permissions[0]"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await auth.CreateRole(auth_pb2.CreateRoleRequest(role=role), metadata=admin)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        bad = error_details_pb2.BadRequest()
        raw = dict(info.value.trailing_metadata() or ())[STATUS_DETAILS_KEY]
        assert any(d.Unpack(bad) for d in status_pb2.Status.FromString(raw).details)
        assert bad.field_violations[0].field == field
    names = [
        r.name for r in (await auth.ListRoles(auth_pb2.ListRolesRequest(), metadata=admin)).roles
    ]
    assert not {"Bad Name", "empty", "weird"} & set(names)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await auth.GetRole(auth_pb2.GetRoleRequest(name="missing"), metadata=admin)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


# -- client credentials and exchange -------------------------------------------------


async def test_client_credentials_and_token_exchange_with_act(
    mesh: Mesh, mint_token: MintToken
) -> None:
    auth = auth_stub(mesh)
    admin = bearer(mint_token("root", ["admin"]))
    created = await auth.CreateServiceAccount(
        auth_pb2.CreateServiceAccountRequest(
            service_account=auth_pb2.ServiceAccount(name="platform-autoops", roles=["viewer"])
        ),
        metadata=admin,
    )
    secret = created.client_secret
    assert len(secret) >= 32
    listed = await auth.ListServiceAccounts(auth_pb2.ListServiceAccountsRequest(), metadata=admin)
    assert "scrypt" not in str(listed) and secret not in str(listed)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await auth.IssueToken(
            auth_pb2.IssueTokenRequest(client_id="platform-autoops", client_secret="wrong" * 8)
        )
    assert reason(info.value)[:2] == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CLIENT")
    issued = await auth.IssueToken(
        auth_pb2.IssueTokenRequest(client_id="platform-autoops", client_secret=secret)
    )
    service_token = issued.access_token
    body = jwt.decode(service_token, options={"verify_signature": False})
    assert body["sub"] == "platform-autoops" and body["roles"] == ["viewer"]
    assert {"iss", "sub", "aud", "exp", "iat", "nbf", "jti"} <= set(body)
    assert body["exp"] - body["iat"] == 900
    # A platform acts for alice towards memory-hub: alice stays the subject.
    alice = mint_token("alice", ["viewer"])
    exchanged = await auth.ExchangeToken(
        auth_pb2.ExchangeTokenRequest(
            subject_token=alice, actor_token=service_token, audience="memory-hub"
        )
    )
    verified = await auth.VerifyToken(
        auth_pb2.VerifyTokenRequest(token=exchanged.access_token), metadata=admin
    )
    assert verified.principal.subject == "alice"
    assert list(verified.principal.actors) == ["platform-autoops"]
    assert verified.claims["aud"] == "memory-hub"
    # Exchanging to an audience the mesh does not serve is refused.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await auth.ExchangeToken(
            auth_pb2.ExchangeTokenRequest(subject_token=alice, audience="elsewhere")
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_rotation_publishes_before_signing(mesh: Mesh, mint_token: MintToken) -> None:
    auth = auth_stub(mesh)
    admin = bearer(mint_token("root", ["admin"]))
    before = [k.kid for k in (await auth.GetJwks(auth_pb2.GetJwksRequest())).keys]
    rotated = await auth.RotateSigningKey(auth_pb2.RotateSigningKeyRequest(), metadata=admin)
    after = [k.kid for k in (await auth.GetJwks(auth_pb2.GetJwksRequest())).keys]
    assert after == [*before, rotated.kid]
    # Until verifiers' caches have expired (the JWKS TTL), the old key still signs.
    assert rotated.active_time.seconds >= int(time.time()) + 299
    token = mint_token("alice", ["admin"])
    assert jwt.get_unverified_header(token)["kid"] in before


# -- federation with a real local OIDC issuer ---------------------------------------


class OidcIssuer:
    """An OIDC issuer on 127.0.0.1 that signs its own RS256 tokens and counts fetches."""

    def __init__(self) -> None:
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.requests: list[str] = []
        self.down = False
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                issuer.requests.append(self.path)
                if issuer.down:
                    self.send_error(503)
                    return
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": f"{issuer.url}/keys"}
                elif self.path == "/keys":
                    keys = []
                    for kid, key in issuer.keys.items():
                        jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
                        keys.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
                    body = {"keys": keys}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.rotate("k1")

    def rotate(self, kid: str) -> None:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def token(
        self, sub: str, kid: str, groups: list[str], aud: str = "autoecoops", **extra: Any
    ) -> str:
        now = int(time.time())
        body = {
            "iss": self.url,
            "sub": sub,
            "aud": aud,
            "iat": now,
            "exp": now + 300,
            "groups": groups,
            **extra,
        }
        return jwt.encode(body, self.keys[kid], algorithm="RS256", headers={"kid": kid})

    def fetches(self) -> int:
        return self.requests.count("/keys")


@pytest.fixture
def oidc() -> Iterator[OidcIssuer]:
    issuer = OidcIssuer()
    yield issuer
    issuer.server.shutdown()


async def test_federation_exchange_rotation_cooldown_and_outage(
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
                groups_claim="groups",
                group_roles=[auth_pb2.GroupRoleMapping(group="sre", roles=["viewer"])],
            )
        ),
        metadata=admin,
    )
    # An external token becomes ours, with mapped roles and a namespaced subject.
    # Its own "roles" claim grants nothing here.
    ext = oidc.token("dana", "k1", ["sre"], roles=["admin"])
    ours = await auth.ExchangeToken(
        auth_pb2.ExchangeTokenRequest(subject_token=ext, audience="autoecoops")
    )
    verified = await auth.VerifyToken(
        auth_pb2.VerifyTokenRequest(token=ours.access_token), metadata=admin
    )
    assert verified.principal.subject == "corp:dana"
    assert list(verified.principal.roles) == ["viewer"]
    assert oidc.fetches() == 1
    # Known kid: served from cache, no fetch.
    await auth.VerifyToken(
        auth_pb2.VerifyTokenRequest(token=oidc.token("erin", "k1", [])), metadata=admin
    )
    assert oidc.fetches() == 1
    # The issuer rotates. Within the cooldown of the last fetch the new kid is
    # not fetched (and is refused); after it, exactly one refetch finds it.
    oidc.rotate("k2")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await auth.VerifyToken(
            auth_pb2.VerifyTokenRequest(token=oidc.token("erin", "k2", [])), metadata=admin
        )
    assert reason(info.value)[1] == "KEY_UNKNOWN"
    assert oidc.fetches() == 1
    await asyncio.sleep(COOLDOWN + 0.1)
    await auth.VerifyToken(
        auth_pb2.VerifyTokenRequest(token=oidc.token("erin", "k2", [])), metadata=admin
    )
    assert oidc.fetches() == 2

    async def flood(n: int) -> None:
        for i in range(n):
            now = int(time.time())
            forged = jwt.encode(
                {"iss": oidc.url, "sub": "x", "aud": "autoecoops", "iat": now, "exp": now + 60},
                oidc.keys["k1"],
                algorithm="RS256",
                headers={"kid": f"forged-{i}"},
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await auth.VerifyToken(auth_pb2.VerifyTokenRequest(token=forged), metadata=admin)
            assert reason(info.value)[1] == "KEY_UNKNOWN"

    # A flood of unknown kids right after a fetch causes no fetch at all...
    await flood(25)
    assert oidc.fetches() == 2
    # ...and after the cooldown, one fetch for the whole flood.
    await asyncio.sleep(COOLDOWN + 0.1)
    await flood(25)
    assert oidc.fetches() == 3
    # The issuer goes down: known keys keep verifying.
    oidc.down = True
    reply = await auth.VerifyToken(
        auth_pb2.VerifyTokenRequest(token=oidc.token("erin", "k2", [])), metadata=admin
    )
    assert reply.principal.subject == "corp:erin"  # named as its exchanged token is
    # Its tokens are not accepted by other services directly: only ours are.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await memory_stub(mesh).ListNamespaces(
            memory_pb2.ListNamespacesRequest(), metadata=bearer(ext)
        )
    assert reason(info.value)[:2] == (grpc.StatusCode.UNAUTHENTICATED, "ISSUER_UNTRUSTED")
    # Untrusting the issuer rejects its tokens from then on.
    await auth.DeleteTrustedIssuer(auth_pb2.DeleteTrustedIssuerRequest(name="corp"), metadata=admin)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await auth.ExchangeToken(
            auth_pb2.ExchangeTokenRequest(subject_token=ext, audience="autoecoops")
        )
    assert reason(info.value)[1] == "ISSUER_UNTRUSTED"


async def test_issuer_url_must_be_https_or_loopback(mesh: Mesh, mint_token: MintToken) -> None:
    auth = auth_stub(mesh)
    admin = bearer(mint_token("root", ["admin"]))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await auth.CreateTrustedIssuer(
            auth_pb2.CreateTrustedIssuerRequest(
                trusted_issuer=auth_pb2.TrustedIssuer(
                    name="plain", issuer_url="http://login.example.com"
                )
            ),
            metadata=admin,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_service_identity_and_calls_on_a_users_behalf(
    mesh: Mesh, mint_token: MintToken
) -> None:
    from autoecoops.kernel.auth.mesh import ServiceIdentity
    from autoecoops.kernel.mesh.auth import Principal

    identity = mesh.runtime.clients.token_source
    assert isinstance(identity, ServiceIdentity)
    own = jwt.decode(await identity.token(), options={"verify_signature": False})
    assert own["sub"] == "system:mesh" and own["roles"] == ["mesh-service"]
    # The client factory sends the service's token on calls that carry none.
    stub = mesh.runtime.clients.stub(auth_pb2_grpc.AuthServiceStub, "auth-service")
    reply = await stub.VerifyToken(auth_pb2.VerifyTokenRequest(token=mint_token("someone")))
    assert reply.principal.subject == "someone"
    # ...and the service holds only what mesh-service grants.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ListRoles(auth_pb2.ListRolesRequest())
    assert reason(info.value)[:2] == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_MISSING")
    # On a user's behalf: the user stays the subject, the service is the actor.
    alice = Principal(subject="alice", token=mint_token("alice", ["viewer"]))
    metadata = await identity.on_behalf_of(alice, "memory-hub")
    delegated = metadata[0][1].removeprefix("Bearer ")
    admin = bearer(mint_token("root", ["admin"]))
    seen = await auth_stub(mesh).VerifyToken(
        auth_pb2.VerifyTokenRequest(token=delegated), metadata=admin
    )
    assert (seen.principal.subject, list(seen.principal.actors)) == ("alice", ["system:mesh"])
    assert await identity.on_behalf_of(alice, "memory-hub") == metadata  # cached until near expiry


async def test_role_and_binding_changes_and_denials_are_audited(
    mesh: Mesh, mint_token: MintToken
) -> None:
    from autoecoops.audit.v1 import audit_pb2, audit_pb2_grpc

    auth = auth_stub(mesh)
    admin = bearer(mint_token("root", ["admin"]))
    await auth.CreateRole(
        auth_pb2.CreateRoleRequest(role=auth_pb2.Role(name="auditor", permissions=["audit.*"])),
        metadata=admin,
    )
    await auth.CreateRoleBinding(
        auth_pb2.CreateRoleBindingRequest(
            role_binding=auth_pb2.RoleBinding(
                name="ops-auditors",
                role="auditor",
                subjects=[auth_pb2.Subject(kind=auth_pb2.SUBJECT_KIND_GROUP, name="ops")],
            )
        ),
        metadata=admin,
    )
    await auth.DeleteRoleBinding(
        auth_pb2.DeleteRoleBindingRequest(name="ops-auditors"), metadata=admin
    )
    eve = bearer(mint_token("eve", ["viewer"]))
    with pytest.raises(grpc.aio.AioRpcError):
        await auth.CreateRole(
            auth_pb2.CreateRoleRequest(role=auth_pb2.Role(name="mine", permissions=["*"])),
            metadata=eve,
        )
    trail = audit_pb2_grpc.AuditServiceStub(
        grpc.aio.insecure_channel(mesh.config.addr("policy-audit"))
    )
    entries = (
        await trail.ListEntries(
            audit_pb2.ListEntriesRequest(type="rpc", page_size=100), metadata=admin
        )
    ).entries
    seen = [
        (e.action.rsplit(".", 1)[1], e.resource, e.actor.subject, e.outcome, e.service)
        for e in entries
    ]
    assert ("CreateRole", "role/auditor", "root", audit_pb2.OUTCOME_SUCCESS, "auth-service") in seen
    assert (
        "CreateRoleBinding",
        "role_binding/ops-auditors",
        "root",
        audit_pb2.OUTCOME_SUCCESS,
        "auth-service",
    ) in seen
    assert (
        "DeleteRoleBinding",
        "ops-auditors",
        "root",
        audit_pb2.OUTCOME_SUCCESS,
        "auth-service",
    ) in seen
    assert ("CreateRole", "role/mine", "eve", audit_pb2.OUTCOME_DENIED, "auth-service") in seen
    assert all(len(e.trace_id) == 32 for e in entries)


async def test_seed_file_creates_roles_bindings_accounts_and_issuers(
    start_mesh: StartMesh, mint_token: MintToken, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    seed = tmp_path / "seed.yaml"
    seed.write_text(
        """
roles:
  - {name: deployer, permissions: [infra.applications.*]}
bindings:
  - {name: ci-deployer, role: deployer, namespace: prod, subjects: [{kind: serviceaccount, name: ci}]}
serviceAccounts:
  - {name: ci, roles: [viewer], secretEnv: TEST_CI_SECRET}
trustedIssuers:
  - {name: corp, issuerUrl: "https://login.corp.example", audiences: [autoecoops], groupRoles: {sre: [admin]}}
"""
    )
    monkeypatch.setenv("AUTOECOOPS_AUTH_SEED_FILE", str(seed))
    monkeypatch.setenv("TEST_CI_SECRET", "s" * 24)
    mesh = await start_mesh(["auth-service", "policy-audit"], secure=True)
    auth = auth_stub(mesh)
    admin = bearer(mint_token("root", ["admin"]))
    assert (
        await auth.GetRole(auth_pb2.GetRoleRequest(name="deployer"), metadata=admin)
    ).role.permissions == ["infra.applications.*"]
    binding = (
        await auth.GetRoleBinding(
            auth_pb2.GetRoleBindingRequest(name="ci-deployer"), metadata=admin
        )
    ).role_binding
    assert (binding.namespace, binding.subjects[0].kind) == (
        "prod",
        auth_pb2.SUBJECT_KIND_SERVICE_ACCOUNT,
    )
    issued = await auth.IssueToken(
        auth_pb2.IssueTokenRequest(client_id="ci", client_secret="s" * 24)
    )
    assert jwt.decode(issued.access_token, options={"verify_signature": False})["sub"] == "ci"
    issuer = (
        await auth.GetTrustedIssuer(auth_pb2.GetTrustedIssuerRequest(name="corp"), metadata=admin)
    ).trusted_issuer
    assert issuer.issuer_url == "https://login.corp.example" and issuer.group_roles[0].roles == [
        "admin"
    ]


async def test_only_machine_ops_identity_may_create_service_accounts(
    mesh: Mesh, mint_token: MintToken
) -> None:
    """Minting node identities is machine-ops's alone (role machineops-service): another
    service's identity is refused, and machine-ops can grant no more than its role holds."""
    from autoecoops.kernel.auth.mesh import ServiceIdentity, own_clients
    from autoecoops.kernel.mesh.clients import ClientFactory

    identity = mesh.runtime.clients.token_source
    assert isinstance(identity, ServiceIdentity)
    account = auth_pb2.CreateServiceAccountRequest(
        service_account=auth_pb2.ServiceAccount(name="node.n1", roles=["machineops-agent"])
    )
    # memory-hub's identity (mesh-service only), as it calls in this very mesh.
    memory = ClientFactory(mesh.config)
    memory.token_source = identity.named("memory-hub", memory)
    claims = jwt.decode(await memory.token_source.token(), options={"verify_signature": False})
    assert (claims["sub"], claims["roles"]) == ("system:memory-hub", ["mesh-service"])
    as_memory = memory.stub(auth_pb2_grpc.AuthServiceStub, "auth-service")
    for call, req in [
        (as_memory.CreateServiceAccount, account),
        (as_memory.DeleteServiceAccount, auth_pb2.DeleteServiceAccountRequest(name="node.n1")),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(req)
        assert reason(info.value)[:2] == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_MISSING")

    # machine-ops's identity: its own clients carry system:machine-ops with its role.
    machine_ops = own_clients(mesh.runtime, "machine-ops")
    assert isinstance(machine_ops.token_source, ServiceIdentity)
    claims = jwt.decode(await machine_ops.token_source.token(), options={"verify_signature": False})
    assert (claims["sub"], sorted(claims["roles"])) == (
        "system:machine-ops",
        ["machineops-service", "mesh-service"],
    )
    as_mo = machine_ops.stub(auth_pb2_grpc.AuthServiceStub, "auth-service")
    made = await as_mo.CreateServiceAccount(account)
    assert list(made.service_account.roles) == ["machineops-agent"] and made.client_secret
    # The escalation check still holds: it cannot hand out a role it does not hold.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await as_mo.CreateServiceAccount(
            auth_pb2.CreateServiceAccountRequest(
                service_account=auth_pb2.ServiceAccount(name="node.n2", roles=["viewer"])
            )
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await as_mo.DeleteServiceAccount(auth_pb2.DeleteServiceAccountRequest(name="node.n1"))
    # Nor can it delete an account it could not have made: an admin's automation
    # (or another service's identity) carries permissions machine-ops does not hold.
    admin = bearer(mint_token("root", ["admin"]))
    as_admin = auth_stub(mesh)
    ci = auth_pb2.ServiceAccount(name="ci.deployer", roles=["viewer"])
    await as_admin.CreateServiceAccount(
        auth_pb2.CreateServiceAccountRequest(service_account=ci), metadata=admin
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await as_mo.DeleteServiceAccount(auth_pb2.DeleteServiceAccountRequest(name="ci.deployer"))
    assert reason(info.value)[:2] == (grpc.StatusCode.PERMISSION_DENIED, "ESCALATION_DENIED")
    got = await as_admin.ListServiceAccounts(auth_pb2.ListServiceAccountsRequest(), metadata=admin)
    assert "ci.deployer" in [a.name for a in got.service_accounts]  # nothing deleted
    await as_admin.DeleteServiceAccount(
        auth_pb2.DeleteServiceAccountRequest(name="ci.deployer"), metadata=admin
    )
    # What an account holds includes the bindings that name it: a node account
    # machine-ops made, later bound to viewer in one namespace, holds more than
    # machine-ops does, so it is refused until the binding is gone.
    node = auth_pb2.ServiceAccount(name="node.n3", roles=["machineops-agent"])
    await as_mo.CreateServiceAccount(auth_pb2.CreateServiceAccountRequest(service_account=node))
    binding = auth_pb2.RoleBinding(
        name="n3-viewer",
        role="viewer",
        namespace="team-a",
        subjects=[auth_pb2.Subject(kind=auth_pb2.SUBJECT_KIND_SERVICE_ACCOUNT, name="node.n3")],
    )
    await as_admin.CreateRoleBinding(
        auth_pb2.CreateRoleBindingRequest(role_binding=binding), metadata=admin
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await as_mo.DeleteServiceAccount(auth_pb2.DeleteServiceAccountRequest(name="node.n3"))
    assert reason(info.value)[:2] == (grpc.StatusCode.PERMISSION_DENIED, "ESCALATION_DENIED")
    assert "binding 'n3-viewer'" in (info.value.details() or "")
    await as_admin.DeleteRoleBinding(
        auth_pb2.DeleteRoleBindingRequest(name="n3-viewer"), metadata=admin
    )
    await as_mo.DeleteServiceAccount(auth_pb2.DeleteServiceAccountRequest(name="node.n3"))
    await memory.close()


async def test_a_restart_gives_built_in_roles_exactly_this_releases_permissions(
    start_mesh: StartMesh, mesh: Mesh, mint_token: MintToken
) -> None:
    """A store from a release where mesh-service could create accounts loses that at start."""
    from autoecoops.kernel.auth.rbac import Role
    from autoecoops.kernel.auth.store import AuthStore

    store = AuthStore(mesh.runtime.redis, mesh.runtime.key("auth"))
    old = (await store.get_role("mesh-service")).permissions
    await store.update_role(
        Role(
            "mesh-service",
            (*old, "auth.serviceaccounts.create", "auth.serviceaccounts.delete"),
            "what one mesh service needs from the others",
        )
    )
    await mesh.stop()
    again = await start_mesh(["auth-service"], secure=True)
    admin = bearer(mint_token("root", ["admin"]))
    got = await auth_stub(again).GetRole(
        auth_pb2.GetRoleRequest(name="mesh-service"), metadata=admin
    )
    assert sorted(got.role.permissions) == sorted(old)
    assert "auth.serviceaccounts.create" not in got.role.permissions
    got = await auth_stub(again).GetRole(
        auth_pb2.GetRoleRequest(name="machineops-service"), metadata=admin
    )
    assert "auth.serviceaccounts.create" in got.role.permissions
