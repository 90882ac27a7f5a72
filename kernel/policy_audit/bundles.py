"""Policy bundles: their content and revision, loading them from disk, and the registry.

A bundle is a set of Rego modules plus base data, with the data roots it
owns and the JSON pointers masked from its decision logs. On disk it is an
OPA-style bundle, a directory or a ``.tar.gz`` of one:

    .manifest            optional JSON: {"roots": [...], "metadata": {"description": ..., "masks": [...]}}
    **/*.rego            modules (``*_test.rego`` files are tests, not loaded)
    **/data.json         base data, placed under the data path of its directory

Its revision is ``sha256:`` and the digest of the RFC 8785 JSON of its
content (roots, modules, data, masks), so it changes exactly when the
content does, whichever way the bundle arrived.

The registry keeps bundles in Redis (one hash, one version counter) so all
replicas serve the same revisions; each replica compiles what it serves and
polls the counter to pick up changes made elsewhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import logging
import re
import tarfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import redis.asyncio as aioredis

from autoecoops.kernel.mesh.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from autoecoops.kernel.mesh.outbox import Outbox, make_event
from autoecoops.kernel.policy_audit.canonical import canonical_json
from autoecoops.kernel.policy_audit.engine import (
    CompiledBundle,
    CompileError,
    package_path,
    unsupported,
)
from autoecoops.policy.v1 import events_pb2 as policy_events_pb2

log = logging.getLogger("autoecoops.policy_audit")

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
_ROOT = re.compile(r"^[A-Za-z_][\w-]*(/[A-Za-z_][\w-]*)*$")
WRITABLE = ("description", "roots", "modules", "data", "masks")
MAX_TARBALL_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class BundleSpec:
    """A bundle's content and bookkeeping."""

    name: str
    description: str = ""
    roots: tuple[str, ...] = ()
    #: (module path, Rego source), sorted by path.
    modules: tuple[tuple[str, str], ...] = ()
    data: Mapping[str, Any] = field(default_factory=dict)
    masks: tuple[str, ...] = ()
    #: '' for bundles managed by RPC; 'dir:<path>' or 'shipped:' for files.
    source: str = ""
    revision: str = ""
    create_time_ns: int = 0
    update_time_ns: int = 0
    activate_time_ns: int = 0

    def content_revision(self) -> str:
        """``sha256:<hex>`` of the RFC 8785 JSON of roots, modules, data and masks."""
        doc = {
            "roots": list(self.roots),
            "modules": [{"path": p, "source": s} for p, s in self.modules],
            "data": dict(self.data),
            "masks": list(self.masks),
        }
        return "sha256:" + hashlib.sha256(canonical_json(doc)).hexdigest()

    def to_json(self) -> str:
        """The stored form."""
        doc = dataclasses.asdict(self)
        doc["modules"] = [list(m) for m in self.modules]
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> BundleSpec:
        """Parse the stored form."""
        doc = json.loads(raw)
        doc["roots"] = tuple(doc["roots"])
        doc["masks"] = tuple(doc["masks"])
        doc["modules"] = tuple((p, s) for p, s in doc["modules"])
        return cls(**doc)


def _segments(path: str) -> tuple[str, ...]:
    return tuple(s for s in path.split("/") if s)


def overlaps(a: str, b: str) -> bool:
    """Whether two data roots overlap (one is a segment prefix of the other)."""
    sa, sb = _segments(a), _segments(b)
    n = min(len(sa), len(sb))
    return sa[:n] == sb[:n]


def check_pointer(pointer: str) -> str | None:
    """Why ``pointer`` is not a decision-log mask, or None."""
    if not pointer.startswith("/"):
        return "a JSON pointer starts with '/'"
    first = pointer[1:].split("/")[0]
    if first not in ("input", "result"):
        return "masks apply under /input or /result"
    if re.search(r"~(?![01])", pointer):
        return "'~' must be escaped as ~0 or ~1"
    return None


