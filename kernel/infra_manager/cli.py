"""``autoecoops app ...``: infra-manager's applications, the way ``argocd app`` shows them.

    autoecoops app list [--project P] [-o table|wide|json]
    autoecoops app get NAME [--refresh] [-o table|json]
    autoecoops app diff NAME [--revision R] [--color auto|always|never]
    autoecoops app manifests NAME [--revision R]
    autoecoops app sync NAME [--revision R] [--prune] [--dry-run] [--resource GROUP:KIND:NAME] [--watch]
    autoecoops app rollback NAME HISTORY_ID [--prune] [--disable-auto-sync] [--watch]
    autoecoops app history NAME
    autoecoops app terminate NAME

They call infra-manager over gRPC (``AUTOECOOPS_INFRA_MANAGER_ADDR``) with the
same credentials as the other commands: ``--token``, else
``$AUTOECOOPS_TOKEN``, else one minted from the local key ring in the data
directory (development only: an admin token for the current user).

``diff`` exits 1 when the application differs from Git, as ``argocd app
diff`` does; ``sync --watch`` and ``rollback --watch`` follow the operation,
print each resource as it is applied, and exit 1 when it fails.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import grpc
from google.protobuf import json_format

from autoecoops.infra.v1 import infra_pb2 as pb
from autoecoops.infra.v1 import infra_pb2_grpc
from autoecoops.kernel.mesh.config import MeshConfig
from autoecoops.kernel.mesh.errors import (
    AutoEcoOpsError,
    FieldViolation,
    InvalidArgument,
    from_rpc_error,
)

Command = Callable[[argparse.Namespace, MeshConfig], int]
#: Seconds between two reads of the operation while following it.
WATCH_POLL = 0.5

_SYNC = {
    pb.SYNC_STATUS_CODE_SYNCED: "Synced",
    pb.SYNC_STATUS_CODE_OUT_OF_SYNC: "OutOfSync",
    pb.SYNC_STATUS_CODE_UNKNOWN: "Unknown",
}
_HEALTH = {
    pb.HEALTH_STATUS_CODE_HEALTHY: "Healthy",
    pb.HEALTH_STATUS_CODE_PROGRESSING: "Progressing",
    pb.HEALTH_STATUS_CODE_DEGRADED: "Degraded",
    pb.HEALTH_STATUS_CODE_SUSPENDED: "Suspended",
    pb.HEALTH_STATUS_CODE_MISSING: "Missing",
    pb.HEALTH_STATUS_CODE_UNKNOWN: "Unknown",
}
_RESOURCE = {
    pb.RESOURCE_SYNC_STATUS_SYNCED: "Synced",
    pb.RESOURCE_SYNC_STATUS_OUT_OF_SYNC: "OutOfSync",
    pb.RESOURCE_SYNC_STATUS_MISSING: "Missing",
    pb.RESOURCE_SYNC_STATUS_EXTRANEOUS: "Extraneous",
}
_PHASE = {
    pb.OPERATION_PHASE_RUNNING: "Running",
    pb.OPERATION_PHASE_SUCCEEDED: "Succeeded",
    pb.OPERATION_PHASE_FAILED: "Failed",
    pb.OPERATION_PHASE_ERROR: "Error",
    pb.OPERATION_PHASE_TERMINATING: "Terminating",
}
_RESULT = {
    pb.RESOURCE_RESULT_CODE_SYNCED: "Synced",
    pb.RESOURCE_RESULT_CODE_SYNC_FAILED: "SyncFailed",
    pb.RESOURCE_RESULT_CODE_PRUNED: "Pruned",
    pb.RESOURCE_RESULT_CODE_PRUNE_SKIPPED: "PruneSkipped",
}
_RUNNING = (pb.OPERATION_PHASE_RUNNING, pb.OPERATION_PHASE_TERMINATING)
_COLORS = {"-": "\033[31m", "+": "\033[32m", "@": "\033[36m", "h": "\033[1m"}
_RESET = "\033[0m"


def add_commands(sub: Any) -> None:
    """Register the ``app`` command group."""
    app = sub.add_parser("app", help="infra-manager applications (as `argocd app`)")
    verbs = app.add_subparsers(dest="app_command", required=True)

    def verb(name: str, help_: str, func: Command) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = verbs.add_parser(name, help=help_)
        p.add_argument("--token", help="bearer token (default: $AUTOECOOPS_TOKEN or a local one)")
        p.set_defaults(func=_guarded(func))
        return p

    ls = verb("list", "list applications", _list)
    ls.add_argument("--project", default="", help="only this project's applications")
    ls.add_argument("-o", "--output", choices=("table", "wide", "json"), default="table")

    get = verb("get", "show an application, its resources and its last operation", _get)
    get.add_argument("name")
    get.add_argument("--refresh", action="store_true", help="compare with Git and the cluster now")
    get.add_argument("-o", "--output", choices=("table", "json"), default="table")

    diff = verb("diff", "the unified diff from live to Git; exit 1 when they differ", _diff)
    diff.add_argument("name")
    diff.add_argument("--revision", default="", help="compare with this Git revision")
    diff.add_argument("--color", choices=("auto", "always", "never"), default="auto")

    man = verb("manifests", "the manifests rendered at a revision", _manifests)
    man.add_argument("name")
    man.add_argument("--revision", default="")

    sync = verb("sync", "sync an application to Git", _sync)
    sync.add_argument("name")
    sync.add_argument("--revision", default="", help="sync to this revision")
    sync.add_argument("--prune", action="store_true", help="delete what Git no longer has")
    sync.add_argument("--dry-run", action="store_true", help="check everything, change nothing")
    sync.add_argument(
        "--resource",
        action="append",
        default=[],
        metavar="GROUP:KIND:NAME",
        help="sync only this resource (repeatable; NAMESPACE/NAME for another namespace)",
    )
    sync.add_argument("--watch", action="store_true", help="follow the operation to its end")

    rb = verb("rollback", "re-apply the manifests of a history entry", _rollback)
    rb.add_argument("name")
    rb.add_argument("history_id", type=int)
    rb.add_argument("--prune", action="store_true")
    rb.add_argument("--dry-run", action="store_true")
    rb.add_argument(
        "--disable-auto-sync", action="store_true", help="turn automated sync off first"
    )
    rb.add_argument("--watch", action="store_true", help="follow the operation to its end")

    hist = verb("history", "an application's deployments, newest first", _history)
    hist.add_argument("name")

    term = verb("terminate", "stop the running sync or rollback", _terminate)
    term.add_argument("name")


def _guarded(command: Command) -> Command:
    def run(args: argparse.Namespace, config: MeshConfig) -> int:
        try:
            return command(args, config)
        except grpc.RpcError as err:
            return _fail(from_rpc_error(err))
        except AutoEcoOpsError as err:
            return _fail(err)

    return run


def _fail(err: AutoEcoOpsError) -> int:
    print(f"autoecoops app: {err.code.name}: {err.message}", file=sys.stderr)
    if err.reason:
        print(f"  reason: {err.reason}", file=sys.stderr)
    for v in err.field_violations:
        print(f"  {v.field}: {v.description}", file=sys.stderr)
    return 2


def _metadata(args: argparse.Namespace, config: MeshConfig) -> list[tuple[str, str]]:
    token = args.token or os.environ.get("AUTOECOOPS_TOKEN", "")
    if not token:
        from autoecoops.kernel.auth.tokens import mint_local_token

        token = mint_local_token(config, getpass.getuser(), roles=["admin"]).token
    return [("authorization", f"Bearer {token}")]


class _Api:
    """The stub and the call credentials of one command."""

    def __init__(self, args: argparse.Namespace, config: MeshConfig) -> None:
        self.channel = grpc.insecure_channel(config.addr("infra-manager"))
        self.stub = infra_pb2_grpc.InfraServiceStub(self.channel)
        self.md = _metadata(args, config)

    def app(self, name: str) -> pb.Application:
        reply = self.stub.GetApplication(pb.GetApplicationRequest(name=name), metadata=self.md)
        app: pb.Application = reply.application
        return app


# -- formatting -----------------------------------------------------------------


def table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Columns padded to their widest cell, two spaces apart (kubectl's layout)."""
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def _when(ts: Any) -> str:
    if not ts.seconds and not ts.nanos:
        return ""
    return datetime.fromtimestamp(ts.seconds, UTC).strftime("%Y-%m-%d %H:%M:%S %Z")


