"""What every service of the mesh uses from auth: token verification with keys
from auth-service's JWKS, and RBAC decisions from the shared role store.

Neither makes a network call per request: keys are cached (``JwksCache``),
and the RBAC snapshot is reloaded only when its version counter moves, checked
at most once per ``refresh`` seconds.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from google.protobuf import json_format

from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc
from autoecoops.kernel.auth.rbac import BUILTIN_ROLES, Policy
from autoecoops.kernel.auth.settings import AuthSettings
from autoecoops.kernel.auth.store import AuthStore
from autoecoops.kernel.auth.verify import IssuerPolicy, JwksCache, JwtVerifier
from autoecoops.kernel.mesh.audit import AuditTrail
from autoecoops.kernel.mesh.auth import Principal
from autoecoops.kernel.mesh.clients import ClientFactory
from autoecoops.kernel.mesh.config import SERVICE_NAMES
from autoecoops.kernel.mesh.server import Runtime


def mesh_audiences(
    settings: AuthSettings, services: Iterable[str] = SERVICE_NAMES
) -> frozenset[str]:
    """Audiences a mesh service accepts: the mesh-wide one and each service's name."""
    return frozenset({settings.audience, *services})


def grpc_jwks_fetcher(clients: ClientFactory) -> Any:
    """Fetch auth-service's JWKS over gRPC (GetJwks is public)."""

    async def fetch() -> Sequence[Mapping[str, Any]]:
        stub = clients.stub(auth_pb2_grpc.AuthServiceStub, "auth-service")
        reply = await stub.GetJwks(auth_pb2.GetJwksRequest(), timeout=5.0)
        return [
            {
                k: v
                for k, v in json_format.MessageToDict(key, preserving_proto_field_name=True).items()
                if v
            }
            for key in reply.keys
        ]

    return fetch


def mesh_verifier(
    settings: AuthSettings, clients: ClientFactory, services: Iterable[str] = SERVICE_NAMES
) -> JwtVerifier:
    """The verifier of a non-auth service: our issuer only, keys via auth-service's JWKS."""
    cache = JwksCache(
        grpc_jwks_fetcher(clients), ttl=settings.jwks_ttl, cooldown=settings.jwks_cooldown
    )
    policy = IssuerPolicy(
        issuer=settings.issuer,
        keys=cache,
        audiences=mesh_audiences(settings, services),
        algorithms=frozenset({"ES256", "RS256"}),
        trust_roles_claim=True,
    )
    return JwtVerifier([policy], leeway=settings.leeway, cache_size=settings.cache_size)


class RbacAuthorizer:
    """The mesh's Authorizer: RBAC over a cached snapshot of roles and bindings."""

    def __init__(self, store: AuthStore, refresh: float = 1.0) -> None:
        self._store = store
        self._refresh = refresh
        self._policy = Policy({r.name: r for r in BUILTIN_ROLES})
        self._version = -1
        self._checked = 0.0
        self._lock = asyncio.Lock()

    async def policy(self) -> Policy:
        """The current snapshot, reloaded if the store's version moved."""
        if time.monotonic() - self._checked >= self._refresh:
            async with self._lock:
                if time.monotonic() - self._checked >= self._refresh:
                    version = await self._store.rbac_version()
                    if version != self._version:
                        self._version, policy = await self._store.policy()
                        roles = {r.name: r for r in BUILTIN_ROLES}
                        roles.update(policy.roles)
                        self._policy = Policy(roles, policy.bindings)
                    self._checked = time.monotonic()
        return self._policy

    async def check(self, principal: Principal, permission: str, namespace: str = "") -> None:
        """Raise PERMISSION_DENIED unless ``principal`` holds ``permission`` (in ``namespace``)."""
        (await self.policy()).check(principal, permission, namespace)


class ServiceIdentity:
    """A mesh service's own token, and delegated tokens for calls on a user's behalf.

    The own token comes from client credentials when
    ``AUTOECOOPS_SERVICE_CLIENT_ID``/``_SECRET`` are set (Kubernetes: a
    Secret per service), else it is minted from the local key ring when this
    process shares auth-service's data directory (`autoecoops up`), else
    there is none and calls fail UNAUTHENTICATED rather than pretend.
    """

    def __init__(
        self, settings: AuthSettings, clients: ClientFactory, env: Mapping[str, str] | None = None
    ) -> None:
        env = os.environ if env is None else env
        self._settings = settings
        self._clients = clients
        self.name = env.get("AUTOECOOPS_SERVICE_NAME", "").strip() or "mesh"
        self._client_id = env.get("AUTOECOOPS_SERVICE_CLIENT_ID", "").strip()
        self._secret = env.get("AUTOECOOPS_SERVICE_CLIENT_SECRET", "").strip()
        self._token, self._exp = "", 0.0
        self._delegated: dict[tuple[str, str], tuple[str, float]] = {}
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        """The service's own token, refreshed a minute before it expires."""
        if self._token and self._exp - 60 > time.time():
            return self._token
        async with self._lock:
            if not (self._token and self._exp - 60 > time.time()):
                self._token, self._exp = await self._fetch()
        return self._token

    async def _fetch(self) -> tuple[str, float]:
        if self._client_id:
            stub = self._clients.stub(auth_pb2_grpc.AuthServiceStub, "auth-service")
            reply = await stub.IssueToken(
                auth_pb2.IssueTokenRequest(client_id=self._client_id, client_secret=self._secret),
                timeout=10.0,
            )
            return reply.access_token, reply.expire_time.ToNanoseconds() / 1e9
        if (self._settings.key_dir / "keys.json").exists():
            from autoecoops.kernel.auth.keys import KeyRing
            from autoecoops.kernel.auth.tokens import Issuer

            s = self._settings
            ring = KeyRing(s.key_dir, publish_delay=s.publish_delay, max_token_ttl=s.max_token_ttl)
            ring.load_or_create(s.signing_alg)
            issued = Issuer(s.issuer, ring).issue(
                f"system:{self.name}", s.audience, s.token_ttl, roles=["mesh-service"]
            )
            return issued.token, issued.expires_at
        return "", time.time() + 60

    async def on_behalf_of(self, principal: Principal, audience: str) -> list[tuple[str, str]]:
        """Metadata with a token for ``principal`` towards ``audience``, this service in ``act``."""
        key = (principal.token, audience)
        hit = self._delegated.get(key)
        if hit is None or hit[1] - 30 < time.time():
            stub = self._clients.stub(auth_pb2_grpc.AuthServiceStub, "auth-service")
            reply = await stub.ExchangeToken(
                auth_pb2.ExchangeTokenRequest(
                    subject_token=principal.token, actor_token=await self.token(), audience=audience
                )
            )
            hit = (reply.access_token, reply.expire_time.ToNanoseconds() / 1e9)
            if len(self._delegated) > 10_000:
                self._delegated.clear()
            self._delegated[key] = hit
        return [("authorization", f"Bearer {hit[0]}")]


def secure(runtime: Runtime) -> Runtime:
    """Give ``runtime`` the mesh's verifier, RBAC authorizer and service identity."""
    settings = AuthSettings.from_env(runtime.config)
    runtime.verifier = mesh_verifier(settings, runtime.clients)
    identity = ServiceIdentity(settings, runtime.clients)
    runtime.clients.token_source = identity
    runtime.auditor = AuditTrail(runtime.clients, identity.name)
    if runtime.config.redis_url:
        runtime.authorizer = RbacAuthorizer(AuthStore(runtime.redis, runtime.key("auth")))
    return runtime
