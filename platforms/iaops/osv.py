"""An offline OSV database and the matching of SBOM components against it.

Records come from a directory of OSV JSON files or a zip of them (the shape
of osv.dev's per-ecosystem ``all.zip`` exports). They are indexed by
(ecosystem, package name) with every range event's version parsed once, so
a scan parses each component's version once and compares.

Versions are compared with each ecosystem's own semantics through the
``univers`` library (PEP 440 for PyPI, semver for npm and SEMVER ranges,
dpkg order for Debian, Maven's, RubyGems', NuGet's, Go's, ...), never a
hand-written comparator. Range evaluation follows the OSV schema's
algorithm: events in version order, ``introduced`` opens, ``fixed`` closes
(exclusive), ``last_affected`` closes (inclusive); ``limit`` events bound
the range from above. Explicit ``versions`` lists match too. Withdrawn
records are skipped. GIT ranges need the repository and are not evaluated
(the ``versions`` list of such records still matches).
"""

from __future__ import annotations

import bisect
import json
import logging
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from packageurl import PackageURL
from univers import versions as uv

from autoecoops.common.v1.types_pb2 import Severity
from autoecoops.platforms.iaops.rules import as_map
from autoecoops.platforms.iaops.sbom import Component

log = logging.getLogger("autoecoops.iaops")

#: purl type -> (OSV ecosystem, univers version class).
ECOSYSTEMS: Mapping[str, tuple[str, type[uv.Version]]] = {
    "pypi": ("PyPI", uv.PypiVersion),
    "npm": ("npm", uv.SemverVersion),
    "deb": ("Debian", uv.DebianVersion),
    "maven": ("Maven", uv.MavenVersion),
    "golang": ("Go", uv.GolangVersion),
    "cargo": ("crates.io", uv.SemverVersion),
    "gem": ("RubyGems", uv.RubygemsVersion),
    "nuget": ("NuGet", uv.NugetVersion),
    "composer": ("Packagist", uv.ComposerVersion),
    "apk": ("Alpine", uv.AlpineLinuxVersion),
}
VERSION_CLASS: Mapping[str, type[uv.Version]] = {eco: cls for eco, cls in ECOSYSTEMS.values()}
_PEP503 = re.compile(r"[-_.]+")
SEVERITY_WORDS: Mapping[str, Severity.ValueType] = {
    "CRITICAL": Severity.SEVERITY_CRITICAL,
    "HIGH": Severity.SEVERITY_HIGH,
    "IMPORTANT": Severity.SEVERITY_HIGH,
    "MODERATE": Severity.SEVERITY_MEDIUM,
    "MEDIUM": Severity.SEVERITY_MEDIUM,
    "LOW": Severity.SEVERITY_LOW,
    "NEGLIGIBLE": Severity.SEVERITY_INFO,
}


def normalize(ecosystem: str, name: str) -> str:
    """A package name as the ecosystem compares them (PEP 503 for PyPI)."""
    if ecosystem == "PyPI":
        return _PEP503.sub("-", name).lower()
    return name


def purl_key(purl: PackageURL) -> tuple[str, str, str] | None:
    """(OSV ecosystem, normalized name, release) of a package URL; None if unsupported."""
    known = ECOSYSTEMS.get(purl.type)
    if known is None:
        return None
    eco = known[0]
    if purl.type == "npm" and purl.namespace:
        name = f"{purl.namespace}/{purl.name}"
    elif purl.type == "maven":
        name = f"{purl.namespace}:{purl.name}"
    elif purl.type in ("golang", "composer") and purl.namespace:
        name = f"{purl.namespace}/{purl.name}"
    else:
        name = purl.name
    release = ""
    if purl.type in ("deb", "apk"):
        distro = str((purl.qualifiers or {}).get("distro", ""))
        release = distro.rsplit("-", 1)[-1] if "-" in distro else distro
        if purl.type == "apk" and release and not release.startswith("v"):
            release = "v" + release
    return eco, normalize(eco, name), release


_PARSED: dict[tuple[str, str], uv.Version | None] = {}


