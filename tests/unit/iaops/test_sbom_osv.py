"""SBOMs in (CycloneDX from cyclonedx-py and cyclonedx-python-lib, SPDX 2.3 via spdx-tools)
and OSV matching with each ecosystem's version semantics; the OSV records written here are
validated against the OSV schema first."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from autoecoops.common.v1.types_pb2 import Severity
from autoecoops.iaops.v1 import iaops_pb2 as pb
from autoecoops.kernel.mesh.errors import InvalidArgument
from autoecoops.platforms.iaops import osv, sbom

DATA = Path(__file__).resolve().parents[2] / "data" / "iaops"
OSV_SCHEMA = jsonschema.Draft202012Validator(json.loads((DATA / "osv-schema.json").read_text()))
BIN = Path(sys.executable).parent


def record(
    id_: str, ecosystem: str, name: str, *ranges: list[dict[str, str]], **extra: Any
) -> dict[str, Any]:
    """An OSV record, validated against the OSV schema."""
    rec: dict[str, Any] = {
        "schema_version": "1.6.0",
        "id": id_,
        "modified": "2024-05-01T00:00:00Z",
        "summary": f"{name} is vulnerable",
        "affected": [
            {
                "package": {"ecosystem": ecosystem, "name": name},
                **(
                    {
                        "ranges": [
                            {"type": extra.pop("range_type", "ECOSYSTEM"), "events": r}
                            for r in ranges
                        ]
                    }
                    if ranges
                    else {}
                ),
                **({"versions": extra.pop("versions")} if "versions" in extra else {}),
            }
        ],
        **extra,
    }
    OSV_SCHEMA.validate(rec)
    return rec


def components(*purls: str) -> list[sbom.Component]:
    from packageurl import PackageURL

    return [sbom.Component(p, "", p, PackageURL.from_string(p)) for p in purls]


def db_of(*records: dict[str, Any]) -> osv.OsvDatabase:
    db = osv.OsvDatabase()
    for r in records:
        db.add(r)
    return db


def hits(db: osv.OsvDatabase, *purls: str) -> set[tuple[str, str]]:
    return {(m.component.purl, m.record.id) for m in db.match(components(*purls))}


def test_pep440_semantics_for_pypi() -> None:
    db = db_of(record("PYSEC-1", "PyPI", "Django", [{"introduced": "4.0"}, {"fixed": "4.2.11"}]))
    found = hits(
        db,
        "pkg:pypi/django@4.2.11rc1",  # a pre-release of the fix is still affected
        "pkg:pypi/django@4.2.11",
        "pkg:pypi/django@4.0",
        "pkg:pypi/django@3.2.25",
        "pkg:pypi/django@4.2.10.post1",
    )
    assert found == {
        ("pkg:pypi/django@4.2.11rc1", "PYSEC-1"),
        ("pkg:pypi/django@4.0", "PYSEC-1"),
        ("pkg:pypi/django@4.2.10.post1", "PYSEC-1"),
    }
    # PEP 503 names: Zope.Interface matches zope-interface.
    db = db_of(record("PYSEC-2", "PyPI", "zope.interface", [{"introduced": "0"}, {"fixed": "5.0"}]))
    assert hits(db, "pkg:pypi/zope-interface@4.7") == {("pkg:pypi/zope-interface@4.7", "PYSEC-2")}


def test_semver_for_npm_with_prereleases_and_scopes() -> None:
    db = db_of(
        record(
            "GHSA-npm1-aaaa-bbbb",
            "npm",
            "@scope/lib",
            [{"introduced": "1.0.0"}, {"fixed": "1.4.0"}],
        ),
    )
    found = hits(
        db,
        "pkg:npm/%40scope/lib@1.4.0-beta.1",  # semver: a pre-release sorts before the release
        "pkg:npm/%40scope/lib@1.4.0",
        "pkg:npm/%40scope/lib@1.10.0",  # 1.10 > 1.4 numerically, not lexically
        "pkg:npm/lib@1.2.0",  # another package
    )
    assert found == {("pkg:npm/%40scope/lib@1.4.0-beta.1", "GHSA-npm1-aaaa-bbbb")}


def test_dpkg_order_for_debian_with_epochs_tildes_and_releases() -> None:
    db = db_of(
        record(
            "DSA-1", "Debian:12", "openssl", [{"introduced": "0"}, {"fixed": "3.0.11-1~deb12u2"}]
        )
    )
    found = hits(
        db,
        "pkg:deb/debian/openssl@3.0.11-1~deb12u1?distro=debian-12",
        "pkg:deb/debian/openssl@3.0.11-1?distro=debian-12",  # ~ sorts before: 3.0.11-1 is newer
        "pkg:deb/debian/openssl@3.0.11-1~deb12u1?distro=debian-11",  # another release
        "pkg:deb/debian/openssl@1:1.0-1?distro=debian-12",  # epoch 1 beats any epoch-0 fix
    )
    assert found == {("pkg:deb/debian/openssl@3.0.11-1~deb12u1?distro=debian-12", "DSA-1")}


def test_last_affected_limit_versions_and_withdrawn() -> None:
    db = db_of(
        record(
            "GHSA-last-aaaa-bbbb", "PyPI", "a", [{"introduced": "1.0"}, {"last_affected": "1.5"}]
        ),
        record("GHSA-limt-aaaa-bbbb", "PyPI", "b", [{"introduced": "0"}, {"limit": "2.0"}]),
        record("GHSA-vers-aaaa-bbbb", "PyPI", "c", versions=["0.9.1"]),
        record(
            "GHSA-wdrn-aaaa-bbbb",
            "PyPI",
            "d",
            [{"introduced": "0"}],
            withdrawn="2024-06-01T00:00:00Z",
        ),
        record(
            "GHSA-semv-aaaa-bbbb",
            "PyPI",
            "e",
            [{"introduced": "1.0.0"}, {"fixed": "1.2.0"}],
            range_type="SEMVER",
        ),
    )
    found = hits(
        db,
        "pkg:pypi/a@1.5",
        "pkg:pypi/a@1.5.1",
        "pkg:pypi/a@0.9",
        "pkg:pypi/b@1.9",
        "pkg:pypi/b@2.0",
        "pkg:pypi/c@0.9.1",
        "pkg:pypi/c@0.9.2",
        "pkg:pypi/d@1.0",
        "pkg:pypi/e@1.1.5",
        "pkg:pypi/e@1.2.0",
    )
    assert found == {
        ("pkg:pypi/a@1.5", "GHSA-last-aaaa-bbbb"),
        ("pkg:pypi/b@1.9", "GHSA-limt-aaaa-bbbb"),
        ("pkg:pypi/c@0.9.1", "GHSA-vers-aaaa-bbbb"),
        ("pkg:pypi/e@1.1.5", "GHSA-semv-aaaa-bbbb"),
    }
    assert len(db) == 4  # the withdrawn record is not loaded


def test_severity_from_cvss_or_database_specific_and_fixed_versions() -> None:
    db = db_of(
        record(
            "GHSA-crit-aaaa-bbbb",
            "PyPI",
            "x",
            [{"introduced": "0"}, {"fixed": "2.0"}],
            severity=[{"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"}],
        ),
        record(
            "GHSA-modr-aaaa-bbbb",
            "PyPI",
            "x",
            [{"introduced": "0"}],
            database_specific={"severity": "MODERATE"},
        ),
    )
    matches = db.match(components("pkg:pypi/x@1.0"))
    assert [(m.record.id, m.severity, m.fixed) for m in matches] == [
        ("GHSA-crit-aaaa-bbbb", Severity.SEVERITY_CRITICAL, ("2.0",)),
        ("GHSA-modr-aaaa-bbbb", Severity.SEVERITY_MEDIUM, ()),
    ]


def test_loads_a_directory_and_a_zip(tmp_path: Path) -> None:
    recs = [
        record(f"PYSEC-{i}", "PyPI", f"p{i}", [{"introduced": "0"}, {"fixed": "1.0"}])
        for i in range(3)
    ]
    (tmp_path / "dir" / "PyPI").mkdir(parents=True)
    for r in recs:
        (tmp_path / "dir" / "PyPI" / f"{r['id']}.json").write_text(json.dumps(r))
    (tmp_path / "dir" / "PyPI" / "broken.json").write_text("{not json")
    with zipfile.ZipFile(tmp_path / "all.zip", "w") as z:
        for r in recs:
            z.writestr(f"{r['id']}.json", json.dumps(r))
    for path in (tmp_path / "dir", tmp_path / "all.zip"):
        db = osv.load(path)
        assert len(db) == 3
        assert hits(db, "pkg:pypi/p1@0.5") == {("pkg:pypi/p1@0.5", "PYSEC-1")}
    assert osv.load(tmp_path / "dir").skipped == 1
    assert len(osv.load(tmp_path / "missing")) == 0


@pytest.fixture(scope="module")
def environment_sbom(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A CycloneDX SBOM of this project's own environment, made by cyclonedx-py."""
    out = tmp_path_factory.mktemp("sbom") / "env.cdx.json"
    subprocess.run(
        [str(BIN / "cyclonedx-py"), "environment", "--of", "JSON", "-o", str(out), sys.executable],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out.read_bytes()


def test_a_real_cyclonedx_sbom_of_this_environment(environment_sbom: bytes) -> None:
    import grpc  # installed here, so it is in the SBOM
    import yaml

    fmt, comps = sbom.read(environment_sbom)
    assert fmt == pb.SBOM_FORMAT_CYCLONEDX_JSON and len(comps) > 50
    by_name = {c.parsed.name: c for c in comps if c.parsed is not None and c.parsed.type == "pypi"}
    installed = {"grpcio": grpc.__version__, "pyyaml": yaml.__version__}
    db = db_of(
        record("GHSA-grpc-aaaa-bbbb", "PyPI", "grpcio", [{"introduced": "0"}, {"fixed": "999.0"}]),
        record(
            "GHSA-yaml-aaaa-bbbb",
            "PyPI",
            "PyYAML",
            [{"introduced": "0"}, {"fixed": installed["pyyaml"]}],
        ),
    )
    found = {(m.package, m.record.id) for m in db.match(comps)}
    assert ("grpcio", "GHSA-grpc-aaaa-bbbb") in found
    assert ("pyyaml", "GHSA-yaml-aaaa-bbbb") not in found  # the installed version is the fix
    assert by_name["grpcio"].version == installed["grpcio"]


def test_cyclonedx_written_by_cyclonedx_python_lib() -> None:
    from cyclonedx.model.bom import Bom
    from cyclonedx.model.component import Component
    from cyclonedx.output.json import JsonV1Dot6
    from packageurl import PackageURL

    bom = Bom()
    parent = Component(name="app", version="1.0", purl=PackageURL("npm", None, "app", "1.0"))
    parent.components.add(
        Component(
            name="lodash", version="4.17.20", purl=PackageURL("npm", None, "lodash", "4.17.20")
        )
    )
    bom.components.add(parent)
    text = JsonV1Dot6(bom).output_as_string()
    _, comps = sbom.read(text.encode(), pb.SBOM_FORMAT_CYCLONEDX_JSON)
    assert {c.purl for c in comps} == {"pkg:npm/app@1.0", "pkg:npm/lodash@4.17.20"}  # nested too
    db = db_of(
        record("GHSA-lodash-aaaa", "npm", "lodash", [{"introduced": "0"}, {"fixed": "4.17.21"}])
    )
    assert [m.record.id for m in db.match(comps)] == ["GHSA-lodash-aaaa"]


SPDX = {
    "spdxVersion": "SPDX-2.3",
    "dataLicense": "CC0-1.0",
    "SPDXID": "SPDXRef-DOCUMENT",
    "name": "image",
    "documentNamespace": "https://autoecoops.example/spdx/image-1",
    "creationInfo": {"created": "2024-05-01T00:00:00Z", "creators": ["Tool: test"]},
    "packages": [
        {
            "SPDXID": "SPDXRef-Package-requests",
            "name": "requests",
            "versionInfo": "2.31.0",
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": False,
            "externalRefs": [
                {
                    "referenceCategory": "PACKAGE-MANAGER",
                    "referenceType": "purl",
                    "referenceLocator": "pkg:pypi/requests@2.31.0",
                }
            ],
        }
    ],
}


def test_spdx_23_through_spdx_tools() -> None:
    fmt, comps = sbom.read(json.dumps(SPDX).encode())
    assert fmt == pb.SBOM_FORMAT_SPDX_JSON and [c.purl for c in comps] == [
        "pkg:pypi/requests@2.31.0"
    ]
    db = db_of(
        record(
            "GHSA-9wx4-h78v-vm56", "PyPI", "requests", [{"introduced": "0"}, {"fixed": "2.32.0"}]
        )
    )
    assert [m.record.id for m in db.match(comps)] == ["GHSA-9wx4-h78v-vm56"]


@pytest.mark.parametrize(
    ("document", "fmt", "reason"),
    [
        (b"not json", 0, "INVALID_SBOM"),
        (b"[]", 0, "INVALID_SBOM"),
        (b'{"hello": 1}', 0, "UNKNOWN_SBOM_FORMAT"),
        (json.dumps(SPDX).encode(), pb.SBOM_FORMAT_CYCLONEDX_JSON, "SBOM_FORMAT_MISMATCH"),
        (json.dumps({**SPDX, "SPDXID": "wrong"}).encode(), 0, "INVALID_SBOM"),
        (
            b'{"bomFormat": "CycloneDX", "specVersion": "1.6", "components": [{"version": "1"}]}',
            0,
            "INVALID_SBOM",
        ),
    ],
)
def test_bad_sboms_are_invalid_argument(document: bytes, fmt: int, reason: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        sbom.read(document, fmt)
    assert err.value.reason == reason
