"""auth-service's logic: issuing, exchanging and verifying tokens, managing RBAC
with escalation checks, and keeping the federation in step with the store."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from autoecoops.kernel.auth.federation import Federation, check_issuer_url
from autoecoops.kernel.auth.keys import KeyRing
from autoecoops.kernel.auth.mesh import mesh_audiences
from autoecoops.kernel.auth.rbac import (
    BUILTIN_ROLES,
    SERVICE_ROLES,
    Binding,
    Policy,
    Role,
    check_name,
    check_permission_syntax,
    matches,
    service_roles,
    validate_binding,
    validate_role,
)
from autoecoops.kernel.auth.settings import AuthSettings, read_local_client
from autoecoops.kernel.auth.store import (
    AuthStore,
    ServiceAccount,
    check_secret,
    hash_secret,
)
from autoecoops.kernel.auth.tokens import IssuedToken, Issuer
from autoecoops.kernel.auth.verify import IssuerPolicy, JwtVerifier, actors_of
from autoecoops.kernel.auth.watch import WatchEvent, build_policy, watch_events
from autoecoops.kernel.mesh.auth import Principal
from autoecoops.kernel.mesh.errors import (
    AlreadyExists,
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
)

log = logging.getLogger("autoecoops.auth")

_DUMMY_HASH = hash_secret("not-a-real-secret")

#: Token types ExchangeToken accepts (RFC 8693 3): both mean a signed JWT
#: access token, ours or a trusted issuer's. Empty is taken as ``jwt``.
TOKEN_TYPES = (
    "urn:ietf:params:oauth:token-type:access_token",
    "urn:ietf:params:oauth:token-type:jwt",
)


def check_token_type(value: str, field_name: str) -> None:
    """INVALID_ARGUMENT naming ``field_name`` unless ``value`` is a type we accept."""
    if value and value not in TOKEN_TYPES:
        raise InvalidArgument(
            f"{field_name} {value!r} is not accepted; use one of {', '.join(TOKEN_TYPES)}",
            reason="TOKEN_TYPE_UNSUPPORTED",
            field_violations=[FieldViolation(field_name, "must be " + " or ".join(TOKEN_TYPES))],
        )


def audiences_of(claims: Mapping[str, Any]) -> tuple[str, ...]:
    """The ``aud`` claim as a tuple (RFC 7519 allows a string or an array)."""
    aud = claims.get("aud")
    if isinstance(aud, str):
        return (aud,)
    return tuple(str(a) for a in aud or ())


def scopes_of(claims: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The ``scope`` claim's permissions, or None for an unscoped token."""
    scope = claims.get("scope")
    if isinstance(scope, str) and scope.strip():
        return tuple(scope.split())
    return None


