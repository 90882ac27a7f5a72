"""``autoecoops node ...`` and ``autoecoops agent``.

    autoecoops node list [--selector SEL] [--filter EXPR] [--json]
    autoecoops node get NODE [--json]
    autoecoops node evaluate NODE [--baseline B]... [--control ID]... [--timeout S] [--json]
    autoecoops node inventory NODE [--table T]... [--refresh] [--json]
    autoecoops node enroll-token NODE [--label k=v]... [--ttl S]
    autoecoops node import-baseline ID FILE.yaml
    autoecoops agent --node NODE [--enroll-secret-file F] [--state-dir D]
                     [--evaluate-interval S] [--inventory-interval S]

``node`` commands call machine-ops (``AUTOECOOPS_MACHINE_OPS_ADDR``) with
``--token``, else ``$AUTOECOOPS_TOKEN``, else an admin token minted from the
local key ring (development only). ``agent`` runs the node agent: it dials
machine-ops and auth-service (``AUTOECOOPS_AUTH_SERVICE_ADDR``) and nothing
dials it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, message

from autoecoops.kernel.mesh.config import MeshConfig
from autoecoops.kernel.mesh.errors import from_rpc_error
from autoecoops.machineops.v1 import machineops_pb2 as pb
from autoecoops.machineops.v1 import machineops_pb2_grpc

_STATUS = {1: "PASS", 2: "FAIL", 3: "ERROR", 4: "SKIP"}


def add_commands(sub: Any) -> None:
    """Register ``autoecoops node ...`` and ``autoecoops agent``."""
    node = sub.add_parser("node", help="machine-ops: nodes, evaluations, inventory")
    verbs = node.add_subparsers(dest="node_command", required=True)

    def common(p: argparse.ArgumentParser, json_flag: bool = True) -> None:
        p.add_argument("--token", help="bearer token (default: $AUTOECOOPS_TOKEN or a local one)")
        if json_flag:
            p.add_argument("--json", action="store_true", help="print the response as JSON")

    ls = verbs.add_parser("list", help="list nodes (label selector, inventory filter)")
    ls.add_argument(
        "--selector", "-l", default="", help="label selector, e.g. zone=edge,role in (gw)"
    )
    ls.add_argument("--filter", default="", help="inventory filter, e.g. 'os.version < 12'")
    common(ls)
    ls.set_defaults(func=_list)

    get = verbs.add_parser("get", help="show a node")
    get.add_argument("node")
    common(get)
    get.set_defaults(func=_get)

    ev = verbs.add_parser("evaluate", help="evaluate a node now through its agent")
    ev.add_argument("node")
    ev.add_argument("--baseline", action="append", default=[], help="baseline id (repeatable)")
    ev.add_argument("--control", action="append", default=[], help="control id (repeatable)")
    ev.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the agent")
    common(ev)
    ev.set_defaults(func=_evaluate)

    inv = verbs.add_parser("inventory", help="show a node's inventory")
    inv.add_argument("node")
    inv.add_argument("--table", action="append", default=[], help="only this table (repeatable)")
    inv.add_argument("--refresh", action="store_true", help="have the agent collect it now first")
    common(inv)
    inv.set_defaults(func=_inventory)

    tok = verbs.add_parser("enroll-token", help="create a one-time enrollment secret for a node")
    tok.add_argument("node")
    tok.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    tok.add_argument("--ttl", type=float, default=3600.0, help="seconds it stays usable")
    common(tok, json_flag=False)
    tok.set_defaults(func=_enroll_token)

    imp = verbs.add_parser(
        "import-baseline", help="create or replace a baseline from InSpec-style YAML"
    )
    imp.add_argument("baseline_id")
    imp.add_argument("file", type=Path)
    common(imp)
    imp.set_defaults(func=_import)

    agent = sub.add_parser("agent", help="run the machine-ops node agent")
    agent.add_argument("--node", required=True, help="the node id the enrollment secret is for")
    agent.add_argument("--enroll-secret-file", type=Path, help="file holding the enrollment secret")
    agent.add_argument(
        "--state-dir", type=Path, default=None, help="default $AUTOECOOPS_DATA_DIR/agent"
    )
    agent.add_argument("--evaluate-interval", type=float, default=300.0)
    agent.add_argument("--inventory-interval", type=float, default=600.0)
    agent.add_argument("--buffer", type=int, default=10_000, help="outbox capacity (messages)")
    agent.set_defaults(func=_agent)


def _stub(config: MeshConfig) -> machineops_pb2_grpc.MachineOpsServiceStub:
    return machineops_pb2_grpc.MachineOpsServiceStub(
        grpc.insecure_channel(config.addr("machine-ops"))
    )


def _meta(args: argparse.Namespace, config: MeshConfig) -> list[tuple[str, str]]:
    token = args.token or os.environ.get("AUTOECOOPS_TOKEN", "")
    if not token:
        from autoecoops.kernel.memory_hub.cli import local_token

        token = local_token(config)
    return [("authorization", f"Bearer {token}")]


def _node(name: str) -> str:
    return name if name.startswith("nodes/") else f"nodes/{name}"


def _print(msg: message.Message) -> None:
    print(json.dumps(json_format.MessageToDict(msg, preserving_proto_field_name=True), indent=2))


def _call(fn: Any) -> Any:
    def run(args: argparse.Namespace, config: MeshConfig) -> int:
        try:
            return int(fn(args, config))
        except grpc.RpcError as err:
            e = from_rpc_error(err)
            print(f"autoecoops node: {e.code.name}: {e.message}", file=sys.stderr)
            for v in e.field_violations:
                print(f"  {v.field}: {v.description}", file=sys.stderr)
            return 1

    return run


@_call
def _list(args: argparse.Namespace, config: MeshConfig) -> int:
    stub, meta = _stub(config), _meta(args, config)
    token, nodes = "", []
    while True:
        if args.filter:
            r = stub.SearchNodes(
                pb.SearchNodesRequest(
                    filter=args.filter, label_selector=args.selector, page_token=token
                ),
                metadata=meta,
            )
        else:
            r = stub.ListNodes(
                pb.ListNodesRequest(label_selector=args.selector, page_token=token), metadata=meta
            )
        nodes.extend(r.nodes)
        token = r.next_page_token
        if not token:
            break
    if args.json:
        print(
            json.dumps(
                [json_format.MessageToDict(n, preserving_proto_field_name=True) for n in nodes],
                indent=2,
            )
        )
        return 0
    print(f"{'NAME':<32} {'CONNECTED':<10} {'SCORE':>6}  {'OS':<12} LABELS")
    for n in nodes:
        score = f"{n.compliance_score:.1f}" if n.HasField("compliance_score") else "-"
        labels = ",".join(f"{k}={v}" for k, v in sorted(n.labels.items()))
        print(
            f"{n.name:<32} {str(n.connected).lower():<10} {score:>6}  {n.os_version or '-':<12} {labels}"
        )
    return 0


@_call
def _get(args: argparse.Namespace, config: MeshConfig) -> int:
    _print(
        _stub(config)
        .GetNode(pb.GetNodeRequest(name=_node(args.node)), metadata=_meta(args, config))
        .node
    )
    return 0


@_call
def _evaluate(args: argparse.Namespace, config: MeshConfig) -> int:
    req = pb.EvaluateNodeRequest(
        name=_node(args.node),
        baselines=[b if b.startswith("baselines/") else f"baselines/{b}" for b in args.baseline],
        control_ids=args.control,
        request_id=uuid.uuid4().hex,
    )
    req.timeout.FromNanoseconds(int(args.timeout * 1e9))
    ev = (
        _stub(config)
        .EvaluateNode(req, metadata=_meta(args, config), timeout=args.timeout + 10)
        .evaluation
    )
    if args.json:
        _print(ev)
        return 0
    for r in ev.results:
        print(
            f"{_STATUS.get(r.status, '?'):<5} {r.control_id:<12} {r.title[:60]:<60} {r.observed[:30]}"
        )
    print(
        f"score {ev.score:.1f}: {ev.passed} passed, {ev.failed} failed, {ev.errored} errors, {ev.skipped} skipped; {len(ev.drift)} drifted"
    )
    return 0


@_call
def _inventory(args: argparse.Namespace, config: MeshConfig) -> int:
    name = _node(args.node) + "/inventory"
    if args.refresh:
        _stub(config).RefreshInventory(
            pb.RefreshInventoryRequest(name=name), metadata=_meta(args, config), timeout=90
        )
    inv = (
        _stub(config)
        .GetInventory(
            pb.GetInventoryRequest(name=name, tables=args.table), metadata=_meta(args, config)
        )
        .inventory
    )
    if args.json:
        _print(inv)
        return 0
    for t in inv.tables:
        print(f"{t.name} ({len(t.rows)} rows)")
        for row in t.rows[:20]:
            print("  " + "  ".join(f"{k}={v}" for k, v in sorted(row.columns.items()) if v)[:160])
        if len(t.rows) > 20:
            print(f"  ... {len(t.rows) - 20} more")
    return 0


@_call
def _enroll_token(args: argparse.Namespace, config: MeshConfig) -> int:
    labels = dict(kv.split("=", 1) for kv in args.label)
    token = pb.EnrollmentToken(node_id=args.node, labels=labels)
    token.ttl.FromNanoseconds(int(args.ttl * 1e9))
    r = _stub(config).CreateEnrollmentToken(
        pb.CreateEnrollmentTokenRequest(
            enrollment_token_id=f"{args.node}-{uuid.uuid4().hex[:6]}",
            enrollment_token=token,
            request_id=uuid.uuid4().hex,
        ),
        metadata=_meta(args, config),
    )
    print(r.secret)
    return 0


@_call
def _import(args: argparse.Namespace, config: MeshConfig) -> int:
    r = _stub(config).ImportBaseline(
        pb.ImportBaselineRequest(
            baseline_id=args.baseline_id, yaml=args.file.read_text(), request_id=uuid.uuid4().hex
        ),
        metadata=_meta(args, config),
    )
    if args.json:
        _print(r.baseline)
    else:
        print(
            f"{r.baseline.name} version {r.baseline.version}: {len(r.baseline.controls)} controls"
        )
    return 0


def _agent(args: argparse.Namespace, config: MeshConfig) -> int:
    from autoecoops.platforms.machine_ops.agent import Agent, AgentConfig

    secret = ""
    if args.enroll_secret_file:
        secret = args.enroll_secret_file.read_text().strip()
    elif os.environ.get("AUTOECOOPS_AGENT_ENROLL_SECRET"):
        secret = os.environ["AUTOECOOPS_AGENT_ENROLL_SECRET"].strip()
    agent = Agent(
        AgentConfig(
            platform=config.addr("machine-ops"),
            auth=config.addr("auth-service"),
            node_id=args.node,
            state_dir=args.state_dir or Path(config.data_dir) / "agent",
            enroll_secret=secret,
            evaluate_interval=args.evaluate_interval,
            inventory_interval=args.inventory_interval,
            buffer_capacity=args.buffer,
        )
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, agent.stop)
        await agent.run()

    asyncio.run(main())
    return 0
