"""Token verification cost (issue #4): what the mesh interceptor pays per call.

- miss: JwtVerifier.verify with the verified-token cache off (every call runs
  the full RFC 8725 checks and the ES256 signature check);
- hit: JwtVerifier.verify of a token already verified (the hot path);
- baseline: raw ``jwt.decode`` of the same token with the same key, audience,
  issuer, leeway and required claims, in the same run.

    .venv/bin/python bench/bench_auth.py [--n 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt

from autoecoops.kernel.auth.keys import KeyRing
from autoecoops.kernel.auth.tokens import Issuer
from autoecoops.kernel.auth.verify import IssuerPolicy, JwtVerifier


class Keys:
    """Keys already fetched, as a warm JwksCache holds them."""

    def __init__(self, ring: KeyRing) -> None:
        self.keys = ring.public_keys()

    async def key(self, kid: str) -> tuple[str, Any] | None:
        return self.keys.get(kid)


def per_call(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return statistics.median(samples) * 1e6, samples[int(len(samples) * 0.99)] * 1e6


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ring = KeyRing(Path(tmp), publish_delay=0, max_token_ttl=3600)
        ring.load_or_create("ES256")
        token = Issuer("https://iss", ring).issue("alice", "autoecoops", 900, roles=["admin"]).token
        kid = jwt.get_unverified_header(token)["kid"]
        alg, public = ring.public_keys()[kid]
        policy = IssuerPolicy(
            "https://iss", Keys(ring), frozenset({"autoecoops"}), trust_roles_claim=True
        )
        miss = JwtVerifier([policy], cache_size=0)
        hit = JwtVerifier([policy])
        await hit.verify(token)

        def raw() -> None:
            jwt.decode(
                token,
                public,
                algorithms=[alg],
                audience="autoecoops",
                issuer="https://iss",
                leeway=60,
            )

        results: dict[str, list[float]] = {"raw": [], "miss": [], "hit": []}
        for _ in range(3):  # interleave rounds so machine noise hits all three alike
            for _ in range(n // 3):
                t0 = time.perf_counter()
                raw()
                results["raw"].append(time.perf_counter() - t0)
            for _ in range(n // 3):
                t0 = time.perf_counter()
                await miss.verify(token)
                results["miss"].append(time.perf_counter() - t0)
            for _ in range(n // 3):
                t0 = time.perf_counter()
                await hit.verify(token)
                results["hit"].append(time.perf_counter() - t0)
    raw50, _ = per_call(results["raw"])
    print(f"ES256 token verification, {n} calls each (µs per call)")
    for name in ("raw", "miss", "hit"):
        p50, p99 = per_call(results[name])
        label = {"raw": "raw jwt.decode", "miss": "verifier, miss", "hit": "verifier, hit"}[name]
        print(f"  {label:<16} p50 {p50:8.2f}  p99 {p99:8.2f}  ratio to raw p50 {p50 / raw50:.3f}x")
    miss50 = per_call(results["miss"])[0]
    hit50 = per_call(results["hit"])[0]
    print(
        f"  targets: miss <= 1.2x raw (got {miss50 / raw50:.2f}x), hit <= 10 µs (got {hit50:.2f} µs)"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=6000)
    asyncio.run(main(ap.parse_args().n))
