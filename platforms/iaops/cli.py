"""``autoecoops iac validate PATH... | --app NAME``: validate IaC like Conftest does.

    autoecoops iac validate k8s/manifests/ plan.json           built-in rules, locally
    autoecoops iac validate deploy/ --policy-bundle my-rules   + Conftest-style Rego via IAOps
    autoecoops iac validate --app web --revision main          an infra-manager Application
    ... -o table|json|sarif|junit  [--output-file F]  [--fail-on-warn]  [--skip RULE]

PATH alone runs the built-in rules in this process (no server needed). A
policy bundle or an application goes through IAOps's ValidateManifests
(``AUTOECOOPS_IAOPS_ADDR``): policy-audit evaluates the Rego, infra-manager
renders the application. The token is ``--token``, else ``$AUTOECOOPS_TOKEN``,
else one minted from the local key ring (development).

Exit codes are Conftest's: 0 no failures; 1 failures (with --fail-on-warn:
1 warnings only, 2 failures); 1 also when the input cannot be read or the
service refuses the request (the error goes to stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import grpc

from autoecoops.iaops.v1 import iaops_pb2 as pb
from autoecoops.iaops.v1 import iaops_pb2_grpc
from autoecoops.kernel.mesh.config import MeshConfig, channel_options
from autoecoops.kernel.mesh.errors import AutoEcoOpsError, from_rpc_error
from autoecoops.platforms.iaops import report as reports
from autoecoops.platforms.iaops.documents import collect
from autoecoops.platforms.iaops.validation import Finding, Report, ResourceId, Validator


def add_commands(sub: Any) -> None:
    """Register ``iac validate``."""
    iac = sub.add_parser("iac", help="infrastructure-as-code: validate manifests and plans")
    verbs = iac.add_subparsers(dest="iac_command", required=True)
    v = verbs.add_parser(
        "validate",
        help="validate Kubernetes YAML, Terraform plan JSON or an application",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    v.add_argument("paths", nargs="*", type=Path, help="files or directories (YAML, JSON)")
    v.add_argument("--app", help="an infra-manager Application (rendered by infra-manager)")
    v.add_argument("--revision", default="", help="the Git revision to render --app at")
    v.add_argument("--policy-bundle", default="", help="policy-audit bundle with Rego rules")
    v.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="Rego package(s) holding deny/warn/violation (Conftest's --namespace; default main)",
    )
    v.add_argument("--skip", action="append", default=[], help="a built-in rule id or name to skip")
    v.add_argument("-o", "--output", choices=sorted(reports.FORMATS), default="table")
    v.add_argument("--output-file", type=Path, help="write the report here instead of stdout")
    v.add_argument(
        "--fail-on-warn", action="store_true", help="warnings fail too (exit 1; failures 2)"
    )
    v.add_argument("--token", help="bearer token (default: $AUTOECOOPS_TOKEN or a local one)")
    v.set_defaults(func=validate)


def exit_code(report: Report, fail_on_warn: bool) -> int:
    """Conftest's exit codes."""
    if fail_on_warn:
        return 2 if report.failures else 1 if report.warnings else 0
    return 1 if report.failures else 0


def _from_pb(r: pb.ValidationReport) -> Report:
    out = Report(
        resource_count=r.resource_count,
        file_count=r.file_count,
        policy_bundle=r.policy_bundle,
        revision=r.revision,
    )
    for f in r.findings:
        out.findings.append(
            Finding(
                rule_id=f.rule_id,
                rule_name=f.rule_name,
                severity=f.severity,
                file=f.file,
                line=f.line,
                message=f.message,
                remediation=f.remediation,
                pointer=f.json_pointer,
                resource=ResourceId(
                    f.resource.api_version, f.resource.kind, f.resource.namespace, f.resource.name
                ),
                source=f.source,
                help_uri=f.help_uri,
                # A Rego warn rule's finding is LOW; a failing one never is.
                warn_only=f.source == "rego" and f.rule_name.startswith("warn"),
            )
        )
    return out


async def _remote(
    args: argparse.Namespace, config: MeshConfig, files: list[tuple[str, str]]
) -> Report:
    from autoecoops.kernel.memory_hub.cli import local_token

    token = args.token or os.environ.get("AUTOECOOPS_TOKEN", "") or local_token(config)
    request = pb.ValidateManifestsRequest(
        files=[pb.ManifestFile(path=p, content=c) for p, c in files],
        application=args.app or "",
        revision=args.revision,
        policy_bundle=args.policy_bundle,
        policy_packages=args.namespace,
        skip_rules=args.skip,
    )
    async with grpc.aio.insecure_channel(
        config.addr("iaops"), options=channel_options(config)
    ) as channel:
        stub = iaops_pb2_grpc.IaOpsServiceStub(channel)
        reply = await stub.ValidateManifests(
            request, metadata=[("authorization", f"Bearer {token}")], timeout=120
        )
    return _from_pb(reply.report)


def validate(args: argparse.Namespace, config: MeshConfig) -> int:
    """Run ``iac validate``."""
    if bool(args.paths) == bool(args.app):
        print("autoecoops iac validate: give PATH... or --app NAME (not both)", file=sys.stderr)
        return 1
    try:
        charts: list[str] = []
        files = list(collect(args.paths, charts)) if args.paths else []
        for chart in charts:
            print(
                f"note: {chart} is a Helm chart; its templates are not manifests. "
                "Validate what infra-manager renders with --app NAME.",
                file=sys.stderr,
            )
        if args.app or args.policy_bundle:
            report = asyncio.run(_remote(args, config, files))
        else:
            report = Validator(args.skip).validate(files)
    except (OSError, UnicodeDecodeError) as err:
        print(f"autoecoops iac validate: {err}", file=sys.stderr)
        return 1
    except KeyError as err:
        print(f"autoecoops iac validate: unknown rule to skip: {err.args[0]}", file=sys.stderr)
        return 1
    except grpc.aio.AioRpcError as err:
        e: AutoEcoOpsError = from_rpc_error(err)
        print(f"autoecoops iac validate: {e.code.name}: {e.message}", file=sys.stderr)
        for v in e.field_violations:
            print(f"  {v.field}: {v.description}", file=sys.stderr)
        return 1
    text = reports.FORMATS[args.output](report)
    if args.output_file:
        args.output_file.write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    return exit_code(report, args.fail_on_warn)
