"""`autoecoops token`: a signed access token from the local issuer, for development.

It signs with the key ring in the data directory, the same one a local
auth-service uses, so the token verifies everywhere in a local mesh.
"""

from __future__ import annotations

import argparse
import re

from autoecoops.kernel.auth.settings import AuthSettings
from autoecoops.kernel.auth.tokens import mint_local_token
from autoecoops.kernel.mesh.config import MeshConfig
from autoecoops.kernel.mesh.errors import ConfigError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> float:
    """'90s', '15m', '1h', '2d' or plain seconds."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 15m or 1h")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _token(args: argparse.Namespace, config: MeshConfig) -> int:
    settings = AuthSettings.from_env(config)
    if args.ttl > settings.max_token_ttl:
        raise ConfigError(
            f"--ttl {args.ttl:g}s is longer than AUTOECOOPS_AUTH_MAX_TOKEN_TTL_SECONDS={settings.max_token_ttl:g}"
        )
    roles = [r for r in args.roles.split(",") if r]
    groups = [g for g in args.groups.split(",") if g]
    issued = mint_local_token(
        config, args.subject, roles=roles, groups=groups, ttl=args.ttl, audience=args.audience
    )
    print(issued.token)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `autoecoops token`."""
    p = sub.add_parser(
        "token", help="print a signed access token from the local issuer (development)"
    )
    p.add_argument("--subject", required=True, help="the token's subject (sub claim)")
    p.add_argument("--roles", default="", help="comma-separated roles, e.g. admin or viewer")
    p.add_argument("--groups", default="", help="comma-separated groups")
    p.add_argument(
        "--ttl", type=parse_ttl, default=900.0, help="lifetime, e.g. 15m, 1h (default 15m)"
    )
    p.add_argument("--audience", default="", help="audience (default: the mesh audience)")
    p.set_defaults(func=_token)