def validate(spec: BundleSpec, prefix: str = "bundle") -> None:
    """Raise InvalidArgument naming every bad field of a bundle (compilation aside)."""
    bad: list[FieldViolation] = []
    if not _NAME.match(spec.name):
        bad.append(FieldViolation(f"{prefix}.name", "lowercase letters, digits and '-', 1-63"))
    for i, root in enumerate(spec.roots):
        if not _ROOT.match(root):
            bad.append(FieldViolation(f"{prefix}.roots[{i}]", "a slash path of identifiers"))
    for i, a in enumerate(spec.roots):
        for b in spec.roots[i + 1 :]:
            if overlaps(a, b):
                bad.append(FieldViolation(f"{prefix}.roots[{i}]", f"overlaps root {b!r}"))
    seen: set[str] = set()
    for i, (path, source) in enumerate(spec.modules):
        if not path.endswith(".rego") or path.startswith("/") or ".." in path.split("/"):
            bad.append(
                FieldViolation(f"{prefix}.modules[{i}].path", "a relative path ending .rego")
            )
        if path in seen:
            bad.append(FieldViolation(f"{prefix}.modules[{i}].path", "duplicate module path"))
        seen.add(path)
        why = unsupported(source)
        if why:
            bad.append(FieldViolation(f"{prefix}.modules[{i}].source", f"{path}: {why}"))
        pkg = package_path(source)
        if not pkg:
            bad.append(FieldViolation(f"{prefix}.modules[{i}].source", "declares no package"))
        elif spec.roots and not any(
            _segments(pkg)[: len(_segments(r))] == _segments(r) for r in spec.roots
        ):
            bad.append(
                FieldViolation(
                    f"{prefix}.modules[{i}].source",
                    f"package {pkg.replace('/', '.')} is outside the bundle's roots",
                )
            )
    for key in spec.data:
        if spec.roots and not any(overlaps(key, r) for r in spec.roots):
            bad.append(FieldViolation(f"{prefix}.data", f"data key {key!r} is outside the roots"))
    for i, pointer in enumerate(spec.masks):
        why = check_pointer(pointer)
        if why:
            bad.append(FieldViolation(f"{prefix}.masks[{i}]", why))
    if bad:
        raise InvalidArgument(
            "invalid bundle: " + "; ".join(f"{v.field}: {v.description}" for v in bad),
            reason="INVALID_BUNDLE",
            field_violations=bad,
        )


def compile_spec(spec: BundleSpec, prefix: str = "bundle") -> CompiledBundle:
    """Compile a bundle; a compile error is INVALID_ARGUMENT with the compiler's message."""
    try:
        return CompiledBundle(dict(spec.modules), spec.data)
    except CompileError as err:
        paths = [p for p, _ in spec.modules]
        violations = [
            FieldViolation(
                f"{prefix}.modules[{paths.index(m)}].source" if m in paths else f"{prefix}.modules",
                f"{m}:{line}:{col}: {msg}",
            )
            for m, line, col, msg in err.errors
        ]
        raise InvalidArgument(
            f"the bundle's modules do not compile: {err}",
            reason="POLICY_COMPILE_ERROR",
            field_violations=violations,
        ) from None


# -- files -------------------------------------------------------------------


def _from_files(name: str, files: Mapping[str, bytes], source: str) -> BundleSpec:
    manifest: dict[str, Any] = {}
    modules: list[tuple[str, str]] = []
    data: dict[str, Any] = {}
    for path in sorted(files):
        raw = files[path]
        pure = PurePosixPath(path)
        if path == ".manifest":
            manifest = json.loads(raw)
        elif pure.suffix == ".rego" and not pure.name.endswith("_test.rego"):
            modules.append((path, raw.decode("utf-8")))
        elif pure.name == "data.json":
            doc = json.loads(raw)
            target = data
            for seg in pure.parent.parts:
                target = target.setdefault(seg, {})
            if not isinstance(doc, dict):
                raise ValueError(f"{path}: data.json must hold an object")
            target.update(doc)
    meta = manifest.get("metadata") or {}
    return BundleSpec(
        name=name,
        description=str(meta.get("description", "")),
        roots=tuple(manifest.get("roots", ())),
        modules=tuple(modules),
        data=data,
        masks=tuple(meta.get("masks", ())),
        source=source,
    )