def parse_version(cls: type[uv.Version], raw: str) -> uv.Version | None:
    """A version in an ecosystem's semantics; None when it is not one (cached)."""
    key = (cls.__name__, raw)
    try:
        return _PARSED[key]
    except KeyError:
        pass
    try:
        version: uv.Version | None = cls(raw)
    except Exception:  # univers raises InvalidVersion, ValueError or TypeError by class
        version = None
    if len(_PARSED) > 500_000:
        _PARSED.clear()
    _PARSED[key] = version
    return version


@dataclass(frozen=True, slots=True)
class Range:
    """One affected range with its events parsed."""

    cls: type[uv.Version]
    #: (kind, version or None for introduced "0") in version order.
    events: tuple[tuple[str, uv.Version | None], ...]
    limits: tuple[uv.Version | None, ...]
    fixed: tuple[str, ...]

    def affects_ranked(
        self, ranks: tuple[tuple[str, int], ...], limit_ranks: tuple[int, ...], idx: int, eq: bool
    ) -> bool:
        """``affects`` over ranks in the sorted bounds of the package (see ``_Prepared``):
        a bound of rank ``r`` is below the version when ``r < idx``, equal when
        ``eq and r == idx``; -1 is introduced "0" (or limit "*")."""
        affected = False
        for kind, r in ranks:
            if kind == "introduced":
                if r < 0 or r < idx or (eq and r == idx):
                    affected = True
            elif kind == "fixed":
                if r < idx or (eq and r == idx):
                    affected = False
            elif kind == "last_affected" and r < idx:
                affected = False
        if affected and limit_ranks:
            affected = any(r < 0 or r > idx or (r == idx and not eq) for r in limit_ranks)
        return affected

    def affects(self, v: uv.Version) -> bool:
        """The OSV schema's range algorithm."""
        affected = False
        for kind, at in self.events:
            if kind == "introduced":
                if at is None or v >= at:
                    affected = True
            elif kind == "fixed":
                if at is not None and v >= at:
                    affected = False
            elif kind == "last_affected" and at is not None and v > at:
                affected = False
        if affected and self.limits:
            affected = any(lim is None or v < lim for lim in self.limits)
        return affected


@dataclass(frozen=True, slots=True)
class Affected:
    """One ``affected`` entry of a record, ready to match."""

    record: int
    release: str
    versions: frozenset[str]
    ranges: tuple[Range, ...]
    severity: Severity.ValueType


@dataclass(frozen=True, slots=True)
class Record:
    """What a finding reports of an OSV record."""

    id: str
    aliases: tuple[str, ...]
    summary: str
    severity: Severity.ValueType


@dataclass(frozen=True, slots=True)
class Match:
    """A component affected by a record."""

    component: Component
    record: Record
    ecosystem: str
    package: str
    severity: Severity.ValueType
    fixed: tuple[str, ...]


def cvss_severity(vectors: Iterable[Mapping[str, Any]]) -> Severity.ValueType:
    """The highest band of a record's CVSS vectors (CVSS v3 and v4 base scores)."""
    from cvss import CVSS3, CVSS4  # type: ignore[import-untyped]

    best = 0.0
    found = False
    for s in vectors:
        kind, score = s.get("type"), str(s.get("score", ""))
        try:
            if kind == "CVSS_V3":
                value = float(CVSS3(score).base_score)
            elif kind == "CVSS_V4":
                value = float(CVSS4(score).base_score)
            else:
                continue
        except Exception:  # cvss raises its own errors for malformed vectors
            continue
        found = True
        best = max(best, value)
    if not found:
        return Severity.SEVERITY_UNSPECIFIED
    if best >= 9.0:
        return Severity.SEVERITY_CRITICAL
    if best >= 7.0:
        return Severity.SEVERITY_HIGH
    if best >= 4.0:
        return Severity.SEVERITY_MEDIUM
    return Severity.SEVERITY_LOW if best > 0 else Severity.SEVERITY_INFO


def _word(value: Any) -> Severity.ValueType:
    return SEVERITY_WORDS.get(str(value).upper(), Severity.SEVERITY_UNSPECIFIED) if value else 0  # type: ignore[return-value]


