"""SBOM documents in: CycloneDX JSON and SPDX 2.3 JSON, out: components with package URLs.

SPDX is parsed and validated with spdx-tools (the SPDX project's own
library): a document it finds invalid is INVALID_ARGUMENT with its messages.

CycloneDX is read from its JSON fields (``components``, nested
``components``, ``metadata.component``; ``name``, ``version``, ``purl``)
and package URLs are parsed with packageurl-python. cyclonedx-python-lib's
deserializer is not on this path: it takes ~1.7 ms per component (8.7 s
for 5,000) and its schema validator over 30 s, so the tests use it (and
``cyclonedx-py``) to produce real CycloneDX input instead; see docs/iaops.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from packageurl import PackageURL

from autoecoops.iaops.v1 import iaops_pb2 as pb
from autoecoops.kernel.mesh.errors import FieldViolation, InvalidArgument


@dataclass(frozen=True, slots=True)
class Component:
    """One component of an SBOM."""

    name: str
    version: str
    purl: str
    #: The parsed package URL; None when the component has none (it cannot be matched).
    parsed: PackageURL | None


def _bad(message: str, reason: str = "INVALID_SBOM") -> InvalidArgument:
    return InvalidArgument(
        message, reason=reason, field_violations=[FieldViolation("document", message)]
    )


def detect(doc: Mapping[str, Any]) -> int:
    """The SbomFormat of a parsed JSON document."""
    if doc.get("bomFormat") == "CycloneDX":
        return pb.SBOM_FORMAT_CYCLONEDX_JSON
    if str(doc.get("spdxVersion", "")).startswith("SPDX-"):
        return pb.SBOM_FORMAT_SPDX_JSON
    raise _bad("neither CycloneDX (bomFormat) nor SPDX (spdxVersion) JSON", "UNKNOWN_SBOM_FORMAT")


def _purl(raw: Any) -> PackageURL | None:
    if not isinstance(raw, str) or not raw:
        return None
    try:
        return PackageURL.from_string(raw)
    except ValueError:
        return None


def _cyclonedx(doc: Mapping[str, Any]) -> Iterator[Component]:
    if not str(doc.get("specVersion", "")).startswith("1."):
        raise _bad("CycloneDX specVersion must be 1.x")

    def walk(items: Any, where: str) -> Iterator[Component]:
        if items is None:
            return
        if not isinstance(items, list):
            raise _bad(f"{where} must be an array")
        for i, c in enumerate(items):
            if not isinstance(c, Mapping) or not isinstance(c.get("name"), str):
                raise _bad(f"{where}[{i}] must be an object with a name")
            purl = c.get("purl") or ""
            yield Component(c["name"], str(c.get("version", "")), str(purl), _purl(purl))
            yield from walk(c.get("components"), f"{where}[{i}].components")

    yield from walk(doc.get("components"), "components")


def _spdx(doc: Mapping[str, Any]) -> Iterator[Component]:
    from spdx_tools.spdx.model.package import ExternalPackageRefCategory
    from spdx_tools.spdx.parser.error import SPDXParsingError
    from spdx_tools.spdx.parser.jsonlikedict.json_like_dict_parser import JsonLikeDictParser
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

    if doc.get("spdxVersion") not in ("SPDX-2.2", "SPDX-2.3"):
        raise _bad(f"SPDX version {doc.get('spdxVersion')!r} is not supported (2.2 or 2.3)")
    try:
        parsed = JsonLikeDictParser().parse(dict(doc))  # type: ignore[no-untyped-call]
    except SPDXParsingError as err:
        messages = err.get_messages()  # type: ignore[no-untyped-call]
        raise _bad("invalid SPDX: " + "; ".join(messages)[:2000]) from None
    problems = validate_full_spdx_document(parsed, doc["spdxVersion"])
    if problems:
        raise _bad("invalid SPDX: " + "; ".join(p.validation_message for p in problems[:20]))
    for package in parsed.packages:
        purl = ""
        for ref in package.external_references:
            if (
                ref.category == ExternalPackageRefCategory.PACKAGE_MANAGER
                and ref.reference_type == "purl"
            ):
                purl = ref.locator
                break
        version = package.version if isinstance(package.version, str) else ""
        yield Component(package.name, version, purl, _purl(purl))


def read(document: bytes, fmt: int = pb.SBOM_FORMAT_UNSPECIFIED) -> tuple[int, list[Component]]:
    """(format, components) of an SBOM; INVALID_ARGUMENT when it is not one."""
    try:
        doc = json.loads(document)
    except (ValueError, UnicodeDecodeError) as err:
        raise _bad(f"not JSON: {err}") from None
    if not isinstance(doc, Mapping):
        raise _bad("an SBOM is a JSON object")
    found = detect(doc)
    if fmt and fmt != found:
        raise InvalidArgument(
            f"format says {pb.SbomFormat.Name(fmt)} but the document is {pb.SbomFormat.Name(found)}",  # type: ignore[arg-type]
            reason="SBOM_FORMAT_MISMATCH",
            field_violations=[FieldViolation("format", "does not match the document")],
        )
    reader = _cyclonedx if found == pb.SBOM_FORMAT_CYCLONEDX_JSON else _spdx
    return found, list(reader(doc))
