"""``autoecoops audit ...`` and ``autoecoops policy test``.

    autoecoops audit checkpoint [-o FILE]      save the latest signed checkpoint (and print the key)
    autoecoops audit verify --checkpoint FILE --key VKEY [--earlier FILE] [--start N] [--end N]
    autoecoops audit outbox [--max-age S]         backlog of every audit outbox (records not yet in the log)
    autoecoops audit verify --api [ADDR] --key VKEY [--checkpoint FILE] [--save FILE]
    autoecoops audit report --since WHEN [--until WHEN] [--framework F] [--control ID]
                            [--json FILE] [--html FILE] [--policy-report FILE]
    autoecoops policy test [BUNDLE_DIR]          run a bundle's *_test.rego case tables

The audit commands read the log from Redis directly: ``REDIS_URL``, or the
embedded Redis of the data directory (``AUTOECOOPS_DATA_DIR``), running or
not. ``audit verify --api`` reads it through the gRPC API instead, as a
transparency-log monitor does. Either way a verifier trusts the checkpoint
and key it was given, not the service.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from autoecoops.kernel.mesh.config import MeshConfig
from autoecoops.kernel.mesh.errors import AutoEcoOpsError, ConfigError

Command = Callable[[argparse.Namespace, MeshConfig], int]


def add_commands(sub: Any) -> None:
    """Register the ``audit`` and ``policy`` command groups."""
    audit = sub.add_parser("audit", help="the tamper-evident audit trail: verify, report")
    verbs = audit.add_subparsers(dest="audit_command", required=True)

    cp = verbs.add_parser("checkpoint", help="print or save the latest signed checkpoint")
    cp.add_argument("-o", "--output", type=Path, help="write the signed note to this file")
    cp.set_defaults(func=_run(_checkpoint))

    ver = verbs.add_parser("verify", help="check the stored log against a trusted checkpoint")
    ver.add_argument(
        "--checkpoint",
        type=Path,
        help="a signed checkpoint you trust (required unless --api; with --api, one you kept)",
    )
    ver.add_argument("--key", required=True, help="the verifier key, or a file holding it")
    ver.add_argument(
        "--earlier",
        type=Path,
        help="another checkpoint you kept, older or newer: the log must extend one to the other",
    )
    ver.add_argument(
        "--api",
        nargs="?",
        const="",
        metavar="ADDR",
        help="verify the running log through policy-audit's gRPC API (default: its mesh address)",
    )
    ver.add_argument(
        "--token",
        default=os.environ.get("AUTOECOOPS_TOKEN", ""),
        help="bearer token for --api (default $AUTOECOOPS_TOKEN, else a viewer token from the "
        "local issuer of the data directory)",
    )
    ver.add_argument(
        "--save", type=Path, help="with --api: save the verified checkpoint here for next time"
    )
    ver.add_argument(
        "--plaintext",
        action="store_true",
        help="with --api: no TLS even beyond loopback (TLS is the default there)",
    )
    ver.add_argument("--start", type=int, default=0, help="first index to check (default 0)")
    ver.add_argument(
        "--end", type=int, help="index after the last to check (default: the checkpoint's size)"
    )
    ver.set_defaults(func=_run(_verify))

    rep = verbs.add_parser("report", help="a compliance report over a time range")
    rep.add_argument(
        "--since", required=True, help="RFC 3339 time, or a duration back from now: 30d, 12h"
    )
    rep.add_argument("--until", help="RFC 3339 time (default now)")
    rep.add_argument("--framework", action="append", default=[], help="SOC2, CIS or NIST-800-53")
    rep.add_argument("--control", action="append", default=[], help="a control id")
    rep.add_argument("--json", type=Path, help="write the report (with evidence proofs) here")
    rep.add_argument("--html", type=Path, help="write a readable HTML report here")
    rep.add_argument("--policy-report", type=Path, help="write a ClusterPolicyReport (JSON) here")
    rep.set_defaults(func=_run(_report))

    box = verbs.add_parser(
        "outbox", help="the audit outboxes: records committed but not yet in the log"
    )
    box.add_argument(
        "--max-age",
        type=float,
        default=0.0,
        help="exit 1 when a stream's oldest record is older than this many seconds",
    )
    box.set_defaults(func=_run(_outbox))

    policy = sub.add_parser("policy", help="policy bundles")
    pverbs = policy.add_subparsers(dest="policy_command", required=True)
    test = pverbs.add_parser("test", help="run a bundle's *_test.rego case tables")
    test.add_argument(
        "bundle", nargs="?", type=Path, help="bundle directory (default: the shipped policies)"
    )
    test.set_defaults(func=_policy_test)


def _run(
    command: Callable[[argparse.Namespace, MeshConfig], Coroutine[Any, Any, int]],
) -> Command:
    def run(args: argparse.Namespace, config: MeshConfig) -> int:
        try:
            return asyncio.run(command(args, config))
        except (AutoEcoOpsError, ValueError, OSError) as err:
            print(f"autoecoops: {getattr(err, 'message', err)}", file=sys.stderr)
            return 2

    return run


@contextlib.asynccontextmanager
async def _log(config: MeshConfig) -> AsyncIterator[Any]:
    """(redis, store, AuditLog, NoteVerifier) over the configured or embedded Redis."""
    from autoecoops.kernel.mesh.redis import connect, redis_for_cli, service_base
    from autoecoops.kernel.policy_audit.checkpoint import NoteVerifier
    from autoecoops.kernel.policy_audit.store import AuditStore
    from autoecoops.kernel.policy_audit.trail import AuditLog

    with redis_for_cli(config.redis_url, config.data_dir) as url:
        redis = connect(url)
        try:
            base = service_base(config.key_prefix, "policy-audit", config.redis_cluster)
            store = AuditStore(redis, base + ":{audit}")
            yield redis, store, AuditLog, NoteVerifier
        finally:
            await redis.aclose()


async def _checkpoint(args: argparse.Namespace, config: MeshConfig) -> int:
    async with _log(config) as (_, store, _, _):
        head = await store.head()
    if not head.note:
        print("the audit log is empty: no checkpoint yet", file=sys.stderr)
        return 1
    if args.output:
        args.output.write_text(head.note)
        print(f"saved the checkpoint of size {head.size} to {args.output}")
    else:
        sys.stdout.write(head.note)
    print(f"verifier key: {head.vkey}", file=sys.stderr)
    return 0


async def _outbox(args: argparse.Namespace, config: MeshConfig) -> int:
    from autoecoops.kernel.mesh.outbox import backlogs
    from autoecoops.kernel.mesh.redis import connect

    if not config.redis_url:
        raise ConfigError("REDIS_URL: the outboxes are in Redis; set it to the services' Redis")
    redis = connect(config.redis_url)
    try:
        found = await backlogs(redis, config.key_prefix)
    finally:
        await redis.aclose()
    print(json.dumps(found, indent=2, sort_keys=True))
    late = [k for k, v in found.items() if args.max_age and v["oldest_age_seconds"] > args.max_age]
    for key in late:
        print(f"behind: {key} holds records older than {args.max_age:g}s", file=sys.stderr)
    return 1 if late else 0


def _read_key(value: str) -> str:
    path = Path(value)
    return path.read_text().strip() if "+" not in value and path.exists() else value.strip()


async def _verify(args: argparse.Namespace, config: MeshConfig) -> int:
    from autoecoops.kernel.policy_audit.checkpoint import CheckpointBody, NoteError, NoteVerifier
    from autoecoops.kernel.policy_audit.verify import verify

    if args.api is not None:
        return await _verify_api(args, config)
    if args.checkpoint is None:
        raise ValueError("--checkpoint FILE is required (or --api to verify through the API)")
    verifier = NoteVerifier.from_vkey(_read_key(args.key))
    try:
        trusted = CheckpointBody.parse(verifier.open(args.checkpoint.read_text()))
        earlier = (
            CheckpointBody.parse(verifier.open(args.earlier.read_text())) if args.earlier else None
        )
    except NoteError as err:
        print(f"FAIL: the checkpoint does not verify with this key: {err}")
        return 1
    async with _log(config) as (_, store, _, _):
        started = time.perf_counter()
        result = await verify(store, trusted, args.start, args.end, earlier)
        took = time.perf_counter() - started
    return _print_result(result, trusted.size, took)


def _print_result(result: Any, size: int, took: float) -> int:
    for finding in result.findings:
        print(f"FAIL: {finding}")
    for note in result.notes:
        print(f"ok: {note}")
    if not result.ok:
        print(
            f"the log does NOT match the checkpoint of size {size} ({len(result.findings)} findings)"
        )
        return 1
    print(
        f"OK: entries {result.start}..{result.end - 1} of {size} match the checkpoint "
        f"({result.checked} entries checked in {took:.2f}s)"
        if result.end > result.start
        else f"OK: the checkpoint of size {size} verifies (no entries in range)"
    )
    return 0


async def _verify_api(args: argparse.Namespace, config: MeshConfig) -> int:
    """``audit verify --api``: the running log checked through its gRPC API."""
    import grpc

    from autoecoops.audit.v1 import audit_pb2_grpc
    from autoecoops.kernel.mesh.clients import idempotent_methods_of
    from autoecoops.kernel.mesh.config import (
        channel_options,
        dial_target,
        is_replica_set,
        replica_options,
    )
    from autoecoops.kernel.policy_audit.checkpoint import CheckpointBody, NoteError, NoteVerifier
    from autoecoops.kernel.policy_audit.monitor import GrpcLogApi, monitor
    from autoecoops.sdk.channels import is_loopback

    verifier = NoteVerifier.from_vkey(_read_key(args.key))
    kept: list[CheckpointBody] = []
    for path in (args.checkpoint, args.earlier):
        if path is None:
            continue
        try:
            kept.append(CheckpointBody.parse(verifier.open(path.read_text())))
        except NoteError as err:
            print(f"FAIL: the checkpoint {path} does not verify with this key: {err}")
            return 1
    # AUTOECOOPS_POLICY_AUDIT_ADDR (or --api) may list several replicas: dial them
    # as the mesh does (round robin over the healthy ones, idempotent reads retried
    # on another), and judge loopback by every replica of the list. The single-host
    # check used before saw "ipv4:127.0.0.1:a,127.0.0.1:b" as remote and spoke TLS
    # to a local plaintext mesh.
    addr = dial_target(args.api) if args.api else config.addr("policy-audit")
    token = args.token or _local_token(config)
    metadata = [("authorization", f"Bearer {token}")] if token else []
    options = channel_options(config)
    if is_replica_set(addr):
        options += replica_options(idempotent_methods_of("policy-audit"))
    channel = (
        grpc.aio.insecure_channel(addr, options=options)
        if args.plaintext or is_loopback(addr)
        else grpc.aio.secure_channel(addr, grpc.ssl_channel_credentials(), options=options)
    )
    async with channel:
        api = GrpcLogApi(audit_pb2_grpc.AuditServiceStub(channel), metadata, timeout=30.0)
        started = time.perf_counter()
        try:
            result = await monitor(api, verifier, kept, args.start, args.end)
        except NoteError as err:
            print(f"FAIL: the server's checkpoint does not verify with this key: {err}")
            return 1
        took = time.perf_counter() - started
    code = _print_result(result, result.tree_size, took)
    if code == 0 and args.save:
        args.save.write_text(result.note)
        print(f"saved the verified checkpoint of size {result.tree_size} to {args.save}")
    return code


def _local_token(config: MeshConfig) -> str:
    """A short-lived viewer token from the data directory's issuer, if there is one."""
    from autoecoops.kernel.auth.tokens import mint_local_token

    try:
        return mint_local_token(config, "audit-verify", roles=["viewer"], ttl=600).token
    except (ConfigError, OSError, ValueError):
        return ""


