"""``autoecoops audit ...`` and ``autoecoops policy test``.

    autoecoops audit checkpoint [-o FILE]      save the latest signed checkpoint (and print the key)
    autoecoops audit verify --checkpoint FILE --key VKEY [--earlier FILE] [--start N] [--end N]
    autoecoops audit report --since WHEN [--until WHEN] [--framework F] [--control ID]
                            [--json FILE] [--html FILE] [--policy-report FILE]
    autoecoops policy test [BUNDLE_DIR]          run a bundle's *_test.rego case tables

The audit commands read the log from Redis (``REDIS_URL``) directly: a
verifier trusts the checkpoint and key it was given, not the service.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Callable, Coroutine
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
    ver.add_argument("--checkpoint", type=Path, required=True, help="a signed checkpoint you trust")
    ver.add_argument("--key", required=True, help="the verifier key, or a file holding it")
    ver.add_argument(
        "--earlier", type=Path, help="an earlier checkpoint you kept: the log must extend it"
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


def _log(config: MeshConfig) -> Any:
    from autoecoops.kernel.mesh.redis import connect
    from autoecoops.kernel.policy_audit.checkpoint import NoteVerifier
    from autoecoops.kernel.policy_audit.store import AuditStore
    from autoecoops.kernel.policy_audit.trail import AuditLog

    if not config.redis_url:
        raise ConfigError(
            "REDIS_URL: the audit commands read the log from Redis; set it to the server's Redis"
        )
    redis = connect(config.redis_url)
    store = AuditStore(redis, f"{config.key_prefix}policy-audit:{{audit}}")
    return redis, store, AuditLog, NoteVerifier


async def _checkpoint(args: argparse.Namespace, config: MeshConfig) -> int:
    redis, store, _, _ = _log(config)
    try:
        head = await store.head()
    finally:
        await redis.aclose()
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


def _read_key(value: str) -> str:
    path = Path(value)
    return path.read_text().strip() if "+" not in value and path.exists() else value.strip()


async def _verify(args: argparse.Namespace, config: MeshConfig) -> int:
    from autoecoops.kernel.policy_audit.checkpoint import CheckpointBody, NoteError
    from autoecoops.kernel.policy_audit.verify import verify

    redis, store, _, note_verifier = _log(config)
    try:
        verifier = note_verifier.from_vkey(_read_key(args.key))
        try:
            trusted = CheckpointBody.parse(verifier.open(args.checkpoint.read_text()))
            earlier = (
                CheckpointBody.parse(verifier.open(args.earlier.read_text()))
                if args.earlier
                else None
            )
        except NoteError as err:
            print(f"FAIL: the checkpoint does not verify with this key: {err}")
            return 1
        started = time.perf_counter()
        result = await verify(store, trusted, args.start, args.end, earlier)
        took = time.perf_counter() - started
    finally:
        await redis.aclose()
    for finding in result.findings:
        print(f"FAIL: {finding}")
    for note in result.notes:
        print(f"ok: {note}")
    if not result.ok:
        print(
            f"the log does NOT match the checkpoint of size {trusted.size} ({len(result.findings)} findings)"
        )
        return 1
    print(
        f"OK: entries {result.start}..{result.end - 1} of {trusted.size} match the checkpoint "
        f"({result.checked} entries checked in {took:.2f}s)"
        if result.end > result.start
        else f"OK: the checkpoint of size {trusted.size} verifies (no entries in range)"
    )
    return 0


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
    redis, store, audit_log, note_verifier = _log(config)
    try:
        head = await store.head()
        if not head.vkey:
            print("the audit log is empty: nothing to report on", file=sys.stderr)
            return 1
        audit = audit_log(store, None, settings.origin, verifier=note_verifier.from_vkey(head.vkey))
        start = parse_when(args.since)
        end = parse_when(args.until) if args.until else int(time.time() * 1e6)
        report = await compliance.generate(audit, controls, start, end, args.framework)
    finally:
        await redis.aclose()
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
