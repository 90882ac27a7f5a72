"""auth-service's Redis persistence: roles, bindings, trusted issuers, service accounts.

Each kind is one hash (name -> JSON). Every change to roles or bindings bumps
``rbac:version`` and appends the change to the ``rbac:changes`` stream (entry
id ``<version>-0``) in the same Lua call, so WatchAuthorization can send a
consistent snapshot and then every change after it, in order, and resume a
watcher from its version while the stream still holds the changes after it.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from autoecoops.kernel.auth.rbac import Binding, Policy, Role, Subject
from autoecoops.kernel.mesh.errors import AlreadyExists, NotFound, Unavailable
from autoecoops.kernel.mesh.outbox import Outbox

# KEYS: hash, version counter[, change stream]. ARGV: field, value, mode
# (create|update|delete)[, kind, stream length].
_WRITE = """
local exists = redis.call('HEXISTS', KEYS[1], ARGV[1])
if ARGV[3] == 'create' then
  if exists == 1 then return 0 end
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
elseif ARGV[3] == 'update' then
  if exists == 0 then return 0 end
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
else
  if exists == 0 then return 0 end
  redis.call('HDEL', KEYS[1], ARGV[1])
end
local version = redis.call('INCR', KEYS[2])
if #KEYS == 3 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], version .. '-0',
             'kind', ARGV[4], 'op', ARGV[3], 'name', ARGV[1], 'value', ARGV[2])
end
return 1
"""

#: Changes the stream keeps: a watcher that fell further behind gets a snapshot.
CHANGE_LOG_LENGTH = 10_000


@dataclass(frozen=True, slots=True)
class TrustedIssuer:
    """An external OIDC issuer whose tokens auth-service accepts."""

    name: str
    issuer_url: str
    audiences: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = ("RS256", "ES256")
    groups_claim: str = "groups"
    group_roles: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    jwks_ttl: float = 300.0
    create_time: float = 0.0


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    """A client of the client-credentials grant; only a slow hash of its secret is kept."""

    name: str
    roles: tuple[str, ...]
    description: str = ""
    secret_hash: str = ""
    create_time: float = 0.0


# scrypt at N=2^14: ~30 ms and 16 MiB per guess, OWASP's minimum for scrypt.
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def hash_secret(secret: str) -> str:
    """``scrypt$n$r$p$salt$hash`` of ``secret``."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, dklen=32, maxmem=64 << 20, **_SCRYPT)
    b64 = base64.urlsafe_b64encode
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${b64(salt).decode()}${b64(digest).decode()}"