def load_dir(path: Path, name: str | None = None, source: str | None = None) -> BundleSpec:
    """Read a bundle directory."""
    files = {
        p.relative_to(path).as_posix(): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and (p.suffix == ".rego" or p.name in ("data.json", ".manifest"))
    }
    return _from_files(name or path.name, files, source if source is not None else f"dir:{path}")


def load_tarball(path: Path, name: str | None = None) -> BundleSpec:
    """Read a ``.tar.gz`` bundle (regular files only; no links, no escaping paths)."""
    raw = path.read_bytes()
    files: dict[str, bytes] = {}
    total = 0
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            member_name = member.name
            while member_name.startswith("./"):
                member_name = member_name[2:]
            rel = PurePosixPath(member_name or ".")
            if rel.is_absolute() or ".." in rel.parts:
                raise ValueError(f"{path}: member {member.name!r} escapes the bundle")
            total += member.size
            if total > MAX_TARBALL_BYTES:
                raise ValueError(f"{path}: larger than {MAX_TARBALL_BYTES} bytes unpacked")
            if rel.suffix == ".rego" or rel.name in ("data.json", ".manifest"):
                extracted = tar.extractfile(member)
                if extracted is not None:
                    files[rel.as_posix()] = extracted.read()
    stem = name or path.name.removesuffix(".tar.gz").removesuffix(".tgz")
    return _from_files(stem, files, f"dir:{path}")


def scan_bundle_dir(root: Path) -> dict[str, Path]:
    """Bundles in a directory: each sub-directory and each ``.tar.gz``/``.tgz``, by name."""
    found: dict[str, Path] = {}
    if not root.is_dir():
        return found
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            found[p.name] = p
        elif p.name.endswith((".tar.gz", ".tgz")):
            found[p.name.removesuffix(".tar.gz").removesuffix(".tgz")] = p
    return found


# -- the registry ------------------------------------------------------------

_WRITE = """
local cur = redis.call('HGET', KEYS[1], ARGV[2])
local op = ARGV[1]
if op == 'create' then
  if cur then return 'exists' end
elseif not cur then
  return 'missing'
elseif ARGV[4] ~= '' and cjson.decode(cur)['revision'] ~= ARGV[4] then
  return 'changed'
end
if op == 'delete' then
  redis.call('HDEL', KEYS[1], ARGV[2])
else
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
end
redis.call('INCR', KEYS[2])
return 'ok'
"""


@dataclass
class Active:
    """A bundle this replica serves: its spec and compiled form."""

    spec: BundleSpec
    compiled: CompiledBundle


