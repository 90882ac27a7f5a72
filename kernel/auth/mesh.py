"""What every service of the mesh uses from auth: token verification with keys
from auth-service's JWKS, RBAC decisions from a snapshot auth-service pushes
(WatchAuthorization), and the service's own identity.

None makes a network call per request: keys are cached (``JwksCache``), and
the RBAC snapshot lives in memory, updated by the watch as changes happen.
No service reads auth-service's Redis keys or its signing keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf import json_format
from prometheus_client import Counter, Gauge

from autoecoops.auth.v1 import auth_pb2, auth_pb2_grpc
from autoecoops.kernel.auth.convert import binding_from_pb, role_from_pb
from autoecoops.kernel.auth.rbac import Policy
from autoecoops.kernel.auth.settings import AuthSettings, read_local_client
from autoecoops.kernel.auth.store import Change
from autoecoops.kernel.auth.tokens import IssuedToken
from autoecoops.kernel.auth.verify import IssuerPolicy, JwksCache, JwtVerifier, reject
from autoecoops.kernel.auth.watch import Bookmark, RbacState, Snapshot, WatchEvent
from autoecoops.kernel.mesh.audit import AuditTrail
from autoecoops.kernel.mesh.auth import Principal
from autoecoops.kernel.mesh.clients import ClientFactory
from autoecoops.kernel.mesh.config import SERVICE_NAMES, read_secret
from autoecoops.kernel.mesh.errors import Unavailable
from autoecoops.kernel.mesh.server import Runtime
from autoecoops.sdk.retry import Retry

log = logging.getLogger("autoecoops.auth")


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


class ServiceVerifier:
    """The mesh's TokenVerifier, bound to the service a server serves.

    One ``JwtVerifier`` (one key cache, one verified-token cache) serves the
    whole process; each server gets a view that accepts a token only when its
    ``aud`` names the mesh-wide audience or that service. A token exchanged
    for event-bus is therefore ``AUDIENCE_MISMATCH`` at memory-hub.
    """

    __slots__ = ("_accepted", "_inner", "_mesh_audience")

    def __init__(self, inner: JwtVerifier, mesh_audience: str, service: str = "") -> None:
        self._inner = inner
        self._mesh_audience = mesh_audience
        self._accepted = frozenset({mesh_audience, service} - {""})

    def for_service(self, service: str) -> ServiceVerifier:
        """The view for ``service``'s server."""
        return ServiceVerifier(self._inner, self._mesh_audience, service)

    async def verify(self, token: str) -> Principal:
        """Verify ``token`` and demand an audience this service answers to."""
        principal = await self._inner.verify(token)
        aud = principal.claims["aud"]
        if isinstance(aud, str):
            if aud in self._accepted:
                return principal
        elif not self._accepted.isdisjoint(aud):
            return principal
        raise reject("AUDIENCE_MISMATCH", "the token is meant for another service")


WATCH_CONNECTED = Gauge(
    "autoecoops_auth_rbac_watch_connected",
    "1 while this process's WatchAuthorization stream to auth-service is open.",
)
WATCH_VERSION = Gauge(
    "autoecoops_auth_rbac_version", "The RBAC version this process authorizes with (0: none yet)."
)
WATCH_RECONNECTS = Counter(
    "autoecoops_auth_rbac_watch_reconnects_total",
    "Times the WatchAuthorization stream was lost and reopened.",
)
NO_SNAPSHOT_DENIALS = Counter(
    "autoecoops_auth_rbac_no_snapshot_denials_total",
    "Calls refused because no RBAC snapshot was ever received (fail closed).",
)


#: Reconnect backoff of the watch: full jitter from 50 ms, capped at 1 s, so a
#: restarted auth-service is found again within about a second.
WATCH_RETRY = Retry(initial=timedelta(milliseconds=50), maximum=timedelta(seconds=1))


