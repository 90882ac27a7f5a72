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
        return sdk_stub("--check")
    with tempfile.TemporaryDirectory(dir=ROOT / ".build") as tmp:
        fresh = Path(tmp) / "gen"
        generate_all(fresh)
        if GEN.exists():
            shutil.rmtree(GEN)
        os.replace(fresh, GEN)
    print(f"regenerated {GEN.relative_to(ROOT)}/ from {len(proto_files())} proto files")
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
