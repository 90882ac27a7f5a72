"""``autoecoops memory ...``: ingest files into a namespace and search it.

    autoecoops memory ingest PATH... --namespace NS [--create] [--batch N] [--meta k=v ...]
    autoecoops memory search QUERY --namespace NS [-k N] [--mode hybrid|dense|lexical]
                             [--filter JSON] [--json]

Both call memory-hub over gRPC (``AUTOECOOPS_MEMORY_HUB_ADDR``). The token is
``--token``, else ``$AUTOECOOPS_TOKEN``, else one minted from the local key
ring in the data directory, as ``autoecoops token`` does (development only:
it is an admin token for the current user).

Ingest sends batches of documents, each committed atomically as it arrives;
the progress bar counts committed documents. Interrupted, it can be run
again: unchanged files are recognised by their hash and skipped.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from autoecoops.kernel.mesh.config import MeshConfig
from autoecoops.kernel.mesh.errors import AutoEcoOpsError, ConfigError, from_rpc_error
from autoecoops.memory.v1 import memory_pb2, memory_pb2_grpc

FORMATS = {
    ".md": memory_pb2.CONTENT_TYPE_MARKDOWN,
    ".markdown": memory_pb2.CONTENT_TYPE_MARKDOWN,
    ".html": memory_pb2.CONTENT_TYPE_HTML,
    ".htm": memory_pb2.CONTENT_TYPE_HTML,
    ".pdf": memory_pb2.CONTENT_TYPE_PDF,
}
MODES = {
    "hybrid": memory_pb2.SEARCH_MODE_HYBRID,
    "dense": memory_pb2.SEARCH_MODE_DENSE,
    "lexical": memory_pb2.SEARCH_MODE_LEXICAL,
}
#: Keep one ingest message well under the default 4 MiB message limit.
MAX_BATCH_BYTES = 2 << 20


def add_commands(sub: Any) -> None:
    """Register ``autoecoops memory ingest`` and ``autoecoops memory search``."""
    memory = sub.add_parser("memory", help="memory-hub: ingest documents, search them")
    verbs = memory.add_subparsers(dest="memory_command", required=True)

    ing = verbs.add_parser(
        "ingest", help="ingest files (text, Markdown, HTML, PDF) into a namespace"
    )
    ing.add_argument("paths", nargs="+", type=Path, help="files or directories (recursed)")
    ing.add_argument("-n", "--namespace", required=True)
    ing.add_argument("--create", action="store_true", help="create the namespace if it is missing")
    ing.add_argument("--batch", type=int, default=32, help="documents per batch (default 32)")
    ing.add_argument(
        "--meta",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="metadata for every document (repeatable; VALUE is JSON if it parses)",
    )
    ing.add_argument("--token", help="bearer token (default: $AUTOECOOPS_TOKEN or a local one)")
    ing.set_defaults(func=_ingest)

    se = verbs.add_parser("search", help="search a namespace")
    se.add_argument("query")
    se.add_argument("-n", "--namespace", required=True)
    se.add_argument("-k", type=int, default=5, help="results (default 5)")
    se.add_argument("--mode", choices=sorted(MODES), default="hybrid")
    se.add_argument("--filter", help='a Filter as JSON, e.g. {"field":{"key":"env","eq":"prod"}}')
    se.add_argument("--json", action="store_true", help="print the response as JSON")
    se.add_argument("--token", help="bearer token (default: $AUTOECOOPS_TOKEN or a local one)")
    se.set_defaults(func=_search)


def local_token(config: MeshConfig) -> str:
    """An admin token for the current user from the local key ring (development)."""
    from autoecoops.kernel.auth.tokens import mint_local_token

    return mint_local_token(config, getpass.getuser(), roles=["admin"]).token


def _metadata(args: argparse.Namespace, config: MeshConfig) -> list[tuple[str, str]]:
    token = args.token or os.environ.get("AUTOECOOPS_TOKEN", "") or local_token(config)
    return [("authorization", f"Bearer {token}")]


def _stub(config: MeshConfig) -> memory_pb2_grpc.MemoryServiceStub:
    channel = grpc.insecure_channel(
        config.addr("memory-hub"),
        options=[("grpc.max_send_message_length", config.max_message_bytes)],
    )
    return memory_pb2_grpc.MemoryServiceStub(channel)


def _fail(err: AutoEcoOpsError) -> int:
    print(f"autoecoops memory: {err.code.name}: {err.message}", file=sys.stderr)
    for v in err.field_violations:
        print(f"  {v.field}: {v.description}", file=sys.stderr)
    return 1


def files(paths: Sequence[Path]) -> Iterator[tuple[str, Path]]:
    """(document id, file) for every file under ``paths``, in a stable order.
    The id is the path relative to the directory given, or the file name."""
    for root in paths:
        if root.is_dir():
            for f in sorted(p for p in root.rglob("*") if p.is_file()):
                yield f.relative_to(root).as_posix(), f
        elif root.is_file():
            yield root.name, root
        else:
            raise ConfigError(f"{root}: no such file or directory")


def _value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _batches(
    found: Sequence[tuple[str, Path]], size: int, meta: dict[str, Any]
) -> Iterator[list[memory_pb2.Document]]:
    batch: list[memory_pb2.Document] = []
    weight = 0
    for doc_id, path in found:
        data = path.read_bytes()
        doc = memory_pb2.Document(
            id=doc_id,
            content=data,
            content_type=FORMATS.get(path.suffix.lower(), memory_pb2.CONTENT_TYPE_TEXT),
            source_uri=path.resolve().as_uri(),
        )
        doc.metadata.update(meta)
        if batch and (len(batch) >= size or weight + len(data) > MAX_BATCH_BYTES):
            yield batch
            batch, weight = [], 0
        batch.append(doc)
        weight += len(data)
    if batch:
        yield batch


def _ingest(args: argparse.Namespace, config: MeshConfig) -> int:
    from tqdm import tqdm  # type: ignore[import-untyped]

    meta = {}
    for item in args.meta:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--meta {item!r}: expected KEY=VALUE")
        meta[key] = _value(raw)
    found = list(files(args.paths))
    stub, md = _stub(config), _metadata(args, config)
    try:
        if args.create:
            try:
                stub.CreateNamespace(
                    memory_pb2.CreateNamespaceRequest(
                        namespace=memory_pb2.Namespace(name=args.namespace)
                    ),
                    metadata=md,
                )
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.ALREADY_EXISTS:  # type: ignore[attr-defined]
                    raise
        done = skipped = chunks = 0
        with tqdm(total=len(found), unit="doc", desc=f"ingest {args.namespace}") as bar:
            for batch in _batches(found, max(args.batch, 1), meta):
                reply = stub.IngestDocuments(
                    memory_pb2.IngestDocumentsRequest(namespace=args.namespace, documents=batch),
                    metadata=md,
                )
                for r in reply.results:
                    done += 1
                    skipped += r.skipped_unchanged
                    chunks += r.chunk_count
                bar.update(len(batch))
    except grpc.RpcError as err:
        return _fail(from_rpc_error(err))
    print(f"{done} documents ({skipped} unchanged), {chunks} chunks in {args.namespace}")
    return 0


def _search(args: argparse.Namespace, config: MeshConfig) -> int:
    request = memory_pb2.SearchRequest(
        namespace=args.namespace, query=args.query, k=args.k, mode=MODES[args.mode]
    )
    if args.filter:
        try:
            json_format.Parse(args.filter, request.filter)
        except json_format.ParseError as err:
            raise ConfigError(f"--filter: {err}") from None
    try:
        reply = _stub(config).Search(request, metadata=_metadata(args, config))
    except grpc.RpcError as err:
        return _fail(from_rpc_error(err))
    if args.json:
        print(json_format.MessageToJson(reply, preserving_proto_field_name=True))
        return 0
    for i, r in enumerate(reply.results, 1):
        c = r.chunk
        title = f" {c.title}" if c.title else ""
        print(
            f"{i:>2}. {r.score:.3f}  {c.document_id}#{c.ordinal} [{c.start_offset}:{c.end_offset}]{title}"
        )
        snippet = " ".join(c.text.split())
        print(f"    {snippet[:200]}{'...' if len(snippet) > 200 else ''}")
    if not reply.results:
        print("no results")
    return 0
