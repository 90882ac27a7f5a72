"""Who is calling: the bearer token, its verification and the caller's identity.

The interceptor asks a ``TokenVerifier`` for a ``Principal`` and an
``Authorizer`` whether it holds the method's permission. Until the
auth-service issue wires real verifiers, ``UnavailableVerifier`` rejects every
token: a protected RPC never pretends to authenticate.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from autoecoops.kernel.mesh.errors import Unauthenticated


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller."""

    subject: str
    issuer: str = ""
    roles: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    #: Actors acting for the subject (RFC 8693 ``act``), innermost first.
    actors: tuple[str, ...] = ()
    claims: dict[str, Any] = field(default_factory=dict)
    #: The raw token, forwarded on behalf of the caller.
    token: str = ""


class TokenVerifier(Protocol):
    """Turns a bearer token into a Principal or raises ``Unauthenticated``."""

    async def verify(self, token: str) -> Principal:
        """Verify ``token`` locally; never a network call per request."""
        ...


@runtime_checkable
class ServiceBound(Protocol):
    """A verifier that can be narrowed to the tokens meant for one service (``aud``)."""

    def for_service(self, service: str) -> TokenVerifier:
        """The verifier of ``service``'s server."""
        ...


class Authorizer(Protocol):
    """Decides whether a principal holds a permission."""

    async def check(self, principal: Principal, permission: str, namespace: str = "") -> None:
        """Return if allowed; raise ``PermissionDenied`` naming the permission if not."""
        ...


class UnavailableVerifier:
    """Rejects every token: used until JWT verification is wired in."""

    async def verify(self, token: str) -> Principal:
        """Always raise: there is nothing yet that could vouch for the token."""
        raise Unauthenticated(
            "token verification is not available in this build (it lands with the auth-service issue)",
            reason="TOKEN_VERIFICATION_UNAVAILABLE",
        )


current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "autoecoops_principal", default=None
)


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The token of the ``authorization: Bearer ...`` metadata, or ''.

    A present header with another scheme or no token is rejected rather than
    ignored, so a misconfigured client learns why.
    """
    for key, value in metadata or ():
        if key != "authorization":
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated(
                "authorization metadata must be 'Bearer <token>'", reason="MALFORMED_AUTHORIZATION"
            )
        return token.strip()
    return ""
