"""The ``autoecoops`` command.

autoecoops up                 every service and the REST gateway (embedded Redis if REDIS_URL is unset)
autoecoops serve SERVICE      one service (or the gateway), as a Kubernetes pod runs it
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import logging
import sys
import time
from collections.abc import Sequence

from autoecoops.kernel.mesh.config import SERVICE_NAMES, SERVICES, MeshConfig
from autoecoops.kernel.mesh.errors import ConfigError

log = logging.getLogger("autoecoops")


#: Packages that may contribute commands through a ``cli`` module.
COMMAND_PACKAGES = (
    "autoecoops.kernel.auth",
    "autoecoops.kernel.memory_hub",
    "autoecoops.kernel.event_bus",
    "autoecoops.kernel.policy_audit",
    "autoecoops.kernel.infra_manager",
    "autoecoops.platforms.autoops",
    "autoecoops.platforms.iaops",
    "autoecoops.platforms.machine_ops",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoecoops", description="AutoEcoOps control plane")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("up", help="run every service of the mesh in this process")
    serve = sub.add_parser("serve", help="run one service (one per pod in Kubernetes)")
    serve.add_argument("service", choices=[*SERVICE_NAMES, "gateway"])
    for package in COMMAND_PACKAGES:
        try:
            module = importlib.import_module(f"{package}.cli")
        except ModuleNotFoundError as err:
            if err.name != f"{package}.cli":
                raise
            continue
        module.add_commands(sub)
    return parser


def _with_redis(config: MeshConfig) -> tuple[MeshConfig, object | None]:
    """Start the embedded Redis when REDIS_URL is unset."""
    if config.redis_url:
        return config, None
    from autoecoops.kernel.mesh.redis import EmbeddedRedis

    embedded = EmbeddedRedis(config.data_dir)
    url = embedded.start()
    return dataclasses.replace(config, redis_url=url), embedded


def _run(config: MeshConfig, names: Sequence[str], gateway: bool) -> int:
    from autoecoops.gateway import GatewaySettings, MeshWithGateway
    from autoecoops.kernel.mesh.metrics import serve_metrics
    from autoecoops.kernel.mesh.redis import EmbeddedRedis
    from autoecoops.kernel.mesh.server import Mesh, run_until_signalled

    # Read now: a bad gateway setting stops us before anything starts.
    settings = GatewaySettings.from_env() if gateway else None
    started = time.monotonic()
    config, embedded = _with_redis(config) if names else (config, None)
    if config.metrics_port:
        serve_metrics(config.metrics_port, config.host)

    def ready(mesh: Mesh) -> None:
        took = time.monotonic() - started
        width = max([len(s.name) for s in mesh.servers] + [len("gateway")])
        for srv in mesh.servers:
            print(f"  {srv.name:<{width}}  grpc://{config.host}:{srv.port}  SERVING", flush=True)
        rest = getattr(mesh, "gateway", None)
        if rest is not None:
            print(
                f"  {'gateway':<{width}}  http://{config.host}:{rest.port}  /docs /openapi.json /healthz"
            )
        if mesh.servers:
            redis_note = "embedded, " + str(config.data_dir) if embedded else config.redis_url
            print(f"  {'redis':<{width}}  {redis_note}")
        if config.metrics_port:
            print(f"  {'metrics':<{width}}  http://{config.host}:{config.metrics_port}/metrics")
        if any(srv.name == "auth-service" for srv in mesh.servers):
            hint = 'TOKEN=$(autoecoops token --subject you --roles admin); then -H "authorization: Bearer $TOKEN"'
            print(f"  {'token':<{width}}  {hint}")
        what = f"all {len(mesh.servers)} services" if mesh.servers else "the gateway"
        print(f"{what} SERVING in {took:.2f}s; Ctrl-C drains and stops", flush=True)

    mesh = MeshWithGateway(config, settings=settings) if settings else Mesh(config)
    try:
        asyncio.run(run_until_signalled(mesh, names, ready))
    finally:
        if isinstance(embedded, EmbeddedRedis):
            embedded.stop()
    print("drained; bye", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``autoecoops`` console script."""
    args = _parser().parse_args(argv)
    try:
        config = MeshConfig.from_env()
    except ConfigError as err:
        print(f"autoecoops: invalid configuration: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command not in ("up", "serve"):
            code: int = args.func(args, config)
            return code
        if args.command == "serve" and args.service == "gateway":
            return _run(config, [], gateway=True)
        names = [s.name for s in SERVICES] if args.command == "up" else [args.service]
        return _run(config, names, gateway=args.command == "up")
    except ConfigError as err:
        print(f"autoecoops: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