def _policy(app: pb.Application) -> str:
    sp = app.sync_policy
    if sp.detect_only:
        return "DetectOnly"
    if not sp.HasField("automated"):
        return "Manual"
    flags = [
        f for f, on in (("Prune", sp.automated.prune), ("SelfHeal", sp.automated.self_heal)) if on
    ]
    return "Auto" + (f"-{'-'.join(flags)}" if flags else "")


def _kind(ref: pb.ResourceRef) -> str:
    return f"{ref.group}/{ref.kind}" if ref.group else ref.kind


def colorize(diff: str, enabled: bool) -> str:
    """A unified diff with removed lines red, added green, hunks cyan, headers bold."""
    if not enabled:
        return diff
    out = []
    for line in diff.splitlines(keepends=True):
        if line.startswith(("---", "+++")):
            color = _COLORS["h"]
        elif line.startswith("@@"):
            color = _COLORS["@"]
        elif line[:1] in ("-", "+"):
            color = _COLORS[line[0]]
        else:
            out.append(line)
            continue
        body = line.rstrip("\n")
        out.append(f"{color}{body}{_RESET}" + ("\n" if line.endswith("\n") else ""))
    return "".join(out)


# -- commands -------------------------------------------------------------------


def _list(args: argparse.Namespace, config: MeshConfig) -> int:
    api = _Api(args, config)
    apps: list[pb.Application] = []
    token = ""
    while True:
        page = api.stub.ListApplications(
            pb.ListApplicationsRequest(project=args.project, page_size=200, page_token=token),
            metadata=api.md,
        )
        apps += page.applications
        token = page.next_page_token
        if not token:
            break
    if args.output == "json":
        for a in apps:
            print(json_format.MessageToJson(a, indent=None))
        return 0
    head = ["NAME", "CLUSTER", "NAMESPACE", "PROJECT", "STATUS", "HEALTH", "SYNCPOLICY"]
    if args.output == "wide":
        head += ["REPO", "PATH", "TARGET"]
    rows = [head]
    for a in apps:
        row = [
            a.name,
            a.destination.cluster or "in-cluster",
            a.destination.namespace,
            a.project or "default",
            _SYNC.get(a.status.sync.status, "Unknown"),
            _HEALTH.get(a.status.health.status, "Unknown"),
            _policy(a),
        ]
        if args.output == "wide":
            s = a.source
            row += [s.repo_url, s.path, s.target_revision or "HEAD"]
        rows.append(row)
    table(rows, sys.stdout)
    return 0


