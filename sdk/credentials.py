"""Who the client is: the four ways to get a bearer token, and the cache that
keeps one fresh.

A credential is an immutable description (``StaticToken``,
``ClientCredentials``, ``TokenExchange``, ``LocalToken``). Each client turns
it into a ``TokenSource`` (or ``AsyncTokenSource``) that holds the current
token and replaces it ``refresh_margin`` before it expires, with one refresh
in flight however many calls are waiting for it. The remote kinds call
auth-service's public IssueToken or ExchangeToken through the client itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from abc import ABC
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt
from google.protobuf import message

from autoecoops.auth.v1 import auth_pb2
from autoecoops.sdk.clock import Clock

ISSUE_TOKEN = "/autoecoops.auth.v1.AuthService/IssueToken"
EXCHANGE_TOKEN = "/autoecoops.auth.v1.AuthService/ExchangeToken"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
#: Assumed lifetime of a token that states none, so it is still refreshed.
_UNKNOWN_LIFETIME = 300.0


class Credentials(ABC):
    """Where a client's bearer token comes from."""

    #: How long before its expiry a token is replaced.
    refresh_margin: timedelta


@dataclass(frozen=True, slots=True)
class StaticToken(Credentials):
    """A token obtained elsewhere, sent as is (it is never refreshed)."""

    token: str = field(repr=False)
    refresh_margin: timedelta = timedelta(0)

    def __post_init__(self) -> None:
        if not self.token.strip():
            raise ValueError("StaticToken needs a non-empty token")


@dataclass(frozen=True, slots=True)
class ClientCredentials(Credentials):
    """A service account's id and secret, exchanged for tokens with IssueToken
    (OAuth 2.0 client credentials)."""

    client_id: str
    client_secret: str = field(repr=False)
    #: The audience to ask for; empty is the mesh.
    audience: str = ""
    #: Scopes to ask for, a subset of what the account holds.
    scopes: tuple[str, ...] = ()
    refresh_margin: timedelta = timedelta(seconds=60)

    def request(self) -> auth_pb2.IssueTokenRequest:
        """The IssueToken request for a new token."""
        return auth_pb2.IssueTokenRequest(
            client_id=self.client_id,
            client_secret=self.client_secret,
            audience=self.audience,
            scopes=self.scopes,
        )


@dataclass(frozen=True, slots=True)
class TokenExchange(Credentials):
    """A token from a trusted issuer (or ours) exchanged for one of ours with
    ExchangeToken (RFC 8693). With an ``actor``, the new token records that
    party as acting for the subject (the ``act`` claim)."""

    #: The token to exchange, or a function returning the current one.
    subject_token: str | Callable[[], str] = field(repr=False)
    #: The audience of the new token: a service name or the mesh.
    audience: str = "autoecoops"
    #: Who acts on the subject's behalf: its own credentials, or None.
    actor: Credentials | None = None
    scopes: tuple[str, ...] = ()
    subject_token_type: str = JWT_TOKEN_TYPE
    refresh_margin: timedelta = timedelta(seconds=60)

    def request(self, actor_token: str) -> auth_pb2.ExchangeTokenRequest:
        """The ExchangeToken request, with the actor's current token if any."""
        subject = self.subject_token() if callable(self.subject_token) else self.subject_token
        return auth_pb2.ExchangeTokenRequest(
            subject_token=subject,
            subject_token_type=self.subject_token_type,
            actor_token=actor_token,
            actor_token_type=JWT_TOKEN_TYPE if actor_token else "",
            audience=self.audience,
            scopes=self.scopes,
        )


@dataclass(frozen=True, slots=True)
class LocalToken(Credentials):
    """For development: tokens signed with the local key ring, as
    ``autoecoops token`` does, so they verify in a mesh started from the same
    data directory (``autoecoops up``)."""

    subject: str
    roles: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    ttl: timedelta = timedelta(minutes=15)
    #: Empty is the mesh audience.
    audience: str = ""
    #: The mesh's data directory; None reads ``AUTOECOOPS_DATA_DIR`` (default ./.autoecoops).
    data_dir: Path | str | None = None
    refresh_margin: timedelta = timedelta(seconds=60)

    def mint(self) -> tuple[str, float]:
        """Sign a token valid from now; return it and its expiry (epoch seconds).

        On the key ring's own clock, not the client's: keys become active by it.
        """
        # The signing code is auth's own (``autoecoops token`` uses it too);
        # imported here so a client that never uses LocalToken never loads it.
        from autoecoops.kernel.auth.tokens import mint_local_token
        from autoecoops.kernel.mesh.config import MeshConfig

        config = MeshConfig.from_env()
        if self.data_dir is not None:
            config = dataclasses.replace(config, data_dir=Path(self.data_dir))
        issued = mint_local_token(
            config,
            self.subject,
            roles=self.roles,
            groups=self.groups,
            ttl=self.ttl.total_seconds(),
            audience=self.audience,
        )
        return issued.token, issued.expires_at


Invoke = Callable[[str, message.Message], Any]
AsyncInvoke = Callable[[str, message.Message], Awaitable[Any]]