class BundleRegistry:
    """Bundles in Redis, compiled and served by this replica."""

    def __init__(self, redis: aioredis.Redis, base: str, outbox: Outbox | None = None) -> None:
        self.redis = redis
        self.hash_key = f"{base}:bundles"
        self.version_key = f"{base}:bundles:version"
        # With an outbox, a write that happened commits the audited call's record with it.
        self._outbox = outbox
        self._write: Any = (
            outbox.script(_WRITE, ok="r == 'ok'") if outbox else redis.register_script(_WRITE)
        )
        self.active: dict[str, Active] = {}
        self._version: int | None = None
        self._lock = asyncio.Lock()
        # The last refusal per file bundle, so a broken file is logged once, not every poll.
        self._refused: dict[str, str] = {}
        # path -> owning bundle; Evaluate asks this on every call.
        self._routes: dict[str, Active | None] = {}

    async def _store(self, op: str, spec: BundleSpec, expect: str = "") -> None:
        extra: dict[str, Any] = {}
        if self._outbox is not None and op != "delete" and spec.revision != expect:
            # A new revision answers decisions from now on: BundleActivated,
            # committed with the write (through the outbox).
            activated = policy_events_pb2.BundleActivated(
                bundle=spec.name,
                revision=spec.revision,
                previous_revision=expect,
                module_count=len(spec.modules),
            )
            extra["events"] = [
                make_event(
                    activated,
                    source="//autoecoops/kernel/policy-audit",
                    subject=spec.name,
                    resource=f"policy/bundles/{spec.name}",
                    key=f"policy.bundle.activated:{spec.name}:{spec.revision}:{expect}",
                )
            ]
        got = await self._write(
            keys=[self.hash_key, self.version_key],
            args=[op, spec.name, spec.to_json() if op != "delete" else "", expect],
            **extra,
        )
        status = got.decode() if isinstance(got, bytes) else str(got)
        if status == "exists":
            raise AlreadyExists(
                f"bundle {spec.name!r} already exists",
                resource_type="policy-bundle",
                resource_name=spec.name,
            )
        if status == "missing":
            raise NotFound(
                f"no bundle {spec.name!r}", resource_type="policy-bundle", resource_name=spec.name
            )
        if status == "changed":
            raise FailedPrecondition(
                f"bundle {spec.name!r} changed meanwhile; read it again and retry",
                reason="CONCURRENT_UPDATE",
            )

    async def all(self) -> dict[str, BundleSpec]:
        """Every stored bundle, by name."""
        raw = await self.redis.hgetall(self.hash_key)
        return {
            (k.decode() if isinstance(k, bytes) else k): BundleSpec.from_json(v)
            for k, v in raw.items()
        }

    async def get(self, name: str) -> BundleSpec:
        """One bundle; NotFound if absent."""
        raw = await self.redis.hget(self.hash_key, name)
        if raw is None:
            raise NotFound(f"no bundle {name!r}", resource_type="policy-bundle", resource_name=name)
        return BundleSpec.from_json(raw)

    def _check_roots(self, spec: BundleSpec, others: Iterable[BundleSpec]) -> None:
        for other in others:
            if other.name == spec.name:
                continue
            mine = spec.roots or ("",)
            theirs = other.roots or ("",)
            for a in mine:
                for b in theirs:
                    if overlaps(a, b):
                        raise FailedPrecondition(
                            f"root {a or '(whole data tree)'!r} of bundle {spec.name!r} overlaps "
                            f"root {b or '(whole data tree)'!r} of bundle {other.name!r}",
                            reason="ROOTS_OVERLAP",
                            metadata={"bundle": other.name},
                        )

    async def create(self, spec: BundleSpec) -> BundleSpec:
        """Validate, compile, store and activate a new bundle."""
        validate(spec)
        compiled = compile_spec(spec)
        async with self._lock:
            self._check_roots(spec, (await self.all()).values())
            now = time.time_ns()
            stored = dataclasses.replace(
                spec,
                revision=spec.content_revision(),
                create_time_ns=now,
                update_time_ns=now,
                activate_time_ns=now,
            )
            await self._store("create", stored)
            self.active[stored.name] = Active(stored, compiled)
            self._routes.clear()
        # DEBUG: the audit trail records it; at INFO it came before the service table on a first start.
        log.debug("bundle %s created at %s", stored.name, stored.revision)
        return stored

    async def update(
        self, spec: BundleSpec, paths: Sequence[str], *, managed: bool = False
    ) -> BundleSpec:
        """Change the fields in ``paths`` (all writable ones when empty); compile before storing."""
        unknown = [p for p in paths if p not in WRITABLE]
        if unknown:
            raise InvalidArgument(
                f"update_mask names fields that cannot be updated: {', '.join(unknown)}",
                field_violations=[
                    FieldViolation("update_mask", f"{p!r} is not one of {', '.join(WRITABLE)}")
                    for p in unknown
                ],
            )
        async with self._lock:
            current = await self.get(spec.name)
            if current.source and not managed:
                raise FailedPrecondition(
                    f"bundle {spec.name!r} is loaded from {current.source}; change the files there",
                    reason="BUNDLE_MANAGED_BY_FILES",
                )
            changes = {p: getattr(spec, p) for p in (paths or WRITABLE)}
            if managed:
                changes["source"] = spec.source
            merged = dataclasses.replace(current, **changes)
            validate(merged)
            compiled = compile_spec(merged)
            self._check_roots(merged, (await self.all()).values())
            now = time.time_ns()
            revision = merged.content_revision()
            merged = dataclasses.replace(
                merged,
                revision=revision,
                update_time_ns=now,
                activate_time_ns=now if revision != current.revision else current.activate_time_ns,
            )
            await self._store("update", merged, expect=current.revision)
            self.active[merged.name] = Active(merged, compiled)
            self._routes.clear()
        if merged.revision != current.revision:
            log.info("bundle %s activated at %s", merged.name, merged.revision)
        return merged

    async def delete(self, name: str, *, managed: bool = False) -> None:
        """Remove a bundle; its paths become undefined."""
        async with self._lock:
            current = await self.get(name)
            if current.source and not managed:
                raise FailedPrecondition(
                    f"bundle {name!r} is loaded from {current.source}; remove it there",
                    reason="BUNDLE_MANAGED_BY_FILES",
                )
            await self._store("delete", current)
            self.active.pop(name, None)
            self._routes.clear()

    async def sync(self) -> None:
        """Load what other replicas changed (cheap when the version counter is unchanged)."""
        raw = await self.redis.get(self.version_key)
        version = int(raw or 0)
        if version == self._version:
            return
        stored = await self.all()
        for name in list(self.active):
            if name not in stored:
                del self.active[name]
        for name, spec in stored.items():
            cur = self.active.get(name)
            if cur is not None and cur.spec.revision == spec.revision:
                cur.spec = spec
                continue
            try:
                self.active[name] = Active(spec, compile_spec(spec))
            except InvalidArgument as err:  # stored by an incompatible version
                log.error("bundle %s %s does not compile here: %s", name, spec.revision, err)
        self._version = version
        self._routes.clear()

    async def load_files(self, specs: Mapping[str, BundleSpec], source_prefix: str) -> None:
        """Make the file-managed bundles under ``source_prefix`` match ``specs``.

        A bundle whose files do not compile keeps its previous revision active.
        """
        await self.sync()
        stored = await self.all()
        for name, spec in specs.items():
            cur = stored.get(name)
            try:
                if cur is None:
                    await self.create(spec)
                elif cur.source and not cur.source.startswith(source_prefix):
                    log.error("bundle %s: %s and %s both define it", name, cur.source, spec.source)
                elif not cur.source:
                    log.error(
                        "bundle %s exists (managed by RPC); not replacing it from %s",
                        name,
                        spec.source,
                    )
                elif cur.revision != spec.content_revision() or cur.source != spec.source:
                    await self.update(spec, (), managed=True)
            except (InvalidArgument, FailedPrecondition, AlreadyExists) as err:
                if self._refused.get(name) != err.message:
                    self._refused[name] = err.message
                    log.error("bundle %s from %s not loaded: %s", name, spec.source, err.message)
        for name, cur in stored.items():
            if cur.source.startswith(source_prefix) and name not in specs:
                await self.delete(name, managed=True)
                log.info("bundle %s removed with its files", name)
        self._version = None

    def owner(self, path: str) -> Active | None:
        """The bundle that answers ``path``; InvalidArgument when several would."""
        try:
            return self._routes[path]
        except KeyError:
            pass
        found = []
        for active in self.active.values():
            roots = active.spec.roots or ("",)
            if any(overlaps(path, r) for r in roots):
                found.append(active)
        if len(found) > 1:
            names = ", ".join(sorted(a.spec.name for a in found))
            raise InvalidArgument(
                f"path {path!r} spans bundles {names}; evaluate a path inside one bundle's roots",
                field_violations=[FieldViolation("path", f"spans bundles {names}")],
            )
        route = found[0] if found else None
        if len(self._routes) < 10_000:  # bounded: paths come from callers
            self._routes[path] = route
        return route