def _get(args: argparse.Namespace, config: MeshConfig) -> int:
    api = _Api(args, config)
    if args.refresh:
        app = api.stub.RefreshApplication(
            pb.RefreshApplicationRequest(name=args.name), metadata=api.md
        ).application
    else:
        app = api.app(args.name)
    if args.output == "json":
        print(json_format.MessageToJson(app))
        return 0
    st = app.status
    kind = (
        "Helm"
        if app.source.HasField("helm")
        else "Kustomize"
        if app.source.HasField("kustomize")
        else ""
    )
    lines = [
        ("Name:", app.name),
        ("Project:", app.project or "default"),
        ("Cluster:", app.destination.cluster or "in-cluster"),
        ("Namespace:", app.destination.namespace),
        ("Repo:", app.source.repo_url),
        ("Target:", app.source.target_revision or "HEAD"),
        ("Path:", app.source.path + (f" ({kind})" if kind else "")),
        ("Sync Policy:", _policy(app)),
        (
            "Sync Status:",
            f"{_SYNC.get(st.sync.status, 'Unknown')} to {st.sync.revision[:12] or '-'}",
        ),
        (
            "Health Status:",
            _HEALTH.get(st.health.status, "Unknown")
            + (f" ({st.health.message})" if st.health.message else ""),
        ),
    ]
    table([list(pair) for pair in lines], sys.stdout)
    for c in st.conditions:
        print(f"\nCONDITION {c.type}: {c.message}")
    op = st.operation_state
    if op.id:
        print()
        _print_operation(op, sys.stdout)
    if st.resources:
        print()
        rows = [["GROUP", "KIND", "NAMESPACE", "NAME", "STATUS", "HEALTH", "HOOK", "WAVE"]]
        for r in st.resources:
            ref = r.resource
            rows.append(
                [
                    ref.group,
                    ref.kind,
                    ref.namespace,
                    ref.name,
                    _RESOURCE.get(r.status, "Unknown"),
                    _HEALTH.get(r.health.status, ""),
                    "yes" if r.hook else "",
                    str(r.sync_wave),
                ]
            )
        table(rows, sys.stdout)
    return 0


def _print_operation(op: pb.OperationState, out: TextIO) -> None:
    kind = "Rollback" if op.rollback_history_id else "Sync"
    table(
        [
            ["Operation:", f"{kind}{' (dry run)' if op.dry_run else ''}"],
            ["Revision:", op.revision],
            ["Phase:", _PHASE.get(op.phase, "Unknown")],
            ["Message:", op.message],
            ["Initiated By:", op.initiated_by],
            ["Started:", _when(op.start_time)],
            ["Finished:", _when(op.end_time)],
        ],
        out,
    )