def check_secret(secret: str, stored: str) -> bool:
    """Constant-time comparison of ``secret`` with a stored scrypt hash."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        want = base64.urlsafe_b64decode(digest)
        got = hashlib.scrypt(
            secret.encode(),
            salt=base64.urlsafe_b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(want),
            maxmem=64 << 20,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(want, got)


def _role(raw: Any) -> Role:
    d = json.loads(raw)
    return Role(
        d["name"],
        tuple(d["permissions"]),
        d.get("description", ""),
        d.get("create_time", 0.0),
        d.get("update_time", 0.0),
    )


def _binding(raw: Any) -> Binding:
    d = json.loads(raw)
    return Binding(
        d["name"],
        d["role"],
        tuple(Subject(**s) for s in d["subjects"]),
        d.get("namespace", ""),
        d.get("create_time", 0.0),
    )


@dataclass(frozen=True, slots=True)
class Change:
    """One change to roles or bindings, at the RBAC version it produced."""

    version: int
    #: "role" or "rolebinding".
    kind: str
    #: "create", "update" or "delete".
    op: str
    name: str
    #: The object after the change; None for a delete.
    value: Role | Binding | None


def _change(entry_id: Any, fields: dict[Any, Any]) -> Change:
    version = int(str(entry_id.decode() if isinstance(entry_id, bytes) else entry_id).split("-")[0])
    f = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }
    value: Role | Binding | None = None
    if f["op"] != "delete":
        value = _role(f["value"]) if f["kind"] == "role" else _binding(f["value"])
    return Change(version, f["kind"], f["op"], f["name"], value)


def _issuer(raw: Any) -> TrustedIssuer:
    d = json.loads(raw)
    d["audiences"] = tuple(d.get("audiences", ()))
    d["algorithms"] = tuple(d.get("algorithms", ()))
    d["group_roles"] = {k: tuple(v) for k, v in d.get("group_roles", {}).items()}
    return TrustedIssuer(**d)


def _account(raw: Any) -> ServiceAccount:
    d = json.loads(raw)
    d["roles"] = tuple(d.get("roles", ()))
    return ServiceAccount(**d)


class AuthStore:
    """Roles, bindings, issuers and service accounts in Redis under ``prefix``."""

    def __init__(self, redis: aioredis.Redis, prefix: str, outbox: Outbox | None = None) -> None:
        self._r = redis
        self._roles = f"{prefix}:roles"
        self._bindings = f"{prefix}:bindings"
        self._issuers = f"{prefix}:issuers"
        self._accounts = f"{prefix}:serviceaccounts"
        self._rbac_version = f"{prefix}:rbac:version"
        self._changes = f"{prefix}:rbac:changes"
        self._issuer_version = f"{prefix}:issuers:version"
        # Service accounts are not part of what services enforce, so their
        # changes do not move the RBAC version watchers follow.
        self._accounts_version = f"{prefix}:serviceaccounts:version"
        # With an outbox, a write that changed something (the script returns
        # 1) commits the audited call's record in the same script.
        self._write: Any = (
            outbox.script(_WRITE, ok="r == 1")
            if outbox is not None
            else self._r.register_script(_WRITE)
        )

    def _rbac_keys(self, hash_key: str) -> list[str]:
        return [hash_key, self._rbac_version, self._changes]

    @staticmethod
    def _log(kind: str) -> list[Any]:
        return [kind, CHANGE_LOG_LENGTH]

    async def _call(self, keys: list[str], args: list[Any]) -> bool:
        try:
            return bool(await self._write(keys=keys, args=args))
        except redis.exceptions.ConnectionError as err:
            raise Unavailable(f"auth store unavailable: {err}", retry_delay=1.0) from None

    async def _get_all(self, key: str) -> list[Any]:
        try:
            raw = await self._r.hgetall(key)
        except redis.exceptions.ConnectionError as err:
            raise Unavailable(f"auth store unavailable: {err}", retry_delay=1.0) from None
        return [raw[k] for k in sorted(raw)]

    async def _get(self, key: str, name: str, kind: str) -> Any:
        try:
            raw = await self._r.hget(key, name)
        except redis.exceptions.ConnectionError as err:
            raise Unavailable(f"auth store unavailable: {err}", retry_delay=1.0) from None
        if raw is None:
            raise NotFound(f"{kind} {name!r} not found", resource_type=kind, resource_name=name)
        return raw

    # -- roles and bindings ------------------------------------------------

    async def create_role(self, role: Role) -> Role:
        """Store a new role; ALREADY_EXISTS if the name is taken."""
        now = time.time()
        role = dataclasses.replace(role, create_time=now, update_time=now)
        if not await self._call(
            self._rbac_keys(self._roles),
            [role.name, json.dumps(asdict(role)), "create", *self._log("role")],
        ):
            raise AlreadyExists(
                f"role {role.name!r} already exists", resource_type="role", resource_name=role.name
            )
        return role

    async def update_role(self, role: Role) -> Role:
        """Replace an existing role."""
        old = await self.get_role(role.name)
        role = dataclasses.replace(role, create_time=old.create_time, update_time=time.time())
        if not await self._call(
            self._rbac_keys(self._roles),
            [role.name, json.dumps(asdict(role)), "update", *self._log("role")],
        ):
            raise NotFound(
                f"role {role.name!r} not found", resource_type="role", resource_name=role.name
            )
        return role

    async def delete_role(self, name: str) -> None:
        """Delete a role; NOT_FOUND if absent."""
        if not await self._call(
            self._rbac_keys(self._roles), [name, "", "delete", *self._log("role")]
        ):
            raise NotFound(f"role {name!r} not found", resource_type="role", resource_name=name)

    async def get_role(self, name: str) -> Role:
        """One role by name."""
        return _role(await self._get(self._roles, name, "role"))

    async def list_roles(self) -> list[Role]:
        """Every role, by name."""
        return [_role(r) for r in await self._get_all(self._roles)]

    async def create_binding(self, binding: Binding) -> Binding:
        """Store a new binding; ALREADY_EXISTS if the name is taken."""
        binding = dataclasses.replace(binding, create_time=time.time())
        value = json.dumps(asdict(binding))
        if not await self._call(
            self._rbac_keys(self._bindings),
            [binding.name, value, "create", *self._log("rolebinding")],
        ):
            raise AlreadyExists(
                f"role binding {binding.name!r} already exists",
                resource_type="rolebinding",
                resource_name=binding.name,
            )
        return binding

    async def update_binding(self, binding: Binding) -> Binding:
        """Replace an existing binding."""
        old = await self.get_binding(binding.name)
        binding = dataclasses.replace(binding, create_time=old.create_time)
        if not await self._call(
            self._rbac_keys(self._bindings),
            [binding.name, json.dumps(asdict(binding)), "update", *self._log("rolebinding")],
        ):
            raise NotFound(
                f"role binding {binding.name!r} not found",
                resource_type="rolebinding",
                resource_name=binding.name,
            )
        return binding

    async def delete_binding(self, name: str) -> None:
        """Delete a binding; NOT_FOUND if absent."""
        if not await self._call(
            self._rbac_keys(self._bindings), [name, "", "delete", *self._log("rolebinding")]
        ):
            raise NotFound(
                f"role binding {name!r} not found", resource_type="rolebinding", resource_name=name
            )

    async def get_binding(self, name: str) -> Binding:
        """One binding by name."""
        return _binding(await self._get(self._bindings, name, "rolebinding"))

    async def list_bindings(self) -> list[Binding]:
        """Every binding, by name."""
        return [_binding(b) for b in await self._get_all(self._bindings)]

    async def rbac_version(self) -> int:
        """The change counter of roles and bindings."""
        try:
            return int(await self._r.get(self._rbac_version) or 0)
        except redis.exceptions.ConnectionError as err:
            raise Unavailable(f"auth store unavailable: {err}", retry_delay=1.0) from None

    async def policy(self) -> tuple[int, Policy]:
        """A consistent snapshot (version, roles and bindings) read in one transaction."""
        try:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.get(self._rbac_version)
                pipe.hgetall(self._roles)
                pipe.hgetall(self._bindings)
                version, roles, bindings = await pipe.execute()
        except redis.exceptions.ConnectionError as err:
            raise Unavailable(f"auth store unavailable: {err}", retry_delay=1.0) from None
        parsed = {r.name: r for r in map(_role, roles.values())}
        return int(version or 0), Policy(parsed, tuple(_binding(b) for b in bindings.values()))

    async def oldest_change(self) -> int | None:
        """The version of the oldest change the log still holds, or None if it is empty."""
        try:
            first: Any = await self._r.xrange(self._changes, "-", "+", count=1)
        except redis.exceptions.ConnectionError as err:
            raise Unavailable(f"auth store unavailable: {err}", retry_delay=1.0) from None
        return _change(*first[0]).version if first else None

    async def changes_after(self, version: int, block: float = 0.0) -> list[Change]:
        """Changes after ``version``, oldest first; waits up to ``block`` seconds for one."""
        entries: Any
        try:
            if block > 0:
                got: Any = await self._r.xread(
                    {self._changes: f"{version}-0"}, count=1000, block=int(block * 1000)
                )
                entries = got[0][1] if got else []
            else:
                entries = await self._r.xrange(self._changes, f"({version}-0", "+", count=1000)
        except redis.exceptions.ConnectionError as err:
            raise Unavailable(f"auth store unavailable: {err}", retry_delay=1.0) from None
        return [_change(entry_id, fields) for entry_id, fields in entries]

    # -- trusted issuers -----------------------------------------------------

    async def put_issuer(self, issuer: TrustedIssuer, mode: str) -> TrustedIssuer:
        """Create (mode 'create') or replace ('update') a trusted issuer."""
        if mode == "create":
            issuer = dataclasses.replace(issuer, create_time=time.time())
        else:
            old = await self.get_issuer(issuer.name)
            issuer = dataclasses.replace(issuer, create_time=old.create_time)
        if not await self._call(
            [self._issuers, self._issuer_version], [issuer.name, json.dumps(asdict(issuer)), mode]
        ):
            if mode == "create":
                raise AlreadyExists(
                    f"trusted issuer {issuer.name!r} already exists",
                    resource_type="trustedissuer",
                    resource_name=issuer.name,
                )
            raise NotFound(
                f"trusted issuer {issuer.name!r} not found",
                resource_type="trustedissuer",
                resource_name=issuer.name,
            )
        return issuer

    async def delete_issuer(self, name: str) -> None:
        """Stop trusting an issuer."""
        if not await self._call([self._issuers, self._issuer_version], [name, "", "delete"]):
            raise NotFound(
                f"trusted issuer {name!r} not found",
                resource_type="trustedissuer",
                resource_name=name,
            )

    async def get_issuer(self, name: str) -> TrustedIssuer:
        """One trusted issuer by name."""
        return _issuer(await self._get(self._issuers, name, "trustedissuer"))

    async def list_issuers(self) -> list[TrustedIssuer]:
        """Every trusted issuer, by name."""
        return [_issuer(i) for i in await self._get_all(self._issuers)]

    async def issuers_version(self) -> int:
        """The change counter of trusted issuers."""
        return int(await self._r.get(self._issuer_version) or 0)

    # -- service accounts ---------------------------------------------------

    async def create_account(self, account: ServiceAccount, secret: str) -> ServiceAccount:
        """Store an account with the scrypt hash of ``secret``."""
        account = dataclasses.replace(
            account, secret_hash=hash_secret(secret), create_time=time.time()
        )
        if not await self._call(
            [self._accounts, self._accounts_version],
            [account.name, json.dumps(asdict(account)), "create"],
        ):
            raise AlreadyExists(
                f"service account {account.name!r} already exists",
                resource_type="serviceaccount",
                resource_name=account.name,
            )
        return account

    async def delete_account(self, name: str) -> None:
        """Delete an account."""
        if not await self._call([self._accounts, self._accounts_version], [name, "", "delete"]):
            raise NotFound(
                f"service account {name!r} not found",
                resource_type="serviceaccount",
                resource_name=name,
            )

    async def get_account(self, name: str) -> ServiceAccount | None:
        """One account, or None."""
        raw = await self._r.hget(self._accounts, name)
        return None if raw is None else _account(raw)

    async def list_accounts(self) -> list[ServiceAccount]:
        """Every account, by name."""
        return [_account(a) for a in await self._get_all(self._accounts)]
