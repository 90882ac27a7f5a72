"""Our token issuer: signs short-lived access tokens with the key ring's signer."""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt

from autoecoops.kernel.auth.keys import KeyRing
from autoecoops.kernel.mesh.config import MeshConfig


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A signed token and when it expires (epoch seconds)."""

    token: str
    expires_at: float
    claims: Mapping[str, Any]


class Issuer:
    """Signs JWT access tokens (RFC 9068 shape) for ``issuer``."""

    def __init__(self, issuer: str, ring: KeyRing) -> None:
        self.issuer = issuer
        self.ring = ring

    def issue(
        self,
        subject: str,
        audience: str | Sequence[str],
        ttl: float,
        *,
        roles: Sequence[str] = (),
        groups: Sequence[str] = (),
        scopes: Sequence[str] = (),
        act: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> IssuedToken:
        """Sign a token for ``subject``; ``act`` records delegation (RFC 8693)."""
        now = time.time() if now is None else now
        key = self.ring.signer(now)
        iat = int(now)
        claims: dict[str, Any] = {
            **(extra or {}),
            "iss": self.issuer,
            "sub": subject,
            "aud": audience if isinstance(audience, str) else list(audience),
            "iat": iat,
            "nbf": iat,
            "exp": iat + int(ttl),
            "jti": secrets.token_urlsafe(16),
        }
        if roles:
            claims["roles"] = sorted(set(roles))
        if groups:
            claims["groups"] = list(groups)
        if scopes:
            claims["scope"] = " ".join(scopes)
        if act:
            claims["act"] = dict(act)
        token = jwt.encode(
            claims,
            key.private,
            algorithm=key.meta.alg,
            headers={"kid": key.meta.kid, "typ": "at+jwt"},
        )
        return IssuedToken(token, float(claims["exp"]), claims)


def mint_local_token(
    config: MeshConfig,
    subject: str,
    *,
    roles: Sequence[str] = (),
    groups: Sequence[str] = (),
    ttl: float = 900.0,
    audience: str = "",
) -> IssuedToken:
    """A token signed with the key ring in ``config``'s data directory (development).

    It is the same ring a local auth-service signs with, so the token verifies
    everywhere in a local mesh. ``autoecoops token`` and the CLIs use this.
    """
    from autoecoops.kernel.auth.settings import AuthSettings

    s = AuthSettings.from_env(config)
    ring = KeyRing(s.key_dir, publish_delay=s.publish_delay, max_token_ttl=s.max_token_ttl)
    ring.load_or_create(s.signing_alg, s.key_file)
    return Issuer(s.issuer, ring).issue(
        subject, audience or s.audience, ttl, roles=roles, groups=groups
    )
