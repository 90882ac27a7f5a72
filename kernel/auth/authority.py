"""auth-service's logic: issuing, exchanging and verifying tokens, managing RBAC
with escalation checks, and keeping the federation in step with the store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

from autoecoops.kernel.auth.federation import Federation, check_issuer_url
from autoecoops.kernel.auth.keys import KeyRing
from autoecoops.kernel.auth.mesh import RbacAuthorizer, mesh_audiences
from autoecoops.kernel.auth.rbac import (
    BUILTIN_ROLES,
    Binding,
    Policy,
    Role,
    check_name,
    check_permission_syntax,
    validate_binding,
    validate_role,
)
from autoecoops.kernel.auth.settings import AuthSettings
from autoecoops.kernel.auth.store import (
    AuthStore,
    ServiceAccount,
    check_secret,
    hash_secret,
)
from autoecoops.kernel.auth.tokens import IssuedToken, Issuer
from autoecoops.kernel.auth.verify import IssuerPolicy, JwtVerifier
from autoecoops.kernel.mesh.auth import Principal
from autoecoops.kernel.mesh.errors import (
    AlreadyExists,
    FieldViolation,
    InvalidArgument,
    Unauthenticated,
)

log = logging.getLogger("autoecoops.auth")

_DUMMY_HASH = hash_secret("not-a-real-secret")


class LocalKeys:
    """The key ring as a KeySource: auth-service verifies its own tokens without a fetch."""

    def __init__(self, ring: KeyRing) -> None:
        self._ring = ring

    async def key(self, kid: str) -> tuple[str, Any] | None:
        """(alg, public key) of a published key."""
        return self._ring.public_keys().get(kid)


class Authority:
    """The issuer, the verifiers and RBAC administration of auth-service."""

    def __init__(self, settings: AuthSettings, ring: KeyRing, store: AuthStore) -> None:
        self.settings = settings
        self.ring = ring
        self.store = store
        self.issuer = Issuer(settings.issuer, ring)
        self.federation = Federation(cooldown=settings.jwks_cooldown)
        self.authorizer = RbacAuthorizer(store)
        self._own = IssuerPolicy(
            issuer=settings.issuer,
            keys=LocalKeys(ring),
            audiences=mesh_audiences(settings),
            trust_roles_claim=True,
        )
        #: Verifies mesh tokens for auth-service's own interceptor.
        self.verifier = JwtVerifier(
            [self._own], leeway=settings.leeway, cache_size=settings.cache_size
        )
        #: Verifies our tokens and every trusted issuer's (VerifyToken, ExchangeToken).
        self.federated = JwtVerifier(
            [self._own], leeway=settings.leeway, cache_size=settings.cache_size
        )
        self._issuer_names: dict[str, str] = {}
        self._issuers_version = -1

    async def start(self, seed: dict[str, Any] | None = None) -> None:
        """Create the built-in roles and whatever the seed file declares (if absent)."""
        existing = {r.name for r in await self.store.list_roles()}
        for role in BUILTIN_ROLES:
            if role.name not in existing:
                await _ignore_exists(self.store.create_role(role))
        if seed:
            await self._apply_seed(seed)
        await self.refresh_issuers()

    async def close(self) -> None:
        """Release HTTP clients."""
        await self.federation.close()

    async def _apply_seed(self, seed: dict[str, Any]) -> None:
        from autoecoops.kernel.auth.seed import parse_seed

        roles, bindings, accounts, issuers = parse_seed(seed)
        for role in roles:
            validate_role(role)
            await _ignore_exists(self.store.create_role(role))
        for binding in bindings:
            validate_binding(binding)
            await _ignore_exists(self.store.create_binding(binding))
        for account, secret in accounts:
            if await self.store.get_account(account.name) is None:
                await _ignore_exists(self.store.create_account(account, secret))
        for issuer in issuers:
            check_issuer_url(issuer.issuer_url)
            # Issuers from config are authoritative: the file wins over runtime edits.
            try:
                await self.store.put_issuer(issuer, "create")
            except AlreadyExists:
                await self.store.put_issuer(issuer, "update")

    async def refresh_issuers(self) -> None:
        """Reload trusted issuers into the federated verifier if they changed."""
        version = await self.store.issuers_version()
        if version == self._issuers_version:
            return
        issuers = await self.store.list_issuers()
        self.federated.set_issuers([self._own, *(self.federation.policy(i) for i in issuers)])
        self._issuer_names = {i.issuer_url: i.name for i in issuers}
        self._issuers_version = version

    # -- tokens ---------------------------------------------------------------

    def _audience(self, audience: str) -> str:
        audience = audience or self.settings.audience
        if audience not in mesh_audiences(self.settings):
            raise InvalidArgument(
                f"audience {audience!r} is not served by this mesh",
                field_violations=[
                    FieldViolation("audience", "must be the mesh audience or a service name")
                ],
            )
        return audience

    async def issue_for_account(
        self, client_id: str, secret: str, audience: str, scopes: Sequence[str]
    ) -> IssuedToken:
        """Client credentials: a token for a service account whose secret matches."""
        aud = self._audience(audience)
        for i, scope in enumerate(scopes):
            check_permission_syntax(scope, f"scopes[{i}]")
        account = await self.store.get_account(client_id)
        # Hash even for unknown accounts, so timing does not reveal which exist.
        ok = await asyncio.to_thread(
            check_secret, secret, account.secret_hash if account else _DUMMY_HASH
        )
        if account is None or not ok:
            raise Unauthenticated("invalid client credentials", reason="INVALID_CLIENT")
        return self.issuer.issue(
            account.name,
            aud,
            self.settings.token_ttl,
            roles=account.roles,
            scopes=scopes,
            extra={"client_id": account.name},
        )

    def _external_name(self, principal: Principal) -> tuple[str, tuple[str, ...]]:
        """Subject and groups of a principal, namespaced by issuer unless it is ours."""
        if principal.issuer == self.settings.issuer:
            return principal.subject, principal.groups
        name = self._issuer_names.get(principal.issuer, principal.issuer)
        return f"{name}:{principal.subject}", tuple(f"{name}:{g}" for g in principal.groups)

    async def exchange(
        self, subject_token: str, actor_token: str, audience: str, scopes: Sequence[str]
    ) -> IssuedToken:
        """RFC 8693: a trusted token becomes ours for ``audience``; an actor goes in ``act``."""
        aud = self._audience(audience)
        await self.refresh_issuers()
        subject = await self.federated.verify(subject_token)
        sub, groups = self._external_name(subject)
        act: dict[str, Any] | None = None
        if actor_token:
            actor = await self.federated.verify(actor_token)
            actor_sub, _ = self._external_name(actor)
            act = {"sub": actor_sub}
            prior = subject.claims.get("act")
            if isinstance(prior, dict):
                act["act"] = prior  # RFC 8693 4.1: earlier actors nest inside
        remaining = float(subject.claims["exp"]) - time.time()
        ttl = max(1.0, min(self.settings.token_ttl, remaining))
        for i, scope in enumerate(scopes):
            check_permission_syntax(scope, f"scopes[{i}]")
        return self.issuer.issue(
            sub, aud, ttl, roles=subject.roles, groups=groups, scopes=scopes, act=act
        )

    async def introspect(self, token: str, audience: str) -> Principal:
        """Verify any trusted token (ours or federated); optionally demand an audience."""
        await self.refresh_issuers()
        principal = await self.federated.verify(token)
        if audience:
            aud = principal.claims.get("aud")
            auds = [aud] if isinstance(aud, str) else list(aud or [])
            if audience not in auds:
                raise Unauthenticated(
                    "token rejected: the token is not meant for this audience",
                    reason="AUDIENCE_MISMATCH",
                )
        return principal

    # -- RBAC administration ----------------------------------------------------

    async def _policy(self) -> Policy:
        _, policy = await self.store.policy()
        roles = {r.name: r for r in BUILTIN_ROLES}
        roles.update(policy.roles)
        return Policy(roles, policy.bindings)

    async def create_role(self, caller: Principal, role: Role) -> Role:
        """Create a role whose permissions the caller holds cluster-wide."""
        validate_role(role)
        (await self._policy()).check_no_escalation(caller, role.permissions)
        return await self.store.create_role(role)

    async def update_role(self, caller: Principal, role: Role) -> Role:
        """Replace a role; the caller must hold every permission of the new version."""
        validate_role(role)
        (await self._policy()).check_no_escalation(caller, role.permissions)
        return await self.store.update_role(role)

    async def _check_binding(self, caller: Principal, binding: Binding) -> None:
        """A valid binding to an existing role whose permissions the caller holds where it applies."""
        validate_binding(binding)
        policy = await self._policy()
        role = policy.roles.get(binding.role)
        if role is None:
            raise InvalidArgument(
                f"role {binding.role!r} does not exist",
                field_violations=[FieldViolation("role_binding.role", "unknown role")],
            )
        policy.check_no_escalation(caller, role.permissions, binding.namespace)

    async def create_binding(self, caller: Principal, binding: Binding) -> Binding:
        """Bind a role; the caller must hold the role's permissions where it applies."""
        await self._check_binding(caller, binding)
        return await self.store.create_binding(binding)

    async def update_binding(self, caller: Principal, binding: Binding) -> Binding:
        """Replace a binding, with the same escalation check as creation."""
        await self._check_binding(caller, binding)
        return await self.store.update_binding(binding)

    async def create_account(
        self, caller: Principal, account: ServiceAccount, secret: str
    ) -> ServiceAccount:
        """A service account may only get roles whose permissions the caller holds."""
        check_name(account.name, "service_account.name")
        policy = await self._policy()
        for role_name in account.roles:
            role = policy.roles.get(role_name)
            if role is None:
                raise InvalidArgument(
                    f"role {role_name!r} does not exist",
                    field_violations=[
                        FieldViolation("service_account.roles", f"unknown role {role_name}")
                    ],
                )
            policy.check_no_escalation(caller, role.permissions)
        return await self.store.create_account(account, secret)

    async def check(self, principal: Principal, permission: str, namespace: str) -> str | None:
        """What grants ``permission`` to ``principal``, or None."""
        check_permission_syntax(permission)
        return (await self._policy()).allowed(principal, permission, namespace)


async def _ignore_exists(coro: Any) -> None:
    with contextlib.suppress(AlreadyExists):
        await coro