class WatchingAuthorizer:
    """The mesh's Authorizer: RBAC from a snapshot auth-service pushes.

    A background task keeps a WatchAuthorization stream open: it receives a
    full snapshot, then every change (a binding change applies in
    milliseconds), and after a lost connection resumes from its version with
    jittered backoff. While auth-service is unreachable the last snapshot
    keeps answering; a process that never had one refuses every check
    (UNAVAILABLE ``RBAC_SNAPSHOT_UNAVAILABLE``), counts it and logs it.
    """

    def __init__(
        self,
        clients: ClientFactory,
        *,
        first_wait: float = 5.0,
        retry: Retry = WATCH_RETRY,
    ) -> None:
        self._clients = clients
        self._first_wait = first_wait
        self._retry = retry
        self.state = RbacState()
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._last_denial_log = 0.0
        self._local: Callable[[int], AsyncIterator[WatchEvent]] | None = None
        self._closing = False
        #: Whether the stream is open now.
        self.connected = False
        #: Streams opened so far (the first one included).
        self.connections = 0
        #: Full snapshots received; a resumed stream sends none.
        self.snapshots = 0

    @property
    def version(self) -> int:
        """The RBAC version held (0 before the first snapshot)."""
        return self.state.version

    def start(self) -> None:
        """Start watching (idempotent; needs a running loop)."""
        if not self._closing and (self._task is None or self._task.done()):
            # A fresh context: started lazily inside a call, the watch must not
            # inherit that call's deadline, principal or trace.
            self._task = asyncio.get_running_loop().create_task(
                self._run(), context=contextvars.Context()
            )

    async def close(self) -> None:
        """Stop watching."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._set_connected(False)

    async def wait_for_version(self, version: int, within: float) -> bool:
        """Wait until the held version reaches ``version``; False after ``within`` seconds."""
        deadline = time.monotonic() + within
        while self.state.version < version or self.state.policy is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), left)
        return True

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        WATCH_CONNECTED.set(1 if connected else 0)

    def _apply(self, event: WatchEvent) -> None:
        if isinstance(event, Snapshot):
            self.snapshots += 1
        self.state.apply(event)
        WATCH_VERSION.set(self.state.version)
        # Wake waiters, then give later waiters a fresh event.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _run(self) -> None:
        failures = 0
        me = asyncio.current_task()
        while not self._closing:
            try:
                async for event in self._events():
                    if not self.connected:
                        self._set_connected(True)
                        self.connections += 1
                        if failures:
                            log.info("RBAC watch re-established at version %d", self.state.version)
                        failures = 0
                    self._apply(event)
                log.debug("RBAC watch ended by auth-service (draining?); reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closing or (me is not None and me.cancelling()):
                    # A client library turned our cancellation into an error: stop anyway.
                    raise asyncio.CancelledError from exc
                level = logging.WARNING if failures == 0 else logging.DEBUG
                log.log(
                    level,
                    "RBAC watch lost (%s); authorizing from version %d while reconnecting",
                    _short(exc),
                    self.state.version,
                )
            if self.connected:
                WATCH_RECONNECTS.inc()
            self._set_connected(False)
            failures += 1
            await asyncio.sleep(self._retry.backoff(failures, random.random()))

    def use_local_source(self, watch: Callable[[int], AsyncIterator[WatchEvent]]) -> None:
        """Follow auth-service's own watch in this process instead of calling it.

        Set by auth-service's register: its own RPCs (the watch included)
        could not be authorized from a snapshot only the watch can deliver.
        """
        self._local = watch

    async def _events(self) -> AsyncIterator[WatchEvent]:
        if self._local is not None:
            async for event in self._local(self.state.version):
                yield event
            return
        stub = self._clients.stub(auth_pb2_grpc.AuthServiceStub, "auth-service")
        # The client factory adds this service's own token.
        call = stub.WatchAuthorization(
            auth_pb2.WatchAuthorizationRequest(resume_version=self.state.version)
        )
        async for message in call:
            yield watch_event_from_pb(message)

    async def policy(self) -> Policy:
        """The policy held now; waits briefly for the first snapshot, else fails closed."""
        policy = self.state.policy
        if policy is not None:
            return policy
        self.start()
        await self.wait_for_version(0, self._first_wait)
        policy = self.state.policy
        if policy is None:
            NO_SNAPSHOT_DENIALS.inc()
            now = time.monotonic()
            if now - self._last_denial_log > 5.0:
                self._last_denial_log = now
                log.error(
                    "refusing calls: no RBAC snapshot from auth-service yet (fail closed); "
                    "is auth-service reachable, and does this service have a token?"
                )
            raise Unavailable(
                "authorization is not available yet: no RBAC snapshot from auth-service",
                reason="RBAC_SNAPSHOT_UNAVAILABLE",
                retry_delay=1.0,
            )
        return policy

    async def check(self, principal: Principal, permission: str, namespace: str = "") -> None:
        """Raise PERMISSION_DENIED unless ``principal`` holds ``permission`` (in ``namespace``)."""
        policy = self.state.policy
        if policy is None:
            policy = await self.policy()
        policy.check(principal, permission, namespace)


def _short(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}"


def watch_event_from_pb(msg: auth_pb2.WatchAuthorizationResponse) -> WatchEvent:
    """Proto watch event -> domain."""
    kind = msg.WhichOneof("event")
    if kind == "snapshot":
        return Snapshot(
            msg.version,
            tuple(role_from_pb(r) for r in msg.snapshot.roles),
            tuple(binding_from_pb(b) for b in msg.snapshot.role_bindings),
        )
    if kind == "change":
        change = msg.change
        delete = change.type == auth_pb2.CHANGE_TYPE_DELETE
        if change.WhichOneof("object") == "role":
            return Change(
                msg.version,
                "role",
                "delete" if delete else "update",
                change.role.name,
                None if delete else role_from_pb(change.role),
            )
        return Change(
            msg.version,
            "rolebinding",
            "delete" if delete else "update",
            change.role_binding.name,
            None if delete else binding_from_pb(change.role_binding),
        )
    return Bookmark(msg.version)


class ServiceIdentity:
    """A mesh service's own token, and delegated tokens for calls on a user's behalf.

    The token comes, in this order: from auth-service's issuer in this very
    process (``autoecoops up``, or auth-service itself), which needs no
    credentials and no call to itself; from IssueToken with client
    credentials ``AUTOECOOPS_SERVICE_CLIENT_ID``/``_SECRET`` (Kubernetes: a
    Secret per service); from IssueToken with the credentials a local
    auth-service leaves in the shared data directory. Never from the signing
    keys on disk. With none of these there is no token, and calls fail
    UNAUTHENTICATED rather than pretend.
    """

    def __init__(
        self, settings: AuthSettings, clients: ClientFactory, env: Mapping[str, str] | None = None
    ) -> None:
        env = os.environ if env is None else env
        self._settings = settings
        self._clients = clients
        self.name = env.get("AUTOECOOPS_SERVICE_NAME", "").strip() or "mesh"
        self._client_id = read_secret(env, "AUTOECOOPS_SERVICE_CLIENT_ID")
        self._secret = read_secret(env, "AUTOECOOPS_SERVICE_CLIENT_SECRET")
        self._local_issuer: Callable[[str], IssuedToken] | None = None
        self._parent: ServiceIdentity | None = None
        self._token, self._exp = "", 0.0
        self._delegated: dict[tuple[str, str], tuple[str, float]] = {}
        self._lock = asyncio.Lock()

    def use_local_issuer(self, mint: Callable[[str], IssuedToken]) -> None:
        """Mint with auth-service's issuer in this process (set by auth-service's register)."""
        self._local_issuer = mint
        self._token, self._exp = "", 0.0

    def named(self, name: str, clients: ClientFactory) -> ServiceIdentity:
        """The identity of another service of this process (``autoecoops up`` runs them
        all in one), minted the way this one is: in-process beside auth-service (its
        issuer looked up at mint time, since auth-service may register later), else
        through IssueToken."""
        sibling = ServiceIdentity(self._settings, clients, {"AUTOECOOPS_SERVICE_NAME": name})
        sibling._client_id, sibling._secret = self._client_id, self._secret
        sibling._parent = self
        return sibling

    async def token(self) -> str:
        """The service's own token, refreshed a minute before it expires."""
        if self._token and self._exp - 60 > time.time():
            return self._token
        async with self._lock:
            if not (self._token and self._exp - 60 > time.time()):
                self._token, self._exp = await self._fetch()
        return self._token

    def forget(self, token: str) -> None:
        """``token`` was refused: the next call mints a new one (a sibling's too)."""
        if token == self._token:
            self._token, self._exp = "", 0.0

    async def _fetch(self) -> tuple[str, float]:
        issuer = self._local_issuer
        if issuer is None and self._parent is not None:
            issuer = self._parent._local_issuer
        if issuer is not None:
            issued = issuer(self.name)
            return issued.token, issued.expires_at
        client_id, secret = self._client_id, self._secret
        if not client_id:
            # A service with roles of its own (machine-ops) has its own local
            # account; the rest share one that holds mesh-service only.
            client_id, secret = (
                read_local_client(self._settings.local_client_file_of(self.name))
                or read_local_client(self._settings.local_client_file)
                or ("", "")
            )
        if client_id:
            stub = self._clients.stub(auth_pb2_grpc.AuthServiceStub, "auth-service")
            reply = await stub.IssueToken(
                auth_pb2.IssueTokenRequest(client_id=client_id, client_secret=secret),
                timeout=10.0,
            )
            return reply.access_token, reply.expire_time.ToNanoseconds() / 1e9
        log.warning(
            "no service identity: set AUTOECOOPS_SERVICE_CLIENT_ID/_SECRET; calls to other "
            "services go without a token"
        )
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
    runtime.verifier = ServiceVerifier(mesh_verifier(settings, runtime.clients), settings.audience)
    identity = ServiceIdentity(settings, runtime.clients)
    runtime.clients.token_source = identity
    runtime.auditor = AuditTrail(runtime, identity.name)
    authorizer = WatchingAuthorizer(runtime.clients, first_wait=settings.rbac_wait)
    runtime.authorizer = authorizer
    runtime.started.append(authorizer.start)
    runtime.closers.append(authorizer.close)
    return runtime


def own_clients(runtime: Runtime, service: str) -> ClientFactory:
    """A client factory that calls as ``service`` itself (``system:<service>``).

    ``autoecoops up`` runs every service in one process with one runtime, whose
    identity is the process's (``system:mesh``); a service whose calls must
    carry its own identity (infra-manager's events, machine-ops's node
    accounts, which only its role may create) takes its clients from here. In
    a pod ``AUTOECOOPS_SERVICE_NAME`` already names it, and the runtime's is used.
    """
    source = runtime.clients.token_source
    if os.environ.get("AUTOECOOPS_SERVICE_NAME", "").strip() or not isinstance(
        source, ServiceIdentity
    ):
        return runtime.clients
    clients = ClientFactory(runtime.config)
    clients.token_source = source.named(service, clients)
    runtime.closers.append(clients.close)
    return clients
