"""OIDC federation: trusted external issuers and their keys.

An issuer's keys are found the OpenID Connect way: its discovery document
(``<issuer>/.well-known/openid-configuration``) names the ``jwks_uri``. Only
https is fetched, except for loopback addresses (local development and tests).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlparse

import httpx

from autoecoops.kernel.auth.store import TrustedIssuer
from autoecoops.kernel.auth.verify import IssuerPolicy, JwksCache
from autoecoops.kernel.mesh.errors import FieldViolation, InvalidArgument

_TIMEOUT = httpx.Timeout(5.0)
_MAX_DOC_BYTES = 1 << 20


def check_issuer_url(url: str, field_name: str = "trusted_issuer.issuer_url") -> None:
    """https, or http to a loopback host; no credentials, query or fragment."""
    parsed = urlparse(url)
    loopback = False
    if parsed.hostname:
        try:
            loopback = ipaddress.ip_address(parsed.hostname).is_loopback
        except ValueError:
            loopback = parsed.hostname == "localhost"
    ok = (
        (parsed.scheme == "https" or (parsed.scheme == "http" and loopback))
        and parsed.hostname
        and not parsed.username
        and not parsed.query
        and not parsed.fragment
    )
    if not ok:
        raise InvalidArgument(
            f"{url!r} is not an acceptable issuer URL",
            field_violations=[
                FieldViolation(
                    field_name,
                    "must be https (http only for loopback), without query or credentials",
                )
            ],
        )


async def _get_json(client: httpx.AsyncClient, url: str) -> Any:
    check_issuer_url(url, "jwks_uri")
    resp = await client.get(url, follow_redirects=False)
    resp.raise_for_status()
    if len(resp.content) > _MAX_DOC_BYTES:
        raise ValueError(f"{url}: document larger than {_MAX_DOC_BYTES} bytes")
    return resp.json()


def oidc_jwks_fetcher(issuer_url: str, client: httpx.AsyncClient) -> Any:
    """A fetch function for JwksCache: discovery document, then its jwks_uri."""

    async def fetch() -> Sequence[Mapping[str, Any]]:
        doc = await _get_json(client, issuer_url.rstrip("/") + "/.well-known/openid-configuration")
        if doc.get("issuer", "").rstrip("/") != issuer_url.rstrip("/"):
            # OIDC Discovery 4.3: the document must name the issuer it was fetched for.
            raise ValueError(f"discovery document names issuer {doc.get('issuer')!r}")
        jwks = await _get_json(client, str(doc["jwks_uri"]))
        keys = jwks.get("keys", [])
        return [k for k in keys if isinstance(k, dict)]

    return fetch


class Federation:
    """Builds and caches an IssuerPolicy (with its JWKS cache) per trusted issuer."""

    def __init__(self, *, cooldown: float) -> None:
        self._client = httpx.AsyncClient(timeout=_TIMEOUT)
        self._cooldown = cooldown
        self._caches: dict[tuple[str, float], JwksCache] = {}

    def policy(self, issuer: TrustedIssuer) -> IssuerPolicy:
        """The verification policy of ``issuer``; its key cache survives config reloads."""
        cache_key = (issuer.issuer_url.rstrip("/"), issuer.jwks_ttl)
        cache = self._caches.get(cache_key)
        if cache is None:
            cache = JwksCache(
                oidc_jwks_fetcher(issuer.issuer_url, self._client),
                ttl=issuer.jwks_ttl,
                cooldown=self._cooldown,
            )
            self._caches[cache_key] = cache
        return IssuerPolicy(
            issuer=issuer.issuer_url,  # must equal the tokens' iss exactly
            keys=cache,
            audiences=frozenset(issuer.audiences),
            algorithms=frozenset(issuer.algorithms),
            groups_claim=issuer.groups_claim or "groups",
            group_roles={g: tuple(r) for g, r in issuer.group_roles.items()},
        )

    def cache(self, issuer_url: str) -> JwksCache | None:
        """The key cache of an issuer URL (for stats and tests)."""
        for (url, _), cache in self._caches.items():
            if url == issuer_url.rstrip("/"):
                return cache
        return None

    async def close(self) -> None:
        """Close the HTTP client."""
        await self._client.aclose()