def _diff(args: argparse.Namespace, config: MeshConfig) -> int:
    api = _Api(args, config)
    got = api.stub.GetApplicationDiff(
        pb.GetApplicationDiffRequest(name=args.name, revision=args.revision), metadata=api.md
    )
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    differs = False
    for d in got.resource_diffs:
        if not d.diff:
            continue
        differs = True
        ref = d.resource
        title = (
            f"===== {_kind(ref)} {ref.namespace}/{ref.name} ({_RESOURCE.get(d.status, '')}) ======"
        )
        sys.stdout.write((f"{_COLORS['h']}{title}{_RESET}" if color else title) + "\n")
        sys.stdout.write(colorize(d.diff, color))
        if not d.diff.endswith("\n"):
            sys.stdout.write("\n")
    return 1 if differs else 0


def _manifests(args: argparse.Namespace, config: MeshConfig) -> int:
    api = _Api(args, config)
    got = api.stub.GetManifests(
        pb.GetManifestsRequest(name=args.name, revision=args.revision), metadata=api.md
    )
    for m in got.manifests:
        where = f"{m.source_path}#{m.document_index}" + (f" (line {m.line})" if m.line else "")
        sys.stdout.write(f"---\n# {where}\n{m.yaml.rstrip()}\n")
    return 0


def _ref(text: str, index: int) -> pb.ResourceRef:
    parts = text.split(":")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise InvalidArgument(
            f"--resource {text!r}: expected GROUP:KIND:NAME (GROUP empty for the core group)",
            field_violations=[FieldViolation(f"--resource[{index}]", "GROUP:KIND:NAME")],
        )
    group, kind, name = parts
    namespace, _, bare = name.rpartition("/")
    return pb.ResourceRef(group=group, kind=kind, name=bare, namespace=namespace)


def _sync(args: argparse.Namespace, config: MeshConfig) -> int:
    api = _Api(args, config)
    refs = [_ref(r, i) for i, r in enumerate(args.resource)]
    started = api.stub.SyncApplication(
        pb.SyncApplicationRequest(
            name=args.name,
            revision=args.revision,
            prune=args.prune,
            dry_run=args.dry_run,
            resources=refs,
        ),
        metadata=api.md,
    ).operation
    return _follow(api, args.name, started, args.watch)


def _rollback(args: argparse.Namespace, config: MeshConfig) -> int:
    api = _Api(args, config)
    started = api.stub.RollbackApplication(
        pb.RollbackApplicationRequest(
            name=args.name,
            history_id=args.history_id,
            prune=args.prune,
            dry_run=args.dry_run,
            disable_auto_sync=args.disable_auto_sync,
        ),
        metadata=api.md,
    ).operation
    return _follow(api, args.name, started, args.watch)


def _follow(api: _Api, name: str, started: pb.OperationState, watch: bool) -> int:
    """Print the operation; with ``watch``, each resource as it lands, then the end."""
    print(f"operation {started.id} started at revision {started.revision[:12]}")
    if not watch:
        return 0
    shown = 0
    op = started
    tty = sys.stdout.isatty()
    while True:
        op = api.app(name).status.operation_state
        if op.id != started.id:
            print("the operation was replaced by another one", file=sys.stderr)
            return 1
        results = list(op.resource_results)
        for r in results[shown:]:
            ref = r.resource
            line = f"  {_RESULT.get(r.code, '?'):<12} {_kind(ref)} {ref.namespace + '/' if ref.namespace else ''}{ref.name}"
            if r.message:
                line += f"  ({r.message})"
            if tty:
                sys.stdout.write("\r\033[K")
            print(line, flush=True)
        shown = max(shown, len(results))
        if op.phase not in _RUNNING:
            break
        if tty:
            phase = _PHASE.get(op.phase, "")
            sys.stdout.write(f"\r\033[K{phase}: {len(results)} done; {op.message}")
            sys.stdout.flush()
        time.sleep(WATCH_POLL)
    if tty:
        sys.stdout.write("\r\033[K")
    print()
    _print_operation(op, sys.stdout)
    return 0 if op.phase == pb.OPERATION_PHASE_SUCCEEDED else 1


def _history(args: argparse.Namespace, config: MeshConfig) -> int:
    api = _Api(args, config)
    rows = [["ID", "DATE", "REVISION", "INITIATED BY"]]
    token = ""
    while True:
        page = api.stub.ListApplicationHistory(
            pb.ListApplicationHistoryRequest(name=args.name, page_size=200, page_token=token),
            metadata=api.md,
        )
        for e in page.entries:
            rows.append([str(e.id), _when(e.deploy_time), e.revision, e.initiated_by])
        token = page.next_page_token
        if not token:
            break
    table(rows, sys.stdout)
    return 0


def _terminate(args: argparse.Namespace, config: MeshConfig) -> int:
    api = _Api(args, config)
    op = api.stub.TerminateOperation(
        pb.TerminateOperationRequest(name=args.name), metadata=api.md
    ).operation
    print(f"operation {op.id} of {args.name}: {_PHASE.get(op.phase, '')} ({op.message})")
    return 0
