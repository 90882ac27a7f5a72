"""What every service of the mesh uses from auth: token verification with keys
from auth-service's JWKS, and RBAC decisions from the shared role store.

Neither makes a network call per request: keys are cached (``JwksCache``),
and the RBAC snapshot is reloaded only when its version counter moves, checked
at most once per ``refresh`` seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from google.protobuf import json_format

from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc
from autoecoops.kernel.auth.rbac import BUILTIN_ROLES, Policy
from autoecoops.kernel.auth.settings import AuthSettings
from autoecoops.kernel.auth.store import AuthStore
from autoecoops.kernel.auth.verify import IssuerPolicy, JwksCache, JwtVerifier
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


def secure(runtime: Runtime) -> Runtime:
    """Give ``runtime`` the mesh's verifier and RBAC authorizer (needs Redis)."""
    settings = AuthSettings.from_env(runtime.config)
    runtime.verifier = mesh_verifier(settings, runtime.clients)
    if runtime.config.redis_url:
        runtime.authorizer = RbacAuthorizer(AuthStore(runtime.redis, runtime.key("auth")))
    return runtime