def _widening(message: str, **metadata: str) -> PermissionDenied:
    return PermissionDenied(message, reason="SCOPE_WIDENING", metadata=metadata)


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
        #: Set when this auth-service drains: open watches end so watchers
        #: move to another replica instead of holding shutdown for the grace period.
        self.draining = asyncio.Event()

    async def start(self, seed: dict[str, Any] | None = None) -> None:
        """Create the built-in roles and whatever the seed file declares (if absent)."""
        existing = {r.name: r for r in await self.store.list_roles()}
        for role in BUILTIN_ROLES:
            stored = existing.get(role.name)
            if stored is None:
                await _ignore_exists(self.store.create_role(role))
            elif set(stored.permissions) != set(role.permissions):
                # A release changed a built-in role: mesh-service gained the RBAC
                # watch, and lost the account permissions now in machineops-service.
                # Built-ins cannot be edited (protect_builtin), so the release's
                # list is the role: permissions are added and removed alike.
                await self.store.update_role(
                    dataclasses.replace(stored, permissions=role.permissions)
                )
        if seed:
            await self._apply_seed(seed)
        await self.refresh_issuers()

    async def close(self) -> None:
        """End open watches and release HTTP clients."""
        self.draining.set()
        await self.federation.close()

    def watch(self, resume_version: int, idle: float = 15.0) -> AsyncIterator[WatchEvent]:
        """WatchAuthorization: a snapshot (or a resume), then changes, until draining."""
        return watch_events(self.store, max(0, resume_version), self.draining, idle)

    async def ensure_local_client(self) -> None:
        """Client credentials for services of this machine that run apart from us.

        A process started with ``autoecoops serve memory-hub`` next to a local
        auth-service has no Kubernetes Secret; it finds these in the shared
        data directory (mode 0600) and gets its token through IssueToken, so
        it never reads the signing keys. One account per data directory, so
        replicas with their own directories never overwrite each other; a
        service with roles of its own (SERVICE_ROLES: machine-ops) gets its
        own account and file, so the shared one holds ``mesh-service`` only.
        """
        await self._ensure_local_account("", ("mesh-service",))
        for service in SERVICE_ROLES:
            await self._ensure_local_account(service, tuple(service_roles(service)))

    async def _ensure_local_account(self, service: str, roles: tuple[str, ...]) -> None:
        path = self.settings.local_client_file_of(service)
        creds = read_local_client(path)
        if creds is None:
            suffix = f".{service}" if service else ""
            creds = (f"system:local.{secrets.token_hex(4)}{suffix}", secrets.token_urlsafe(32))
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump({"client_id": creds[0], "client_secret": creds[1]}, fh)
        client_id, secret = creds
        account = await self.store.get_account(client_id)
        if account is not None and await asyncio.to_thread(
            check_secret, secret, account.secret_hash
        ):
            return
        if account is not None:
            await self.store.delete_account(client_id)
        what = service or "mesh services"
        await _ignore_exists(
            self.store.create_account(
                ServiceAccount(client_id, roles, f"{what} sharing this auth data directory"),
                secret,
            )
        )

    def mint_service_token(self, name: str) -> IssuedToken:
        """The token of a built-in service identity running in this process.

        auth-service is the issuer, so its own process needs no credentials
        and no call to itself (which would audit, which needs this token).
        """
        return self.issuer.issue(
            f"system:{name}",
            self.settings.audience,
            self.settings.token_ttl,
            roles=service_roles(name),
        )

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
        who = Principal(subject=account.name, roles=account.roles)
        granted = await self._scopes_within(who, None, scopes)
        return self.issuer.issue(
            account.name,
            aud,
            self.settings.token_ttl,
            roles=account.roles,
            scopes=granted,
            extra={"client_id": account.name},
        )

    async def _scopes_within(
        self, who: Principal, held_scope: tuple[str, ...] | None, asked: Sequence[str]
    ) -> list[str]:
        """The scope of a new token for ``who``: only ever narrower.

        No scope asked keeps ``held_scope`` (the subject token's; None is
        unscoped). Every scope asked must lie within ``held_scope`` and within
        what ``who`` holds through its roles and bindings; anything more is
        PERMISSION_DENIED ``SCOPE_WIDENING`` and is never written into a token.
        """
        for i, scope in enumerate(asked):
            check_permission_syntax(scope, f"scopes[{i}]")
        if not asked:
            return list(held_scope or ())
        policy = await self._policy()
        granted: list[str] = []
        for i, scope in enumerate(asked):
            if held_scope is not None and not any(matches(h, scope) for h in held_scope):
                raise _widening(
                    f"scope {scope!r} is wider than the subject token's scope",
                    scope=scope,
                    field=f"scopes[{i}]",
                )
            if not policy.holds_anywhere(who, scope):
                raise _widening(
                    f"{who.subject} does not hold {scope!r}, so no token of it may carry it",
                    scope=scope,
                    field=f"scopes[{i}]",
                )
            if scope not in granted:
                granted.append(scope)
        return granted

    def _narrow_audience(self, requested: str, subject: Principal) -> str:
        """The audience of an exchanged token: never wider than the subject token's.

        A token of ours for the mesh audience may become a token for one
        service; a token for one service stays for that service. External
        tokens carry their issuer's audience, which says nothing about ours.
        """
        held = audiences_of(subject.claims) if subject.issuer == self.settings.issuer else ()
        if not requested and held and self.settings.audience not in held:
            requested = held[0]
        aud = self._audience(requested)
        if held and self.settings.audience not in held and aud not in held:
            raise PermissionDenied(
                f"audience {aud!r} is wider than the subject token's ({', '.join(held)})",
                reason="AUDIENCE_WIDENING",
                metadata={"audience": aud},
            )
        return aud

    def _external_name(self, principal: Principal) -> tuple[str, tuple[str, ...]]:
        """Subject and groups of a principal, namespaced by issuer unless it is ours."""
        if principal.issuer == self.settings.issuer:
            return principal.subject, principal.groups
        name = self._issuer_names.get(principal.issuer, principal.issuer)
        return f"{name}:{principal.subject}", tuple(f"{name}:{g}" for g in principal.groups)

    def _prior_act(self, subject: Principal) -> dict[str, Any] | None:
        """The subject token's ``act`` chain, with external names namespaced like its subject."""
        prior = subject.claims.get("act")
        if not isinstance(prior, dict):
            return None
        if subject.issuer == self.settings.issuer:
            return prior
        name = self._issuer_names.get(subject.issuer, subject.issuer)

        def rename(act: Mapping[str, Any], depth: int = 0) -> dict[str, Any]:
            out: dict[str, Any] = {"sub": f"{name}:{act.get('sub', '')}"}
            inner = act.get("act")
            if isinstance(inner, Mapping) and depth < 16:
                out["act"] = rename(inner, depth + 1)
            return out

        return rename(prior)

    async def exchange(
        self,
        subject_token: str,
        actor_token: str,
        audience: str,
        scopes: Sequence[str],
        subject_token_type: str = "",
        actor_token_type: str = "",
    ) -> IssuedToken:
        """RFC 8693: a trusted token becomes ours, only ever narrower.

        The new token's audience and scope are within the subject token's, it
        never outlives the subject (or actor) token, and its ``act`` chain
        only grows: an actor token adds the actor outermost, and without one
        the subject token's chain is kept as it is.
        """
        check_token_type(subject_token_type, "subject_token_type")
        check_token_type(actor_token_type, "actor_token_type")
        if actor_token_type and not actor_token:
            raise InvalidArgument(
                "actor_token_type is set but actor_token is not",
                field_violations=[FieldViolation("actor_token", "required with actor_token_type")],
            )
        await self.refresh_issuers()
        subject = self.namespaced(await self.federated.verify(subject_token))
        aud = self._narrow_audience(audience, subject)
        ttl_end = float(subject.claims["exp"])
        act = self._prior_act(subject)
        if actor_token:
            actor = self.namespaced(await self.federated.verify(actor_token))
            # RFC 8693 4.1: the current actor is outermost, earlier ones nest inside.
            act = {"sub": actor.subject, **({"act": act} if act else {})}
            ttl_end = min(ttl_end, float(actor.claims["exp"]))
        granted = await self._scopes_within(subject, scopes_of(subject.claims), scopes)
        ttl = max(1.0, min(self.settings.token_ttl, ttl_end - time.time()))
        return self.issuer.issue(
            subject.subject,
            aud,
            ttl,
            roles=subject.roles,
            groups=subject.groups,
            scopes=granted,
            act=act,
        )

    def namespaced(self, principal: Principal) -> Principal:
        """The principal as this mesh names it: external subjects and groups prefixed."""
        sub, groups = self._external_name(principal)
        if (sub, groups) == (principal.subject, principal.groups):
            return principal
        prior = self._prior_act(principal)
        actors = actors_of({"act": prior}) if prior is not None else principal.actors
        return dataclasses.replace(principal, subject=sub, groups=groups, actors=actors)

    async def introspect(self, token: str, audience: str) -> Principal:
        """Verify any trusted token (ours or federated); optionally demand an audience.

        The principal is named as an exchanged token would name it, so an
        external ``alice`` of issuer ``corp`` is ``corp:alice`` both ways.
        """
        await self.refresh_issuers()
        principal = self.namespaced(await self.federated.verify(token))
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
        return build_policy(policy.roles.values(), policy.bindings)

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

    async def delete_account(self, caller: Principal, name: str) -> None:
        """Delete a service account whose permissions the caller holds where they apply.

        The rule of creation, applied to deletion: who could not have made the
        account cannot remove it. So machine-ops, which may manage its nodes'
        accounts, cannot delete another service's identity or an admin's
        automation. What the account holds is its roles and every binding that
        names it (an account made with a small role and bound to admin later
        holds admin), each where it applies.
        """
        account = await self.store.get_account(name)
        if account is not None:
            policy = await self._policy()
            held = [(role, "", f"role {role!r}") for role in account.roles]
            held += [
                (b.role, b.namespace, f"binding {b.name!r}")
                for b in policy.bindings
                if any(s.kind != "group" and s.name == account.name for s in b.subjects)
            ]
            for role_name, namespace, via in held:
                role = policy.roles.get(role_name)
                for wanted in role.permissions if role else ():
                    if policy.allowed(caller, wanted, namespace) is None:
                        where = f" in namespace {namespace!r}" if namespace else ""
                        raise PermissionDenied(
                            f"{caller.subject} cannot delete service account {name!r}: its "
                            f"{via} grants {wanted}{where}, which the caller does not hold",
                            reason="ESCALATION_DENIED",
                            metadata={
                                "permission": wanted,
                                "role": role_name,
                                **({"namespace": namespace} if namespace else {}),
                            },
                            resource_type="serviceaccount",
                            resource_name=name,
                        )
        await self.store.delete_account(name)

    async def check(self, principal: Principal, permission: str, namespace: str) -> str | None:
        """What grants ``permission`` to ``principal``, or None."""
        check_permission_syntax(permission)
        return (await self._policy()).allowed(principal, permission, namespace)


async def _ignore_exists(coro: Any) -> None:
    with contextlib.suppress(AlreadyExists):
        await coro
