"""Regenerate everything under gen/ from proto/.

    python scripts/gen.py           # rewrite gen/
    python scripts/gen.py --check   # fail if gen/ is stale (CI)

googleapis protos (google/api, google/rpc) are taken from the installed
googleapis-common-protos package and linked into .build/googleapis, where
buf.yaml also finds them; nothing of theirs is copied into the tree.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
GEN = ROOT / "gen"
GOOGLEAPIS = ROOT / ".build" / "googleapis"
#: The TypeScript SDK's generated messages and service descriptors (protobuf-es).
TS_SDK = ROOT / "sdk" / "typescript"
TS_GEN = TS_SDK / "src" / "gen"
BUF = ROOT / ".build" / "tools" / "node_modules" / ".bin" / "buf"
# The googleapis files our protos import, directly or transitively.
GOOGLEAPIS_FILES = [
    "google/api/annotations.proto",
    "google/api/http.proto",
    "google/api/field_behavior.proto",
    "google/api/launch_stage.proto",
    "google/api/client.proto",
    "google/api/resource.proto",
    "google/rpc/status.proto",
    "google/rpc/error_details.proto",
    "google/rpc/code.proto",
]


def link_googleapis() -> Path:
    """Link the googleapis protos from site-packages into .build/googleapis."""
    import google.api.annotations_pb2 as anchor

    site = Path(anchor.__file__).resolve().parent.parent.parent
    for rel in GOOGLEAPIS_FILES:
        src, dst = site / rel, GOOGLEAPIS / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.exists():
            if dst.resolve() == src.resolve():
                continue
            dst.unlink()
        dst.symlink_to(src)
    return GOOGLEAPIS


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTO)) for p in PROTO.rglob("*.proto"))


def generate_python(out: Path) -> None:
    import grpc_tools

    wkt = Path(grpc_tools.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO}",
        f"-I{GOOGLEAPIS}",
        f"-I{wkt}",
        # mypy-protobuf's plugins type both the messages and the gRPC stubs.
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *proto_files(),
    ]
    # The mypy plugins chatter on stderr; keep it for when protoc fails.
    done = subprocess.run(cmd, cwd=PROTO, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"protoc failed ({done.returncode})")
    # protoc writes modules but no packages; the import namespace needs them.
    root = out / "autoecoops"
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        (d / "__init__.py").touch()
    (root / "py.typed").touch()


def descriptor_set(path: Path) -> None:
    """All protos with their imports and comments, for the document generators."""
    import grpc_tools

    wkt = Path(grpc_tools.__file__).parent / "_proto"
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO}",
        f"-I{GOOGLEAPIS}",
        f"-I{wkt}",
        "--include_imports",
        "--include_source_info",
        f"--descriptor_set_out={path}",
        *proto_files(),
    ]
    subprocess.run(cmd, check=True, cwd=PROTO)


#: Document generators: modules under scripts/ with generate(fds_path, out_dir).
GENERATORS = {"openapi": "gen_openapi", "asyncapi": "gen_asyncapi"}


def generate_all(out: Path) -> None:
    link_googleapis()
    generate_python(out / "python")
    import importlib

    sys.path.insert(0, str(ROOT / "scripts"))
    with tempfile.TemporaryDirectory() as tmp:
        fds = Path(tmp) / "descriptors.binpb"
        descriptor_set(fds)
        for folder, module in GENERATORS.items():
            if (ROOT / "scripts" / f"{module}.py").exists():
                importlib.import_module(module).generate(fds, out / folder)


def generate_typescript(out: Path) -> None:
    """protobuf-es (protoc-gen-es, pinned in sdk/typescript/package-lock.json)
    through buf: every proto of the workspace, googleapis included, so the SDK
    decodes google.rpc details from generated code too. Then the index of
    services the SDK's client is built from."""
    link_googleapis()
    plugin = TS_SDK / "node_modules" / ".bin" / "protoc-gen-es"
    if not plugin.exists():
        subprocess.run(["npm", "ci", "--silent", "--no-audit", "--no-fund"], cwd=TS_SDK, check=True)
    if not BUF.exists():
        raise SystemExit(f"buf is missing at {BUF}: run ./dev gen (it installs buf)")
    template = {
        "version": "v2",
        "plugins": [
            {
                "local": str(plugin),
                "out": str(out),
                "opt": ["target=ts", "import_extension=js"],
            }
        ],
    }
    import json

    subprocess.run([str(BUF), "generate", "--template", json.dumps(template)], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        fds = Path(tmp) / "descriptors.binpb"
        descriptor_set(fds)
        (out / "services.ts").write_text(typescript_services(fds))


def typescript_services(fds_path: Path) -> str:
    """src/gen/services.ts: every service, under the name the client gives it.

    A package ``autoecoops.<domain>.v1`` with one service is ``client.<domain>``;
    with several, ``client.<domain><Service without "Service">``.
    """
    import re

    from google.protobuf import descriptor_pb2

    fds = descriptor_pb2.FileDescriptorSet.FromString(fds_path.read_bytes())
    found: dict[str, list[tuple[str, str]]] = {}
    files: list[tuple[str, str]] = []
    for file in fds.file:
        if file.name.startswith("google/protobuf/"):
            continue  # the well-known types ship with @bufbuild/protobuf
        module = "./" + file.name.removesuffix(".proto") + "_pb.js"
        files.append(
            ("file_" + re.sub(r"[^A-Za-z0-9]", "_", file.name.removesuffix(".proto")), module)
        )
        if not file.package.startswith("autoecoops."):
            continue
        for svc in file.service:
            found.setdefault(file.package, []).append((svc.name, module))
    imports, entries = [], []
    for package in sorted(found):
        services = found[package]
        domain = package.split(".")[1]
        for name, module in sorted(services):
            alias = f"{package.replace('.', '_')}_{name}"
            attr = domain if len(services) == 1 else domain + name.removesuffix("Service")
            imports.append(f'import {{ {name} as {alias} }} from "{module}";')
            entries.append(f"  {attr}: {alias},")
    for name, module in sorted(files):
        imports.append(f'import {{ {name} }} from "{module}";')
    return "\n".join(
        [
            "// @generated by scripts/gen.py from proto/; do not edit.",
            "// Every service of the mesh under the name the AutoEcoOps client gives it.",
            "",
            *imports,
            "",
            "export const services = {",
            *entries,
            "} as const;",
            "",
            "export type Services = typeof services;",
            "",
            "/** Every generated file (messages, events, google.rpc details), for registries. */",
            "export const files = [",
            *(f"  {name}," for name, _ in sorted(files)),
            "] as const;",
            "",
        ]
    )


def diff_trees(a: Path, b: Path) -> list[str]:
    """Paths that differ between two trees (missing on either side or changed)."""
    changed: list[str] = []
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    stack = [(cmp, Path())]
    while stack:
        c, rel = stack.pop()
        changed += [str(rel / n) for n in c.left_only + c.right_only]
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        changed += [str(rel / n) for n in mismatch + errors]
        stack += [(sub, rel / name) for name, sub in c.subdirs.items()]
    return sorted(changed)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="fail if gen/ differs from a fresh generation"
    )
    args = parser.parse_args()
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = Path(tmp) / "gen"
            generate_all(fresh)
            stale = diff_trees(GEN, fresh) if GEN.exists() else ["gen/"]
        if stale:
            print(
                "gen/ is stale; run `python scripts/gen.py` and commit gen/. Differs:",
                file=sys.stderr,
            )
            for path in stale[:30]:
                print(f"  gen/{path}", file=sys.stderr)
            return 1
        print("gen/ is up to date")
        with tempfile.TemporaryDirectory() as tmp:
            fresh = Path(tmp) / "gen"
            generate_typescript(fresh)
            stale = diff_trees(TS_GEN, fresh) if TS_GEN.exists() else [""]
        if stale:
            print(
                "sdk/typescript/src/gen/ is stale; run `./dev gen` and commit it. Differs:",
                file=sys.stderr,
            )
            for path in stale[:30]:
                print(f"  sdk/typescript/src/gen/{path}", file=sys.stderr)
            return 1
        print("sdk/typescript/src/gen/ is up to date")
        return sdk_stub("--check")
    with tempfile.TemporaryDirectory(dir=ROOT / ".build") as tmp:
        fresh = Path(tmp) / "gen"
        generate_all(fresh)
        if GEN.exists():
            shutil.rmtree(GEN)
        os.replace(fresh, GEN)
    print(f"regenerated {GEN.relative_to(ROOT)}/ from {len(proto_files())} proto files")
    with tempfile.TemporaryDirectory(dir=ROOT / ".build") as tmp:
        fresh = Path(tmp) / "gen"
        generate_typescript(fresh)
        if TS_GEN.exists():
            shutil.rmtree(TS_GEN)
        TS_GEN.parent.mkdir(parents=True, exist_ok=True)
        os.replace(fresh, TS_GEN)
    print(f"regenerated {TS_GEN.relative_to(ROOT)}/")
    return sdk_stub()


def sdk_stub(*args: str) -> int:
    """The SDK's typed sub-client stub (sdk/services.pyi), derived from the new gen/.

    A fresh interpreter, so it imports the modules just written.
    """
    done = subprocess.run([sys.executable, "-m", "autoecoops.sdk._stubgen", *args], cwd=ROOT)
    if done.returncode == 0 and not args:
        print("regenerated sdk/services.pyi")
    return done.returncode


if __name__ == "__main__":
    raise SystemExit(main())
