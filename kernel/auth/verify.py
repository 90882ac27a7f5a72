"""JWT verification, local and cached: the RFC 8725 checklist in one place.

``JwtVerifier`` turns a bearer token into a ``Principal`` or raises
``Unauthenticated`` with a reason (``TOKEN_EXPIRED``, ``TOKEN_INVALID``, ...)
and a message that names the rule, never the key. Keys come from a
``KeySource`` per issuer: our own (auth-service's JWKS, fetched over gRPC by
the other services) or a trusted OIDC issuer's (fetched over HTTP).

``JwksCache`` is that key source's memory: keys are kept for a TTL; an unknown
kid triggers at most one refetch per cooldown, and unknown kids are
remembered for the cooldown (a negative cache) so a flood of forged kids
cannot turn into a flood of fetches; when the issuer is unreachable the
known keys keep serving.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import jwt
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from autoecoops.kernel.mesh.auth import Principal
from autoecoops.kernel.mesh.errors import Unauthenticated

log = logging.getLogger("autoecoops.auth")

#: Claims every token must carry (RFC 8725 3.9, 3.10: iss/aud bind the token to us).
REQUIRED_CLAIMS = ("exp", "iat", "iss", "aud", "sub")
# Built once: PyJWT only reads it, and this is the hot path of every cache miss.
_OPTIONS: Any = {"require": list(REQUIRED_CLAIMS), "verify_iat": True}
# Header parameters naming a key (jku, x5u, jwk, x5c) are never read: keys
# come only from the issuer's configured KeySource (RFC 8725 3.10).


def reject(reason: str, message: str) -> Unauthenticated:
    """An UNAUTHENTICATED error with a reason a client can branch on."""
    return Unauthenticated(f"token rejected: {message}", reason=reason)


class KeySource(Protocol):
    """Public keys of one issuer by kid."""

    async def key(self, kid: str) -> tuple[str, Any] | None:
        """(alg, public key) for ``kid``, or None when the issuer has no such key."""
        ...


def jwk_to_key(jwk: Mapping[str, Any]) -> tuple[str, Any] | None:
    """(alg, public key) from a JWK; None for key types we do not accept."""
    kty, alg = jwk.get("kty"), jwk.get("alg")
    try:
        if kty == "EC" and jwk.get("crv") == "P-256":
            return str(alg or "ES256"), ECAlgorithm.from_jwk(dict(jwk))
        if kty == "RSA":
            return str(alg or "RS256"), RSAAlgorithm.from_jwk(dict(jwk))
    except (jwt.InvalidKeyError, ValueError, KeyError, TypeError):
        log.warning("ignoring malformed JWK kid=%s", jwk.get("kid"))
    return None


#: Seconds before a failed JWKS fetch is tried again (at most the cooldown).
FAILED_FETCH_RETRY = 1.0


class JwksCache:
    """A JWK Set fetched on demand, cached with TTL, refetch cooldown and negative cache."""

    def __init__(
        self,
        fetch: Callable[[], Awaitable[Sequence[Mapping[str, Any]]]],
        *,
        ttl: float,
        cooldown: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._ttl, self._cooldown, self._clock = ttl, cooldown, clock
        self._keys: dict[str, tuple[str, Any]] = {}
        self._fetched_at: float | None = None
        self._last_attempt: float | None = None
        self._unknown: dict[str, float] = {}
        self._lock = asyncio.Lock()
        #: Fetches made, for tests and metrics.
        self.fetches = 0

    async def key(self, kid: str) -> tuple[str, Any] | None:
        """The key for ``kid``; refetches when stale or on an unknown kid (rate-limited)."""
        now = self._clock()
        fresh = self._fetched_at is not None and now - self._fetched_at < self._ttl
        found = self._keys.get(kid)
        if found is not None and fresh:
            return found
        if found is None:
            seen = self._unknown.get(kid)
            if seen is not None and now - seen < self._cooldown:
                return None
        fetched = await self._refresh(force=found is None)
        found = self._keys.get(kid)
        if found is None and fetched:
            # Only a set that was fetched can say a kid is unknown; after a
            # failed fetch (the issuer restarting) the next token asks again.
            if len(self._unknown) > 10_000:
                self._unknown.clear()
            self._unknown[kid] = self._clock()
        return found

    async def _refresh(self, force: bool) -> bool:
        """Fetch the set unless one was just fetched (or tried); True if one was fetched."""
        async with self._lock:
            now = self._clock()
            if self._last_attempt is not None:
                # After a success the cooldown holds (RFC 8725's rate limit on
                # unknown kids); after a failure a shorter wait, or a restarted
                # issuer's new keys would be refused for the whole cooldown.
                failed = self._fetched_at is None or self._fetched_at < self._last_attempt
                wait = min(self._cooldown, FAILED_FETCH_RETRY) if failed else self._cooldown
                if now - self._last_attempt < wait:
                    return False  # someone just fetched (or failed to); do not hammer the issuer
            if not force and self._fetched_at is not None and now - self._fetched_at < self._ttl:
                return False
            self._last_attempt = now
            self.fetches += 1
            try:
                jwks = await self._fetch()
            except Exception as exc:  # the issuer being down must not take verification down
                log.warning("JWKS fetch failed, serving %d known keys: %s", len(self._keys), exc)
                return False
            keys = {}
            for jwk in jwks:
                kid, parsed = jwk.get("kid"), jwk_to_key(jwk)
                if isinstance(kid, str) and parsed is not None:
                    keys[kid] = parsed
            self._keys, self._fetched_at = keys, self._clock()
            self._unknown = {k: t for k, t in self._unknown.items() if k not in keys}
            return True


@dataclass(frozen=True)
class IssuerPolicy:
    """What we accept from one issuer."""

    issuer: str
    keys: KeySource
    audiences: frozenset[str]
    algorithms: frozenset[str] = frozenset({"ES256", "RS256"})
    #: Claim holding the subject's groups.
    groups_claim: str = "groups"
    #: Group -> roles mapping applied to this issuer's tokens.
    group_roles: Mapping[str, Sequence[str]] = field(default_factory=dict)
    #: Whether a ``roles`` claim grants roles. Only for our own issuer: an
    #: external issuer's roles mean nothing here until mapped from groups.
    trust_roles_claim: bool = False

    @functools.cached_property
    def audience_list(self) -> list[str]:
        """The audiences as PyJWT takes them, built once."""
        return sorted(self.audiences)


def actors_of(claims: Mapping[str, Any]) -> tuple[str, ...]:
    """The ``act`` chain (RFC 8693 4.1), innermost (most recent) actor first."""
    chain: list[str] = []
    act = claims.get("act")
    while isinstance(act, Mapping) and len(chain) < 16:
        chain.append(str(act.get("sub", "")))
        act = act.get("act")
    return tuple(chain)


def _b64json(segment: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def _peek(segment: str) -> dict[str, Any]:
    """A header or claims segment *unverified*, only to pick the issuer policy and key.

    PyJWT's own unverified parsing costs ~50 µs per token; this costs ~3. No
    decision rests on these values: PyJWT verifies everything afterwards.
    """
    try:
        value = _b64json(segment)
    except (ValueError, UnicodeDecodeError):
        raise reject("TOKEN_MALFORMED", "the token cannot be parsed") from None
    if not isinstance(value, dict):
        raise reject("TOKEN_MALFORMED", "the token cannot be parsed")
    return value


@functools.lru_cache(maxsize=512)
def _alg_and_kid(head: str) -> tuple[Any, Any]:
    """(alg, kid) of a header segment; cached, since one issuer's tokens share a header."""
    header = _peek(head)
    return header.get("alg"), header.get("kid")


