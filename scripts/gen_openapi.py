"""Generate gen/openapi/openapi.json and openapi.yaml from the protos.

Called by scripts/gen.py with a FileDescriptorSet that has imports and source
info. The document is built by the gateway's own builder from the same
bindings the gateway routes by; the proto comments become its descriptions.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from google.protobuf import descriptor_pb2, descriptor_pool

from autoecoops.gateway.openapi import build_document, comments_of
from autoecoops.gateway.rules import mesh_bindings, services_of


def generate(fds_path: Path, out_dir: Path) -> None:
    """Write openapi.json and openapi.yaml for the services in ``fds_path``."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(fds_path.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in fds.file:
        pool.Add(file)
    ours = [f for f in fds.file if f.name.startswith("autoecoops/")]
    services = services_of(pool.FindFileByName(f.name) for f in ours)
    document = build_document(mesh_bindings(services), comments_of(ours))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "openapi.json").write_text(
        json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out_dir / "openapi.yaml").write_text(
        yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100), encoding="utf-8"
    )