def _withdrawn(record: Mapping[str, Any], now: datetime) -> bool:
    raw = record.get("withdrawn")
    if not raw:
        return False
    try:
        when = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    except ValueError:
        return True  # a withdrawn mark we cannot read still withdraws
    return when <= now


def _range(raw: Mapping[str, Any], cls: type[uv.Version]) -> Range | None:
    kind = raw.get("type")
    if kind == "GIT":
        return None
    if kind == "SEMVER":
        cls = uv.SemverVersion
    events: list[tuple[str, uv.Version | None]] = []
    limits: list[uv.Version | None] = []
    fixed: list[str] = []
    for e in raw.get("events") or []:
        if not isinstance(e, Mapping) or len(e) != 1:
            continue
        ((k, value),) = e.items()
        value = str(value)
        if k == "introduced" and value == "0":
            events.append((k, None))
            continue
        if k == "limit" and value == "*":
            limits.append(None)
            continue
        v = parse_version(cls, value)
        if v is None:
            return None  # an unparseable bound: do not guess
        if k == "limit":
            limits.append(v)
        elif k in ("introduced", "fixed", "last_affected"):
            events.append((k, v))
            if k == "fixed":
                fixed.append(value)

    def order(e: tuple[str, uv.Version | None]) -> tuple[int, Any]:
        return (0, 0) if e[1] is None else (1, e[1])

    try:
        events.sort(key=order)
    except TypeError:
        return None
    return Range(cls, tuple(events), tuple(limits), tuple(fixed))


