"""The seed file: roles, bindings, service accounts and trusted issuers to
create at start (``AUTOECOOPS_AUTH_SEED_FILE``). Example::

    roles:
      - {name: memory-reader, permissions: [memory.*.get, memory.documents.search]}
    bindings:
      - {name: team-a-readers, role: memory-reader, namespace: team-a,
         subjects: [{kind: group, name: corp:team-a}]}
    serviceAccounts:
      - {name: ci, roles: [admin], secretEnv: CI_CLIENT_SECRET}   # or secretFile: /path
    trustedIssuers:
      - {name: corp, issuerUrl: https://login.corp.example, audiences: [autoecoops],
         algorithms: [RS256], groupsClaim: groups, groupRoles: {sre: [admin]}, jwksTtlSeconds: 300}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from autoecoops.kernel.auth.rbac import Binding, Role, Subject
from autoecoops.kernel.auth.store import ServiceAccount, TrustedIssuer
from autoecoops.kernel.mesh.errors import ConfigError

Seed = tuple[list[Role], list[Binding], list[tuple[ServiceAccount, str]], list[TrustedIssuer]]


def load_seed(path: Path) -> dict[str, Any]:
    """Read the seed YAML; a broken file fails start with one line."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"AUTOECOOPS_AUTH_SEED_FILE={path}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"AUTOECOOPS_AUTH_SEED_FILE={path}: expected a mapping at the top")
    return data


def _secret(entry: dict[str, Any]) -> str:
    if "secretEnv" in entry:
        value = os.environ.get(str(entry["secretEnv"]), "")
    elif "secretFile" in entry:
        value = Path(str(entry["secretFile"])).read_text().strip()
    else:
        value = ""
    if len(value) < 16:
        raise ConfigError(
            f"service account {entry.get('name')!r}: its secret must come from secretEnv/secretFile and be >= 16 characters"
        )
    return value


def parse_seed(data: dict[str, Any]) -> Seed:
    """Typed objects from the seed mapping."""
    try:
        roles = [
            Role(r["name"], tuple(r["permissions"]), r.get("description", ""))
            for r in data.get("roles", [])
        ]
        bindings = [
            Binding(
                b["name"],
                b["role"],
                tuple(Subject(s["kind"], s["name"]) for s in b["subjects"]),
                b.get("namespace", ""),
            )
            for b in data.get("bindings", [])
        ]
        accounts = [
            (
                ServiceAccount(a["name"], tuple(a.get("roles", [])), a.get("description", "")),
                _secret(a),
            )
            for a in data.get("serviceAccounts", [])
        ]
        issuers = [
            TrustedIssuer(
                name=i["name"],
                issuer_url=i["issuerUrl"],
                audiences=tuple(i.get("audiences", [])),
                algorithms=tuple(i.get("algorithms", ["RS256", "ES256"])),
                groups_claim=i.get("groupsClaim", "groups"),
                group_roles={k: tuple(v) for k, v in i.get("groupRoles", {}).items()},
                jwks_ttl=float(i.get("jwksTtlSeconds", 300)),
            )
            for i in data.get("trustedIssuers", [])
        ]
    except (KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"AUTOECOOPS_AUTH_SEED_FILE: malformed entry ({err})") from None
    return roles, bindings, accounts, issuers
