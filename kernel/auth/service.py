"""auth-service's gRPC edge: translates proto <-> domain, nothing else."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeAlias

import grpc
from google.protobuf import field_mask_pb2, json_format, struct_pb2

from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc
from autoecoops.kernel.auth.authority import Authority
from autoecoops.kernel.auth.convert import (
    binding_from_pb,
    binding_to_pb,
    role_from_pb,
    role_to_pb,
)
from autoecoops.kernel.auth.convert import (
    ts as _ts,
)
from autoecoops.kernel.auth.keys import KeyRing
from autoecoops.kernel.auth.mesh import ServiceIdentity, WatchingAuthorizer
from autoecoops.kernel.auth.rbac import Binding, Role, protect_builtin
from autoecoops.kernel.auth.settings import AuthSettings
from autoecoops.kernel.auth.store import AuthStore, Change, ServiceAccount, TrustedIssuer
from autoecoops.kernel.auth.tokens import IssuedToken
from autoecoops.kernel.auth.watch import Snapshot, WatchEvent
from autoecoops.kernel.mesh.audit import outbox_for
from autoecoops.kernel.mesh.auth import Principal, current_principal
from autoecoops.kernel.mesh.errors import FieldViolation, InvalidArgument, Unauthenticated
from autoecoops.kernel.mesh.fieldmask import merge_masked
from autoecoops.kernel.mesh.paging import page_by_key
from autoecoops.kernel.mesh.server import Runtime

Ctx: TypeAlias = grpc.aio.ServicerContext


def _caller() -> Principal:
    principal = current_principal.get()
    if principal is None:  # the interceptor guarantees one on protected RPCs
        raise Unauthenticated("no verified caller", reason="CREDENTIALS_MISSING")
    return principal


def _merge(mask: field_mask_pb2.FieldMask, new: Any, old: Any, field: str) -> Any:
    """Apply ``new`` over ``old`` for the paths in ``mask`` (all writable fields if empty)."""
    if not mask.paths:
        return new
    allowed = set(type(new).DESCRIPTOR.fields_by_name)
    for i, path in enumerate(mask.paths):
        if path not in allowed or path in {"name", "create_time", "update_time"}:
            raise InvalidArgument(
                f"update_mask path {path!r} cannot be updated",
                field_violations=[
                    FieldViolation(f"update_mask.paths[{i}]", f"not an updatable field of {field}")
                ],
            )
    return merge_masked(old, new, mask.paths)


def _token_response(issued: IssuedToken, scopes: Sequence[str]) -> auth_pb2.IssueTokenResponse:
    return auth_pb2.IssueTokenResponse(
        access_token=issued.token,
        token_type="Bearer",
        expire_time=_ts(issued.expires_at),
        scopes=list(scopes),
    )


def _name(item: Any) -> str:
    return str(item.name)


def issuer_to_pb(i: TrustedIssuer) -> auth_pb2.TrustedIssuer:
    """Domain issuer -> proto."""
    pb = auth_pb2.TrustedIssuer(
        name=i.name,
        issuer_url=i.issuer_url,
        audiences=list(i.audiences),
        algorithms=list(i.algorithms),
        groups_claim=i.groups_claim,
        group_roles=[
            auth_pb2.GroupRoleMapping(group=g, roles=list(r))
            for g, r in sorted(i.group_roles.items())
        ],
        create_time=_ts(i.create_time),
    )
    pb.jwks_ttl.FromNanoseconds(int(i.jwks_ttl * 1e9))
    return pb


def issuer_from_pb(pb: auth_pb2.TrustedIssuer) -> TrustedIssuer:
    """Proto issuer -> domain, with defaults for unset fields."""
    from autoecoops.kernel.auth.federation import check_issuer_url
    from autoecoops.kernel.auth.rbac import check_name

    check_name(pb.name, "trusted_issuer.name")
    check_issuer_url(pb.issuer_url)
    bad = [a for a in pb.algorithms if a not in ("RS256", "ES256")]
    if bad:
        raise InvalidArgument(
            f"algorithms {bad} are not accepted",
            field_violations=[FieldViolation("trusted_issuer.algorithms", "only RS256 and ES256")],
        )
    ttl = pb.jwks_ttl.ToNanoseconds() / 1e9 if pb.HasField("jwks_ttl") else 300.0
    return TrustedIssuer(
        name=pb.name,
        issuer_url=pb.issuer_url,
        audiences=tuple(pb.audiences),
        algorithms=tuple(pb.algorithms) or ("RS256", "ES256"),
        groups_claim=pb.groups_claim or "groups",
        group_roles={m.group: tuple(m.roles) for m in pb.group_roles},
        jwks_ttl=min(max(ttl, 1.0), 86400.0),
    )


def account_to_pb(a: ServiceAccount) -> auth_pb2.ServiceAccount:
    """Domain account -> proto (never the secret hash)."""
    return auth_pb2.ServiceAccount(
        name=a.name, roles=list(a.roles), description=a.description, create_time=_ts(a.create_time)
    )


def principal_to_pb(p: Principal) -> auth_pb2.Principal:
    """Domain principal -> proto."""
    return auth_pb2.Principal(
        subject=p.subject,
        issuer=p.issuer,
        groups=list(p.groups),
        roles=list(p.roles),
        actors=list(p.actors),
    )


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    """Serves autoecoops.auth.v1.AuthService."""

    def __init__(self, authority: Authority) -> None:
        self.a = authority

    async def IssueToken(
        self, request: auth_pb2.IssueTokenRequest, context: Ctx
    ) -> auth_pb2.IssueTokenResponse:
        issued = await self.a.issue_for_account(
            request.client_id, request.client_secret, request.audience, list(request.scopes)
        )
        return _token_response(issued, str(issued.claims.get("scope", "")).split())

    async def ExchangeToken(
        self, request: auth_pb2.ExchangeTokenRequest, context: Ctx
    ) -> auth_pb2.ExchangeTokenResponse:
        issued = await self.a.exchange(
            request.subject_token,
            request.actor_token,
            request.audience,
            list(request.scopes),
            request.subject_token_type,
            request.actor_token_type,
        )
        return auth_pb2.ExchangeTokenResponse(
            access_token=issued.token,
            issued_token_type="urn:ietf:params:oauth:token-type:access_token",
            token_type="Bearer",
            expire_time=_ts(issued.expires_at),
            scopes=str(issued.claims.get("scope", "")).split(),
        )

    async def VerifyToken(
        self, request: auth_pb2.VerifyTokenRequest, context: Ctx
    ) -> auth_pb2.VerifyTokenResponse:
        principal = await self.a.introspect(request.token, request.audience)
        claims = struct_pb2.Struct()
        json_format.ParseDict(principal.claims, claims)
        return auth_pb2.VerifyTokenResponse(
            principal=principal_to_pb(principal),
            claims=claims,
            expire_time=_ts(float(principal.claims["exp"])),
        )

    async def GetJwks(
        self, request: auth_pb2.GetJwksRequest, context: Ctx
    ) -> auth_pb2.GetJwksResponse:
        jwks = self.a.ring.jwks()
        keys = [
            auth_pb2.JsonWebKey(
                **{
                    k: v
                    for k, v in jwk.items()
                    if k in auth_pb2.JsonWebKey.DESCRIPTOR.fields_by_name
                }
            )
            for jwk in jwks
        ]
        jwk_set = struct_pb2.Struct()
        jwk_set.update({"keys": jwks})
        return auth_pb2.GetJwksResponse(keys=keys, jwk_set=jwk_set)

    async def GetOpenIdConfiguration(
        self, request: auth_pb2.GetOpenIdConfigurationRequest, context: Ctx
    ) -> auth_pb2.GetOpenIdConfigurationResponse:
        iss = self.a.settings.issuer
        return auth_pb2.GetOpenIdConfigurationResponse(
            issuer=iss,
            jwks_uri=f"{iss}/.well-known/jwks.json",
            token_endpoint=f"{iss}/v1/auth/token",
            grant_types_supported=[
                "client_credentials",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ],
            id_token_signing_alg_values_supported=["ES256", "RS256"],
            subject_types_supported=["public"],
            response_types_supported=["token"],
        )

    async def RotateSigningKey(
        self, request: auth_pb2.RotateSigningKeyRequest, context: Ctx
    ) -> auth_pb2.RotateSigningKeyResponse:
        alg = request.algorithm or self.a.settings.signing_alg
        new = self.a.ring.rotate(alg)
        return auth_pb2.RotateSigningKeyResponse(
            kid=new.meta.kid, active_time=_ts(new.meta.active_from)
        )

    # -- roles --------------------------------------------------------------

    async def CreateRole(
        self, request: auth_pb2.CreateRoleRequest, context: Ctx
    ) -> auth_pb2.CreateRoleResponse:
        role = await self.a.create_role(_caller(), role_from_pb(request.role))
        return auth_pb2.CreateRoleResponse(role=role_to_pb(role))

    async def GetRole(
        self, request: auth_pb2.GetRoleRequest, context: Ctx
    ) -> auth_pb2.GetRoleResponse:
        return auth_pb2.GetRoleResponse(role=role_to_pb(await self.a.store.get_role(request.name)))

    async def ListRoles(
        self, request: auth_pb2.ListRolesRequest, context: Ctx
    ) -> auth_pb2.ListRolesResponse:
        items, token = page_by_key(
            await self.a.store.list_roles(), request.page_size, request.page_token, _name
        )
        return auth_pb2.ListRolesResponse(
            roles=[role_to_pb(r) for r in items], next_page_token=token
        )

    async def UpdateRole(
        self, request: auth_pb2.UpdateRoleRequest, context: Ctx
    ) -> auth_pb2.UpdateRoleResponse:
        protect_builtin(request.role.name, "changed")
        old = role_to_pb(await self.a.store.get_role(request.role.name))
        merged = _merge(request.update_mask, request.role, old, "role")
        role = await self.a.update_role(_caller(), role_from_pb(merged))
        return auth_pb2.UpdateRoleResponse(role=role_to_pb(role))

    async def DeleteRole(
        self, request: auth_pb2.DeleteRoleRequest, context: Ctx
    ) -> auth_pb2.DeleteRoleResponse:
        protect_builtin(request.name, "deleted")
        await self.a.store.delete_role(request.name)
        return auth_pb2.DeleteRoleResponse()

    # -- bindings -------------------------------------------------------------

    async def CreateRoleBinding(
        self, request: auth_pb2.CreateRoleBindingRequest, context: Ctx
    ) -> auth_pb2.CreateRoleBindingResponse:
        b = await self.a.create_binding(_caller(), binding_from_pb(request.role_binding))
        return auth_pb2.CreateRoleBindingResponse(role_binding=binding_to_pb(b))

    async def GetRoleBinding(
        self, request: auth_pb2.GetRoleBindingRequest, context: Ctx
    ) -> auth_pb2.GetRoleBindingResponse:
        return auth_pb2.GetRoleBindingResponse(
            role_binding=binding_to_pb(await self.a.store.get_binding(request.name))
        )

    async def ListRoleBindings(
        self, request: auth_pb2.ListRoleBindingsRequest, context: Ctx
    ) -> auth_pb2.ListRoleBindingsResponse:
        items = [
            b
            for b in await self.a.store.list_bindings()
            if (not request.namespace or b.namespace == request.namespace)
            and (not request.subject or any(s.name == request.subject for s in b.subjects))
        ]
        chunk, token = page_by_key(items, request.page_size, request.page_token, _name)
        return auth_pb2.ListRoleBindingsResponse(
            role_bindings=[binding_to_pb(b) for b in chunk], next_page_token=token
        )

    async def UpdateRoleBinding(
        self, request: auth_pb2.UpdateRoleBindingRequest, context: Ctx
    ) -> auth_pb2.UpdateRoleBindingResponse:
        old = binding_to_pb(await self.a.store.get_binding(request.role_binding.name))
        merged = _merge(request.update_mask, request.role_binding, old, "role_binding")
        b = await self.a.update_binding(_caller(), binding_from_pb(merged))
        return auth_pb2.UpdateRoleBindingResponse(role_binding=binding_to_pb(b))

    async def DeleteRoleBinding(
        self, request: auth_pb2.DeleteRoleBindingRequest, context: Ctx
    ) -> auth_pb2.DeleteRoleBindingResponse:
        await self.a.store.delete_binding(request.name)
        return auth_pb2.DeleteRoleBindingResponse()

    # -- trusted issuers ---------------------------------------------------------

    async def CreateTrustedIssuer(
        self, request: auth_pb2.CreateTrustedIssuerRequest, context: Ctx
    ) -> auth_pb2.CreateTrustedIssuerResponse:
        stored = await self.a.store.put_issuer(issuer_from_pb(request.trusted_issuer), "create")
        await self.a.refresh_issuers()
        return auth_pb2.CreateTrustedIssuerResponse(trusted_issuer=issuer_to_pb(stored))

    async def GetTrustedIssuer(
        self, request: auth_pb2.GetTrustedIssuerRequest, context: Ctx
    ) -> auth_pb2.GetTrustedIssuerResponse:
        return auth_pb2.GetTrustedIssuerResponse(
            trusted_issuer=issuer_to_pb(await self.a.store.get_issuer(request.name))
        )

    async def ListTrustedIssuers(
        self, request: auth_pb2.ListTrustedIssuersRequest, context: Ctx
    ) -> auth_pb2.ListTrustedIssuersResponse:
        items, token = page_by_key(
            await self.a.store.list_issuers(), request.page_size, request.page_token, _name
        )
        return auth_pb2.ListTrustedIssuersResponse(
            trusted_issuers=[issuer_to_pb(i) for i in items], next_page_token=token
        )

    async def UpdateTrustedIssuer(
        self, request: auth_pb2.UpdateTrustedIssuerRequest, context: Ctx
    ) -> auth_pb2.UpdateTrustedIssuerResponse:
        old = issuer_to_pb(await self.a.store.get_issuer(request.trusted_issuer.name))
        merged = _merge(request.update_mask, request.trusted_issuer, old, "trusted_issuer")
        stored = await self.a.store.put_issuer(issuer_from_pb(merged), "update")
        await self.a.refresh_issuers()
        return auth_pb2.UpdateTrustedIssuerResponse(trusted_issuer=issuer_to_pb(stored))

    async def DeleteTrustedIssuer(
        self, request: auth_pb2.DeleteTrustedIssuerRequest, context: Ctx
    ) -> auth_pb2.DeleteTrustedIssuerResponse:
        await self.a.store.delete_issuer(request.name)
        await self.a.refresh_issuers()
        return auth_pb2.DeleteTrustedIssuerResponse()

    # -- service accounts -----------------------------------------------------

    async def CreateServiceAccount(
        self, request: auth_pb2.CreateServiceAccountRequest, context: Ctx
    ) -> auth_pb2.CreateServiceAccountResponse:
        secret = secrets.token_urlsafe(32)
        pb = request.service_account
        account = await self.a.create_account(
            _caller(), ServiceAccount(pb.name, tuple(pb.roles), pb.description), secret
        )
        return auth_pb2.CreateServiceAccountResponse(
            service_account=account_to_pb(account), client_secret=secret
        )

    async def ListServiceAccounts(
        self, request: auth_pb2.ListServiceAccountsRequest, context: Ctx
    ) -> auth_pb2.ListServiceAccountsResponse:
        items, token = page_by_key(
            await self.a.store.list_accounts(), request.page_size, request.page_token, _name
        )
        return auth_pb2.ListServiceAccountsResponse(
            service_accounts=[account_to_pb(a) for a in items], next_page_token=token
        )

    async def DeleteServiceAccount(
        self, request: auth_pb2.DeleteServiceAccountRequest, context: Ctx
    ) -> auth_pb2.DeleteServiceAccountResponse:
        await self.a.delete_account(_caller(), request.name)
        return auth_pb2.DeleteServiceAccountResponse()

    async def CheckPermission(
        self, request: auth_pb2.CheckPermissionRequest, context: Ctx
    ) -> auth_pb2.CheckPermissionResponse:
        if request.HasField("principal"):
            p = request.principal
            who = Principal(
                subject=p.subject, issuer=p.issuer, roles=tuple(p.roles), groups=tuple(p.groups)
            )
        else:
            who = _caller()
        by = await self.a.check(who, request.permission, request.namespace)
        return auth_pb2.CheckPermissionResponse(allowed=by is not None, granted_by=by or "")

    async def WatchAuthorization(
        self, request: auth_pb2.WatchAuthorizationRequest, context: Ctx
    ) -> AsyncIterator[auth_pb2.WatchAuthorizationResponse]:
        async for event in self.a.watch(request.resume_version):
            yield watch_event_to_pb(event)


_CHANGE_TYPES = {
    "create": auth_pb2.CHANGE_TYPE_UPSERT,
    "update": auth_pb2.CHANGE_TYPE_UPSERT,
    "delete": auth_pb2.CHANGE_TYPE_DELETE,
}


def watch_event_to_pb(event: WatchEvent) -> auth_pb2.WatchAuthorizationResponse:
    """Domain watch event -> proto."""
    if isinstance(event, Snapshot):
        return auth_pb2.WatchAuthorizationResponse(
            version=event.version,
            snapshot=auth_pb2.AuthorizationSnapshot(
                roles=[role_to_pb(r) for r in event.roles],
                role_bindings=[binding_to_pb(b) for b in event.bindings],
            ),
        )
    if isinstance(event, Change):
        change = auth_pb2.AuthorizationChange(type=_CHANGE_TYPES[event.op])
        if event.kind == "role":
            value = event.value
            change.role.CopyFrom(
                role_to_pb(value) if isinstance(value, Role) else auth_pb2.Role(name=event.name)
            )
        else:
            value = event.value
            change.role_binding.CopyFrom(
                binding_to_pb(value)
                if isinstance(value, Binding)
                else auth_pb2.RoleBinding(name=event.name)
            )
        return auth_pb2.WatchAuthorizationResponse(version=event.version, change=change)
    return auth_pb2.WatchAuthorizationResponse(
        version=event.version, bookmark=auth_pb2.AuthorizationBookmark()
    )


def build_authority(runtime: Runtime) -> Authority:
    """The Authority of this process: keys from the data dir, store in Redis.

    It also becomes the process's source of service tokens and of RBAC (see
    below), which is what running auth-service in a process means.
    """
    settings = AuthSettings.from_env(runtime.config)
    ring = KeyRing(
        settings.key_dir, publish_delay=settings.publish_delay, max_token_ttl=settings.max_token_ttl
    )
    ring.load_or_create(settings.signing_alg, settings.key_file)
    store = AuthStore(runtime.redis, runtime.key("auth"), outbox_for(runtime, "auth-service"))
    authority = Authority(settings, ring, store)
    # Draining ends open watches, so watchers move on instead of holding shutdown.
    runtime.drainers.append(authority.draining.set)
    identity = runtime.clients.token_source
    if isinstance(identity, ServiceIdentity):
        # This process holds the issuer: its identity mints in-process rather
        # than through IssueToken, which would audit, which needs this token.
        identity.use_local_issuer(authority.mint_service_token)
    if isinstance(runtime.authorizer, WatchingAuthorizer):
        # Likewise RBAC: follow the watch in-process; calling our own
        # WatchAuthorization would need a snapshot only it can deliver.
        runtime.authorizer.use_local_source(authority.watch)
    return authority


def register(server: grpc.aio.Server, runtime: Runtime) -> Sequence[str]:
    """Add auth-service's servicers to ``server``."""
    authority = build_authority(runtime)
    runtime.starters.append(lambda: _start(authority))
    runtime.closers.append(authority.close)
    auth_pb2_grpc.add_AuthServiceServicer_to_server(AuthServicer(authority), server)
    return [auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name]


async def _start(authority: Authority) -> None:
    from autoecoops.kernel.auth.seed import load_seed

    seed_file = authority.settings.seed_file
    await authority.start(load_seed(seed_file) if seed_file else None)
    if authority.settings.local_client:
        await authority.ensure_local_client()