RangeRanks = tuple[tuple[tuple[str, int], ...], tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class _Prepared:
    """One package's range bounds sorted once (by univers), so a scan places a
    component's version among them with a binary search and then compares
    integer ranks: O(log bounds) univers comparisons per component instead of
    one per event."""

    bounds: list[uv.Version]
    #: Per entry, per range: (event ranks, limit ranks), or None for a range of another class.
    ranked: list[list[RangeRanks | None]]

    @classmethod
    def of(cls, entries: Sequence[Affected], version_cls: type[uv.Version]) -> _Prepared:
        """Sort the bounds of ``entries``' ranges of ``version_cls``."""
        found: list[uv.Version] = []
        for entry in entries:
            for r in entry.ranges:
                if r.cls is version_cls:
                    found.extend(at for _, at in r.events if at is not None)
                    found.extend(lim for lim in r.limits if lim is not None)
        bounds: list[uv.Version] = []
        for v in sorted(found):
            if not bounds or bounds[-1] != v:
                bounds.append(v)

        def rank(at: uv.Version | None) -> int:
            return -1 if at is None else bisect.bisect_left(bounds, at)

        ranked: list[list[RangeRanks | None]] = [
            [
                (tuple((k, rank(at)) for k, at in r.events), tuple(rank(lim) for lim in r.limits))
                if r.cls is version_cls
                else None
                for r in entry.ranges
            ]
            for entry in entries
        ]
        return cls(bounds, ranked)

    def position(self, v: uv.Version) -> tuple[int, bool]:
        """(how many bounds are below ``v``, whether ``v`` equals the next one)."""
        idx = bisect.bisect_left(self.bounds, v)
        return idx, idx < len(self.bounds) and self.bounds[idx] == v


@dataclass
class OsvDatabase:
    """OSV records indexed by (ecosystem, package name)."""

    records: list[Record] = field(default_factory=list)
    index: dict[tuple[str, str], list[Affected]] = field(default_factory=dict)
    skipped: int = 0
    _prepared: dict[tuple[str, str], _Prepared] = field(default_factory=dict)

    def add(self, record: Mapping[str, Any], now: datetime | None = None) -> bool:
        """Index one record; False when it is withdrawn or malformed."""
        now = now or datetime.now(UTC)
        if not isinstance(record, Mapping) or not isinstance(record.get("id"), str):
            self.skipped += 1
            return False
        if _withdrawn(record, now):
            return False
        db = as_map(record.get("database_specific"))
        severity = cvss_severity(record.get("severity") or []) or _word(db.get("severity"))
        rec = Record(
            record["id"],
            tuple(str(a) for a in record.get("aliases") or []),
            str(record.get("summary") or record.get("details", "")[:200]),
            severity,
        )
        idx = len(self.records)
        self.records.append(rec)
        for aff in record.get("affected") or []:
            pkg = aff.get("package") if isinstance(aff, Mapping) else None
            if not isinstance(pkg, Mapping):
                continue
            eco_full = str(pkg.get("ecosystem", ""))
            eco, _, release = eco_full.partition(":")
            cls = VERSION_CLASS.get(eco)
            if cls is None:
                continue
            ranges = tuple(r for r in (_range(x, cls) for x in aff.get("ranges") or []) if r)
            es = as_map(aff.get("ecosystem_specific"))
            entry = Affected(
                idx,
                release,
                frozenset(str(v) for v in aff.get("versions") or []),
                ranges,
                _word(es.get("severity")) or severity,
            )
            key = (eco, normalize(eco, str(pkg.get("name", ""))))
            self.index.setdefault(key, []).append(entry)
            self._prepared.pop(key, None)
        return True

    def __len__(self) -> int:
        return len(self.records)

    def _prepare(self, key: tuple[str, str], cls: type[uv.Version]) -> _Prepared:
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = self._prepared[key] = _Prepared.of(self.index[key], cls)
        return prepared

    def prepare(self) -> None:
        """Sort every package's bounds now (load time) rather than on its first scan."""
        for key in self.index:
            cls = VERSION_CLASS.get(key[0])
            if cls is not None:
                self._prepare(key, cls)

    def match(self, components: Sequence[Component]) -> list[Match]:
        """Every (component, record) pair where the component's version is affected."""
        out: list[Match] = []
        for c in components:
            if c.parsed is None:
                continue
            key = purl_key(c.parsed)
            if key is None:
                continue
            eco, name, release = key
            entries = self.index.get((eco, name))
            if not entries:
                continue
            raw = c.parsed.version or c.version
            if not raw:
                continue
            cls = VERSION_CLASS[eco]
            version = parse_version(cls, raw)
            prepared = self._prepare((eco, name), cls)
            idx, eq = prepared.position(version) if version is not None else (0, False)
            seen: set[int] = set()
            for entry, ranked in zip(entries, prepared.ranked, strict=True):
                if entry.record in seen:
                    continue
                if entry.release and release and entry.release != release:
                    continue
                fixed: tuple[str, ...] = ()
                hit = raw in entry.versions
                if version is not None:
                    for r, rank in zip(entry.ranges, ranked, strict=True):
                        if rank is not None:
                            affected = r.affects_ranked(rank[0], rank[1], idx, eq)
                        else:  # a SEMVER range over another ecosystem's versions
                            v = parse_version(r.cls, raw)
                            affected = v is not None and r.affects(v)
                        if affected:
                            hit, fixed = True, fixed + r.fixed
                if hit:
                    seen.add(entry.record)
                    rec = self.records[entry.record]
                    out.append(Match(c, rec, eco, name, entry.severity or rec.severity, fixed))
        out.sort(key=lambda m: (-m.severity, m.record.id, m.component.purl))
        return out


def _records_in(text: str | bytes) -> Iterator[Mapping[str, Any]]:
    doc = json.loads(text)
    if isinstance(doc, list):  # a file may hold an array of records
        yield from doc
    else:
        yield doc


def load(path: Path) -> OsvDatabase:
    """Every record under a directory (``**/*.json``) or in a zip; empty if absent."""
    db = OsvDatabase()
    now = datetime.now(UTC)
    if path.is_dir():
        for file in sorted(path.rglob("*.json")):
            try:
                for rec in _records_in(file.read_bytes()):
                    db.add(rec, now)
            except ValueError:
                log.warning("OSV: %s is not JSON; skipped", file)
                db.skipped += 1
    elif path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            for member in z.namelist():
                if member.endswith(".json"):
                    try:
                        for rec in _records_in(z.read(member)):
                            db.add(rec, now)
                    except ValueError:
                        log.warning("OSV: %s!%s is not JSON; skipped", path, member)
                        db.skipped += 1
    elif path.exists():
        log.warning("OSV: %s is neither a directory nor a zip", path)
    db.prepare()
    return db