def parse_when(text: str, now: float | None = None) -> int:
    """Microseconds since the epoch of an RFC 3339 time or a duration back from now (30d, 12h, 15m)."""
    now = time.time() if now is None else now
    m = re.fullmatch(r"(\d+)([dhms])", text.strip())
    if m:
        unit = {"d": 86400, "h": 3600, "m": 60, "s": 1}[m.group(2)]
        return int((now - int(m.group(1)) * unit) * 1e6)
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r}: expected an RFC 3339 time or a duration like 30d") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1e6)


async def _report(args: argparse.Namespace, config: MeshConfig) -> int:
    from autoecoops.kernel.policy_audit import compliance
    from autoecoops.kernel.policy_audit.config import Settings

    settings = Settings.from_env(os.environ, config)
    catalogue = compliance.load_catalogue(settings.controls_file)
    controls = compliance.select(catalogue, args.framework, args.control)
    async with _log(config) as (_, store, audit_log, note_verifier):
        head = await store.head()
        if not head.vkey:
            print("the audit log is empty: nothing to report on", file=sys.stderr)
            return 1
        audit = audit_log(store, None, settings.origin, verifier=note_verifier.from_vkey(head.vkey))
        start = parse_when(args.since)
        end = parse_when(args.until) if args.until else int(time.time() * 1e6)
        report = await compliance.generate(audit, controls, start, end, args.framework)
    failures = compliance.verify_evidence(report)
    if args.json:
        args.json.write_text(json.dumps(compliance.to_json(report), indent=2) + "\n")
    if args.html:
        args.html.write_text(compliance.render_html(report))
    if args.policy_report:
        args.policy_report.write_text(
            json.dumps(compliance.to_policy_report(report), indent=2) + "\n"
        )
    width = max((len(r.control.id) for r in report.results), default=10)
    for r in report.results:
        print(f"  {r.result.upper():<5}  {r.control.id:<{width}}  {r.message}")
    s = report.summary()
    print(
        f"pass {s['pass']}, fail {s['fail']}, warn {s['warn']}, error {s['error']}, skip {s['skip']} "
        f"(evidence proven against checkpoint size {report.checkpoint.body.size})"
    )
    for f in failures:
        print(f"FAIL: evidence {f}", file=sys.stderr)
    return 1 if failures else 0


def _policy_test(args: argparse.Namespace, config: MeshConfig) -> int:
    from autoecoops.kernel.policy_audit.bundles import load_dir
    from autoecoops.kernel.policy_audit.config import SHIPPED_POLICIES
    from autoecoops.kernel.policy_audit.engine import CompileError, run_cases

    root: Path = args.bundle or SHIPPED_POLICIES
    spec = load_dir(root)
    tests = {
        p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*_test.rego"))
    }
    try:
        results = run_cases(dict(spec.modules), spec.data, tests)
    except CompileError as err:
        print(f"FAIL: {err}")
        return 1
    for r in results:
        print(
            f"{'PASS' if r.passed else 'FAIL'}: {r.module}: {r.name}{'' if r.passed else ': ' + r.detail}"
        )
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed or not results else 0
