"""``autoecoops slo ...``: SLOs from OpenSLO files, their budgets and Prometheus rules.

    autoecoops slo apply -f FILE [--dry-run]       create or update the SLOs of an OpenSLO file
    autoecoops slo get (NAME... | -f FILE) [-o yaml|json]   SLOs (OpenSLO YAML by default)
    autoecoops slo list [--service S] [--json]     every SLO
    autoecoops slo budget (NAME... | -f FILE) [--json]   error budgets
    autoecoops slo rules [NAME...]                 Prometheus recording and alerting rules

All call autoops over gRPC (``AUTOECOOPS_AUTOOPS_ADDR``) with ``--token``,
``$AUTOECOOPS_TOKEN`` or a token minted from the local key ring, as
``autoecoops memory`` does.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf import json_format

from autoecoops.autoops.v1 import autoops_pb2 as pb
from autoecoops.autoops.v1 import autoops_pb2_grpc
from autoecoops.kernel.mesh.config import MeshConfig
from autoecoops.kernel.mesh.errors import AutoEcoOpsError, ConfigError, from_rpc_error


def add_commands(sub: Any) -> None:
    """Register ``autoecoops slo apply|get|list|budget|rules``."""
    slo = sub.add_parser("slo", help="autoops: SLOs, error budgets, Prometheus rules")
    verbs = slo.add_subparsers(dest="slo_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--token", help="bearer token (default: $AUTOECOOPS_TOKEN or a local one)")

    ap = verbs.add_parser("apply", help="create or update the SLOs of an OpenSLO v1 file")
    ap.add_argument("-f", "--file", required=True, type=Path, help="OpenSLO YAML ('-' for stdin)")
    ap.add_argument("--dry-run", action="store_true", help="validate only")
    common(ap)
    ap.set_defaults(func=_apply)

    get = verbs.add_parser("get", help="show SLOs")
    get.add_argument("names", nargs="*", help="slos/<id> or <id>")
    get.add_argument("-f", "--file", type=Path, help="the SLOs of an OpenSLO file")
    get.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml")
    common(get)
    get.set_defaults(func=_get)

    ls = verbs.add_parser("list", help="list SLOs")
    ls.add_argument("--service", default="")
    ls.add_argument("--json", action="store_true")
    common(ls)
    ls.set_defaults(func=_list)

    bud = verbs.add_parser("budget", help="show error budgets")
    bud.add_argument("names", nargs="*", help="slos/<id> or <id>")
    bud.add_argument("-f", "--file", type=Path, help="the SLOs of an OpenSLO file")
    bud.add_argument("--json", action="store_true")
    common(bud)
    bud.set_defaults(func=_budget)

    rules = verbs.add_parser("rules", help="print Prometheus rules (Sloth-compatible names)")
    rules.add_argument("names", nargs="*")
    common(rules)
    rules.set_defaults(func=_rules)


def _metadata(args: argparse.Namespace, config: MeshConfig) -> list[tuple[str, str]]:
    token = args.token or os.environ.get("AUTOECOOPS_TOKEN", "")
    if not token:
        from autoecoops.kernel.memory_hub.cli import local_token

        token = local_token(config)
    return [("authorization", f"Bearer {token}")]


def _stub(config: MeshConfig) -> autoops_pb2_grpc.AutoOpsServiceStub:
    return autoops_pb2_grpc.AutoOpsServiceStub(grpc.insecure_channel(config.addr("autoops")))


def _fail(err: AutoEcoOpsError) -> int:
    print(f"autoecoops slo: {err.code.name}: {err.message}", file=sys.stderr)
    for v in err.field_violations:
        print(f"  {v.field}: {v.description}", file=sys.stderr)
    return 1


def _read(path: Path) -> str:
    try:
        return sys.stdin.read() if str(path) == "-" else path.read_text()
    except OSError as err:
        raise ConfigError(f"-f {path}: {err.strerror}") from None


def _names_in(text: str) -> list[str]:
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as err:
        raise ConfigError(f"not YAML: {str(err).splitlines()[0]}") from None
    return [
        f"slos/{d['metadata']['name']}"
        for d in docs
        if isinstance(d, dict) and d.get("kind") == "SLO" and isinstance(d.get("metadata"), dict)
    ]


def _name(value: str) -> str:
    return value if value.startswith("slos/") else f"slos/{value}"


def _apply(args: argparse.Namespace, config: MeshConfig) -> int:
    text = _read(args.file)
    req = pb.ImportOpenSloRequest(
        yaml=text, validate_only=args.dry_run, request_id=uuid.uuid4().hex
    )
    try:
        reply = _stub(config).ImportOpenSlo(req, metadata=_metadata(args, config))
    except grpc.RpcError as err:
        return _fail(from_rpc_error(err))
    verb = "valid" if args.dry_run else "applied"
    for slo in reply.slos:
        print(f"{slo.name} {verb} (objective {slo.objective:g}, service {slo.service})")
    return 0


def _get(args: argparse.Namespace, config: MeshConfig) -> int:
    names = [_name(n) for n in args.names]
    if args.file:
        names += _names_in(_read(args.file))
    if not names:
        raise ConfigError("slo get: name SLOs or give -f FILE")
    md, stub = _metadata(args, config), _stub(config)
    try:
        if args.output == "json":
            for n in names:
                slo = stub.GetSlo(pb.GetSloRequest(name=n), metadata=md).slo
                print(json_format.MessageToJson(slo, preserving_proto_field_name=True))
        else:
            print(stub.ExportOpenSlo(pb.ExportOpenSloRequest(slos=names), metadata=md).yaml, end="")
    except grpc.RpcError as err:
        return _fail(from_rpc_error(err))
    return 0


def _list(args: argparse.Namespace, config: MeshConfig) -> int:
    md, stub, token = _metadata(args, config), _stub(config), ""
    rows: list[pb.Slo] = []
    try:
        while True:
            reply = stub.ListSlos(
                pb.ListSlosRequest(service=args.service, page_token=token), metadata=md
            )
            rows += reply.slos
            token = reply.next_page_token
            if not token:
                break
    except grpc.RpcError as err:
        return _fail(from_rpc_error(err))
    if args.json:
        print(
            json_format.MessageToJson(
                pb.ListSlosResponse(slos=rows), preserving_proto_field_name=True
            )
        )
        return 0
    print(f"{'NAME':<40} {'SERVICE':<20} {'OBJECTIVE':>9}  SOURCE")
    for s in rows:
        source = pb.SliSource.Name(s.indicator.source or pb.SLI_SOURCE_PUSHED).removeprefix(
            "SLI_SOURCE_"
        )
        print(f"{s.name:<40} {s.service:<20} {s.objective:>9.4%}  {source}")
    return 0


def _budget(args: argparse.Namespace, config: MeshConfig) -> int:
    names = [_name(n) for n in args.names]
    if args.file:
        names += _names_in(_read(args.file))
    if not names:
        raise ConfigError("slo budget: name SLOs or give -f FILE")
    md, stub = _metadata(args, config), _stub(config)
    out = []
    try:
        for n in names:
            out.append(
                stub.GetErrorBudget(pb.GetErrorBudgetRequest(slo=n), metadata=md).error_budget
            )
    except grpc.RpcError as err:
        return _fail(from_rpc_error(err))
    if args.json:
        for b in out:
            print(json_format.MessageToJson(b, preserving_proto_field_name=True))
        return 0
    for b in out:
        status = pb.ErrorBudgetStatus.Name(b.status).removeprefix("ERROR_BUDGET_STATUS_")
        print(f"{b.slo}: {status}")
        print(
            f"  objective {b.objective:.4%}  SLI {b.sli:.4%}  events {b.good_count}/{b.total_count}"
        )
        print(f"  budget consumed {b.consumed_fraction:.1%}  remaining {b.remaining_fraction:.1%}")
        if b.HasField("exhaustion_time"):
            print(f"  exhausted at {b.exhaustion_time.ToJsonString()} at the last hour's burn")
        rates = "  ".join(f"{r.window.ToSeconds() // 60}m:{r.rate:.2f}x" for r in b.burn_rates)
        print(f"  burn rates {rates}")
    return 0


def _rules(args: argparse.Namespace, config: MeshConfig) -> int:
    req = pb.GetPrometheusRulesRequest(slos=[_name(n) for n in args.names])
    try:
        print(
            _stub(config).GetPrometheusRules(req, metadata=_metadata(args, config)).rules_yaml,
            end="",
        )
    except grpc.RpcError as err:
        return _fail(from_rpc_error(err))
    return 0
