"""The contracts themselves: every RPC is reachable over REST and declares its
access rule; every event type names its topic."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor

import autoecoops
from autoecoops.common.v1 import options_pb2
from autoecoops.kernel.mesh.clients import ClientFactory
from autoecoops.kernel.mesh.server import CATALOG, Runtime, load_register
from tests.conftest import make_config


def _files() -> list[descriptor.FileDescriptor]:
    files = []
    for mod in pkgutil.walk_packages(autoecoops.__path__, "autoecoops."):
        if mod.name.endswith("_pb2") and ".kernel" not in mod.name:
            files.append(importlib.import_module(mod.name).DESCRIPTOR)
    return files


FILES = _files()
METHODS = [m for f in FILES for s in f.services_by_name.values() for m in s.methods]
EVENTS = [
    m
    for f in FILES
    for m in f.message_types_by_name.values()
    if m.GetOptions().HasExtension(options_pb2.event)
]


def test_every_package_is_generated() -> None:
    packages = {f.package for f in FILES}
    for domain in (
        "auth",
        "memory",
        "events",
        "policy",
        "audit",
        "infra",
        "autoops",
        "iaops",
        "machineops",
    ):
        assert f"autoecoops.{domain}.v1" in packages


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.full_name)
def test_every_rpc_has_an_http_rule_and_an_access_rule(method: descriptor.MethodDescriptor) -> None:
    opts = method.GetOptions()
    assert opts.HasExtension(annotations_pb2.http), "no google.api.http rule"
    policy = opts.Extensions[options_pb2.method]
    assert policy.public or policy.permission, "neither a permission nor public: it would be denied"
    if policy.permission:
        domain = method.containing_service.file.package.split(".")[1]
        assert policy.permission.split(".")[0] == domain, "a permission belongs to its own domain"
        assert len(policy.permission.split(".")) == 3


@pytest.mark.parametrize(
    "method",
    [m for m in METHODS if m.GetOptions().Extensions[options_pb2.method].resource_field],
    ids=lambda m: m.full_name,
)
def test_every_resource_field_names_a_string_field_of_the_request(
    method: descriptor.MethodDescriptor,
) -> None:
    path = method.GetOptions().Extensions[options_pb2.method].resource_field
    desc: descriptor.Descriptor | None = method.input_type
    *parents, leaf = path.split(".")
    for part in parents:
        assert desc is not None
        field = desc.fields_by_name.get(part)
        assert field is not None and field.message_type is not None, f"{path}: no message {part}"
        desc = field.message_type
    assert desc is not None
    field = desc.fields_by_name.get(leaf)
    assert field is not None, f"{path}: no field {leaf}"
    assert field.type == descriptor.FieldDescriptor.TYPE_STRING and not field.is_repeated


def test_resource_of_prefers_the_method_option_field() -> None:
    from autoecoops.infra.v1 import infra_pb2
    from autoecoops.kernel.mesh.audit import resource_of

    request = infra_pb2.UpdateApplicationRequest(application=infra_pb2.Application(name="web"))
    assert resource_of(request) == "application/web"
    assert resource_of(request, "application.name") == "web"
    # An unset field falls back to the usual names rather than auditing nothing.
    assert resource_of(request, "application.project") == "application/web"


@pytest.mark.parametrize("event", EVENTS, ids=lambda m: m.full_name)
def test_every_event_type_names_its_topic(event: descriptor.Descriptor) -> None:
    spec = event.GetOptions().Extensions[options_pb2.event]
    assert spec.type.startswith("autoecoops.")
    assert spec.topic and spec.topic == spec.topic.lower() and ":" not in spec.topic
    assert spec.summary


def test_events_exist_for_the_seed_flows() -> None:
    types = {e.GetOptions().Extensions[options_pb2.event].type for e in EVENTS}
    for wanted in (
        "autoecoops.infra.sync.started",
        "autoecoops.infra.sync.succeeded",
        "autoecoops.infra.sync.failed",
        "autoecoops.infra.drift.detected",
        "autoecoops.infra.rollback.completed",
    ):
        assert wanted in types


class _Recorder:
    """Stands in for grpc.aio.Server to record which services a register() adds."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def add_generic_rpc_handlers(self, handlers: tuple[object, ...]) -> None:
        self.names.update(h.service_name() for h in handlers)  # type: ignore[attr-defined]

    def add_registered_method_handlers(self, name: str, handlers: object) -> None:
        self.names.add(name)


async def test_every_contract_service_is_served_by_one_mesh_service(
    tmp_path: Path, redis_url: str
) -> None:
    cfg = make_config(data_dir=tmp_path, redis_url=redis_url)
    runtime = Runtime(config=cfg, clients=ClientFactory(cfg))
    served: dict[str, str] = {}
    for name in CATALOG:
        recorder = _Recorder()
        returned = load_register(name)(recorder, runtime)  # type: ignore[arg-type]
        assert set(returned) == recorder.names, (
            f"{name} reports what it registers for health/reflection"
        )
        for svc in recorder.names:
            assert svc not in served, f"{svc} served by both {served.get(svc)} and {name}"
            served[svc] = name
    declared = {s.full_name for f in FILES for s in f.services_by_name.values()}
    assert set(served) == declared