def _strings(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, Iterable):
        return tuple(str(v) for v in value)
    return ()


class JwtVerifier:
    """Verifies tokens of known issuers locally; caches verified tokens until exp."""

    def __init__(
        self,
        issuers: Iterable[IssuerPolicy] = (),
        *,
        leeway: float = 60.0,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._issuers = {p.issuer: p for p in issuers}
        self._leeway = leeway
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._cache_size = cache_size
        self._clock = clock

    def set_issuers(self, issuers: Iterable[IssuerPolicy]) -> None:
        """Replace the trusted issuers; verified tokens are forgotten."""
        self._issuers = {p.issuer: p for p in issuers}
        self._cache.clear()

    @property
    def issuers(self) -> Mapping[str, IssuerPolicy]:
        """The issuers trusted now."""
        return self._issuers

    async def verify(self, token: str) -> Principal:
        """A Principal for a valid token; ``Unauthenticated`` with a reason otherwise."""
        hit = self._cache.get(token)
        if hit is not None:
            if hit[1] > self._clock():
                return hit[0]
            del self._cache[token]
        principal, exp = await self._verify(token)
        if self._cache_size:
            self._cache[token] = (principal, exp)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return principal

    async def claims(self, token: str) -> dict[str, Any]:
        """Every claim of a valid token (uncached; for introspection)."""
        principal, _ = await self._verify(token)
        return dict(principal.claims)

    async def _verify(self, token: str) -> tuple[Principal, float]:
        if not isinstance(token, str) or token.count(".") != 2 or len(token) > 16_384:
            raise reject("TOKEN_MALFORMED", "not a compact JWS")
        head, body, _ = token.split(".")
        alg, kid = _alg_and_kid(head)
        if not isinstance(alg, str) or alg.lower() == "none":
            raise reject("ALGORITHM_NOT_ALLOWED", "unsigned tokens are not accepted")
        if len(self._issuers) == 1:
            # One trusted issuer (every mesh service): no need to read iss
            # before verifying; PyJWT checks it against the policy below.
            (policy,) = self._issuers.values()
            iss = policy.issuer
        else:
            claimed = _peek(body).get("iss")
            if not isinstance(claimed, str):
                raise reject("CLAIM_MISSING", "the iss claim is required")
            iss = claimed
            found_policy = self._issuers.get(iss)
            if found_policy is None:
                raise reject("ISSUER_UNTRUSTED", "the issuer is not trusted")
            policy = found_policy
        # The allow-list is the issuer's, never the header's: this is what stops
        # HS256-with-a-public-key and other algorithm confusion.
        if alg not in policy.algorithms:
            raise reject("ALGORITHM_NOT_ALLOWED", f"algorithm {alg} is not allowed for this issuer")
        if not isinstance(kid, str) or not kid:
            raise reject("KEY_UNKNOWN", "the token names no key id")
        found = await policy.keys.key(kid)
        if found is None:
            if _peek(body).get("iss") != policy.issuer:
                raise reject("ISSUER_UNTRUSTED", "the issuer is not trusted")
            raise reject("KEY_UNKNOWN", "the signing key is not known")
        key_alg, key = found
        if key_alg != alg:
            raise reject("ALGORITHM_NOT_ALLOWED", "the algorithm does not match the key")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=policy.audience_list,
                issuer=iss,
                leeway=self._leeway,
                options=_OPTIONS,
            )
        except jwt.ExpiredSignatureError:
            raise reject("TOKEN_EXPIRED", "the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise reject(
                "TOKEN_NOT_YET_VALID", "the token is not valid yet (nbf or iat in the future)"
            ) from None
        except jwt.InvalidIssuedAtError:
            raise reject("TOKEN_INVALID", "the iat claim is invalid") from None
        except jwt.MissingRequiredClaimError as err:
            raise reject("CLAIM_MISSING", f"the {err.claim} claim is required") from None
        except jwt.InvalidAudienceError:
            raise reject("AUDIENCE_MISMATCH", "the token is not meant for this audience") from None
        except jwt.InvalidIssuerError:
            raise reject("ISSUER_UNTRUSTED", "the issuer is not trusted") from None
        except jwt.InvalidSignatureError:
            raise reject("TOKEN_INVALID", "the signature does not verify") from None
        except jwt.PyJWTError:
            raise reject("TOKEN_INVALID", "the token is invalid") from None
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise reject("CLAIM_MISSING", "the sub claim is required")
        groups = _strings(claims.get(policy.groups_claim, ()))
        roles = set(_strings(claims.get("roles", ()))) if policy.trust_roles_claim else set()
        for group in groups:
            roles.update(policy.group_roles.get(group, ()))
        principal = Principal(
            subject=claims["sub"],
            issuer=iss,
            roles=tuple(sorted(roles)),
            groups=groups,
            actors=actors_of(claims),
            claims=claims,
            token=token,
        )
        return principal, float(claims["exp"])