def _expiry(response: Any, token: str, now: float) -> float:
    """When a token from IssueToken/ExchangeToken expires: the response's
    expire_time, else the token's own ``exp``, else soon."""
    if response.HasField("expire_time"):
        return float(response.expire_time.ToNanoseconds() / 1e9)
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        exp = None
    return float(exp) if isinstance(exp, int | float) else now + _UNKNOWN_LIFETIME


class _Cached:
    """The current token of a source and when to replace it."""

    __slots__ = ("generation", "margin", "refresh_at", "token")

    def __init__(self, credentials: Credentials) -> None:
        self.token = ""
        self.refresh_at = 0.0
        #: Counts refreshes, so callers that waited for one take its token.
        self.generation = 0
        self.margin = credentials.refresh_margin.total_seconds()

    def fresh(self, now: float) -> bool:
        return bool(self.token) and now < self.refresh_at

    def store(self, token: str, expires_at: float, fetched_at: float) -> None:
        # Replace the token ``margin`` before it expires, but never in the
        # first half of its life: a short-lived token (or a skewed clock)
        # must not make every call fetch a new one.
        lifetime = max(0.0, expires_at - fetched_at)
        self.token = token
        self.refresh_at = expires_at - min(self.margin, lifetime / 2)
        self.generation += 1


class TokenSource:
    """A sync client's token: cached, refreshed before expiry, one refresh at a time."""

    def __init__(self, credentials: Credentials, invoke: Invoke, clock: Clock) -> None:
        self.credentials = credentials
        self._invoke = invoke
        self._clock = clock
        self._cached = _Cached(credentials)
        self._lock = threading.Lock()
        self._actor = (
            TokenSource(credentials.actor, invoke, clock)
            if isinstance(credentials, TokenExchange) and credentials.actor is not None
            else None
        )

    def token(self) -> str:
        """A token valid for at least the refresh margin."""
        cached = self._cached
        if cached.fresh(self._clock.time()):
            return cached.token
        seen = cached.generation
        with self._lock:
            # Whoever waited on the lock takes the token the holder fetched.
            if cached.generation == seen:
                fetched_at = self._clock.time()
                cached.store(*self._fetch(), fetched_at)
        return cached.token

    def invalidate(self, token: str) -> bool:
        """Forget ``token`` after the server rejected it; False if it cannot be replaced."""
        if isinstance(self.credentials, StaticToken):
            return False
        with self._lock:
            if self._cached.token == token:
                self._cached.refresh_at = 0.0
        return True

    def _fetch(self) -> tuple[str, float]:
        creds, now = self.credentials, self._clock.time()
        if isinstance(creds, StaticToken):
            return creds.token, float("inf")
        if isinstance(creds, LocalToken):
            return creds.mint()
        if isinstance(creds, ClientCredentials):
            reply = self._invoke(ISSUE_TOKEN, creds.request())
        elif isinstance(creds, TokenExchange):
            actor = self._actor.token() if self._actor is not None else ""
            reply = self._invoke(EXCHANGE_TOKEN, creds.request(actor))
        else:
            raise TypeError(f"unsupported credentials: {type(creds).__name__}")
        return reply.access_token, _expiry(reply, reply.access_token, now)


class AsyncTokenSource:
    """An async client's token: cached, refreshed before expiry, one refresh at a time."""

    def __init__(self, credentials: Credentials, invoke: AsyncInvoke, clock: Clock) -> None:
        self.credentials = credentials
        self._invoke = invoke
        self._clock = clock
        self._cached = _Cached(credentials)
        # Created on first use: it must belong to the loop the client runs on.
        self._lock: asyncio.Lock | None = None
        self._actor = (
            AsyncTokenSource(credentials.actor, invoke, clock)
            if isinstance(credentials, TokenExchange) and credentials.actor is not None
            else None
        )

    async def token(self) -> str:
        """A token valid for at least the refresh margin."""
        cached = self._cached
        if cached.fresh(self._clock.time()):
            return cached.token
        seen = cached.generation
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            # Whoever waited on the lock takes the token the holder fetched.
            if cached.generation == seen:
                fetched_at = self._clock.time()
                cached.store(*await self._fetch(), fetched_at)
        return cached.token

    def invalidate(self, token: str) -> bool:
        """Forget ``token`` after the server rejected it; False if it cannot be replaced."""
        if isinstance(self.credentials, StaticToken):
            return False
        if self._cached.token == token:
            self._cached.refresh_at = 0.0
        return True

    async def _fetch(self) -> tuple[str, float]:
        creds, now = self.credentials, self._clock.time()
        if isinstance(creds, StaticToken):
            return creds.token, float("inf")
        if isinstance(creds, LocalToken):
            # Signing reads the key ring from disk: keep it off the event loop.
            return await asyncio.to_thread(creds.mint)
        if isinstance(creds, ClientCredentials):
            reply = await self._invoke(ISSUE_TOKEN, creds.request())
        elif isinstance(creds, TokenExchange):
            actor = await self._actor.token() if self._actor is not None else ""
            reply = await self._invoke(EXCHANGE_TOKEN, creds.request(actor))
        else:
            raise TypeError(f"unsupported credentials: {type(creds).__name__}")
        return reply.access_token, _expiry(reply, reply.access_token, now)


def bearer(token: str) -> tuple[str, str]:
    """The metadata entry that carries ``token``."""
    return ("authorization", f"Bearer {token}")
