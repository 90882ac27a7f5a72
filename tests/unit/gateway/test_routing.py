"""Path templates, the rules read from descriptors, and the router, without a network."""

from __future__ import annotations

import pytest
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool

from autoecoops.gateway.router import MethodNotAllowed, NoRoute, Router
from autoecoops.gateway.rules import RuleError, backend_of, mesh_bindings
from autoecoops.gateway.templates import PathDecodeError, TemplateError, parse


def parts(path: str) -> list[str]:
    return path[1:].split("/")


@pytest.mark.parametrize(
    ("template", "path", "values"),
    [
        ("/v1/roles", "/v1/roles", {}),
        ("/v1/roles/{name}", "/v1/roles/admin", {"name": "admin"}),
        ("/v1/roles/{role.name}", "/v1/roles/a%20b", {"role.name": "a b"}),
        ("/v1/{name=shelves/*}", "/v1/shelves/s1", {"name": "shelves/s1"}),
        ("/v1/{name=shelves/*/books/*}", "/v1/shelves/s/books/b", {"name": "shelves/s/books/b"}),
        ("/v1/files/{path=**}", "/v1/files/a/b/c", {"path": "a/b/c"}),
        ("/v1/files/{path=**}", "/v1/files/a", {"path": "a"}),
        ("/v1/{a}/x/{b}", "/v1/1/x/2", {"a": "1", "b": "2"}),
        ("/v1/*/x", "/v1/anything/x", {}),
        ("/v1/roles/{name}", "/v1/roles/a%2Fb", {"name": "a/b"}),
        ("/v1/{name=shelves/*}", "/v1/shelves/a%2Fb", {"name": "shelves/a%2Fb"}),
        ("/v1/{name=shelves/*}", "/v1/shelves/a%2fb%41", {"name": "shelves/a%2fbA"}),
        ("/.well-known/jwks.json", "/.well-known/jwks.json", {}),
        ("/v1/roles", "/%76%31/roles", {}),  # an encoded literal is the same literal
    ],
)
def test_template_matches(template: str, path: str, values: dict[str, str]) -> None:
    assert parse(template).match(parts(path)) == values


@pytest.mark.parametrize(
    ("template", "path"),
    [
        ("/v1/roles/{name}", "/v1/roles"),
        ("/v1/roles/{name}", "/v1/roles/a/b"),
        ("/v1/roles/{name}", "/v1/roles/"),
        ("/v1/{name=shelves/*}", "/v1/boxes/s1"),
        ("/v1/{name=shelves/*}", "/v1/shelves"),
        ("/v1/files/{path=**}", "/v1/files"),
        ("/v1/files/{path=**}", "/v1/files/a//b"),
        ("/v1/roles", "/v1/Roles"),
    ],
)
def test_template_rejects(template: str, path: str) -> None:
    assert parse(template).match(parts(path)) is None


def test_template_parts() -> None:
    t = parse("/v1/{name=projects/*/things/*}:frob")
    assert t.verb == "frob"
    assert [v.dotted for v in t.variables] == ["name"]
    assert t.variables[0].regex == "^projects/[^/]+/things/[^/]+$"
    assert t.literal_count == 3


def test_invalid_utf8_names_the_variable() -> None:
    with pytest.raises(PathDecodeError) as info:
        parse("/v1/roles/{role.name}").match(parts("/v1/roles/%C3%28"))
    assert info.value.field == "role.name"


@pytest.mark.parametrize(
    "bad",
    [
        "v1/roles",
        "/v1/{name",
        "/v1/name}",
        "/v1/{a{b}}",
        "/v1//x",
        "/v1/{name=**}/x",
        "/v1/**/x",
        "/v1/{1x}",
        "/v1/{a}/{a}",
        "/v1/x{a}",
        "/v1/a b",
        "/v1/x:bad verb",
    ],
)
def test_bad_templates_are_rejected(bad: str) -> None:
    with pytest.raises(TemplateError):
        parse(bad)


def test_every_mesh_rpc_has_a_binding() -> None:
    bindings = mesh_bindings()
    methods = {b.method.full_name for b in bindings}
    services = {b.service for b in bindings}
    every = {m.full_name for s in services for m in s.methods}
    assert methods == every
    assert len(services) == 9
    assert {b.backend for b in bindings} == {
        "auth-service",
        "memory-hub",
        "event-bus",
        "policy-audit",
        "infra-manager",
        "autoops",
        "iaops",
        "machine-ops",
    }


def test_backend_comes_from_the_proto_package() -> None:
    bindings = {b.operation_id: b for b in mesh_bindings()}
    assert bindings["AuditService_AppendEntry"].backend == "policy-audit"
    assert bindings["MachineOpsService_AgentSession"].backend == "machine-ops"
    with pytest.raises(RuleError, match="no mesh service"):
        backend_of(_service([("Get", "get", "/v1/x", "")]))


def _service(rpcs: list[tuple[str, str, str, str]]) -> descriptor.ServiceDescriptor:
    """acme.v1.XService in a pool of its own, with (name, verb, path, body) rules."""
    pool = descriptor_pool.DescriptorPool()
    for dep in (
        "google/protobuf/descriptor.proto",
        "google/api/http.proto",
        "google/api/annotations.proto",
    ):
        f = descriptor_pb2.FileDescriptorProto()
        descriptor_pool.Default().FindFileByName(dep).CopyToProto(f)
        pool.Add(f)
    fdp = descriptor_pb2.FileDescriptorProto(name="acme/v1/x.proto", package="acme.v1")
    fdp.syntax = "proto3"
    fdp.dependency.append("google/api/annotations.proto")
    msg = fdp.message_type.add(name="Req")
    msg.field.add(name="name", number=1, type=9, label=1, json_name="name")
    msg.field.add(name="tags", number=2, type=9, label=3, json_name="tags")
    svc = fdp.service.add(name="XService")
    for method, verb, path, body in rpcs:
        m = svc.method.add(name=method, input_type=".acme.v1.Req", output_type=".acme.v1.Req")
        rule = http_pb2.HttpRule(body=body)
        setattr(rule, verb, path)
        m.options.Extensions[annotations_pb2.http].CopyFrom(rule)
    pool.Add(fdp)
    return pool.FindServiceByName("acme.v1.XService")


@pytest.mark.parametrize(
    ("rpcs", "words"),
    [
        ([("Get", "get", "/v1/{nope}", "")], "no field 'nope'"),
        ([("Get", "get", "/v1/{tags}", "")], "repeated"),
        ([("Get", "get", "/v1/{name.x}", "")], "scalar"),
        ([("Get", "post", "/v1/x", "nope")], "body field"),
        ([("Get", "get", "/v1/x", "*")], "GET cannot carry a body"),
        ([("Get", "get", "/v1/{", "")], "unbalanced"),
        ([("Get", "get", "/v1/{name}", ""), ("Other", "get", "/v1/{name}", "")], "both bind"),
    ],
)
def test_bad_rules_stop_the_gateway_naming_the_rpc(
    rpcs: list[tuple[str, str, str, str]], words: str
) -> None:
    with pytest.raises(RuleError, match=words) as info:
        mesh_bindings([_service(rpcs)], backend=lambda s: "x")
    assert "acme.v1.XService." in str(info.value)


# -- the router ----------------------------------------------------------------


@pytest.fixture(scope="module")
def router() -> Router:
    return Router(mesh_bindings())


@pytest.mark.parametrize(
    ("method", "path", "operation", "values"),
    [
        ("GET", "/v1/roles", "AuthService_ListRoles", {}),
        ("POST", "/v1/roles", "AuthService_CreateRole", {}),
        ("GET", "/v1/roles/admin", "AuthService_GetRole", {"name": "admin"}),
        ("PATCH", "/v1/roles/admin", "AuthService_UpdateRole", {"role.name": "admin"}),
        ("POST", "/v1/auth/token", "AuthService_IssueToken", {}),
        ("POST", "/v1/auth/token:verify", "AuthService_VerifyToken", {}),
        ("POST", "/v1/auth:checkPermission", "AuthService_CheckPermission", {}),
        ("POST", "/v1/autoops/slos/s1:recordSli", "AutoOpsService_RecordSli", {"slo": "slos/s1"}),
        (
            "GET",
            "/v1/autoops/slos/s1/errorBudget",
            "AutoOpsService_GetErrorBudget",
            {"slo": "slos/s1"},
        ),
        # Without the verb, a colon is part of the name.
        ("GET", "/v1/autoops/slos/a:b", "AutoOpsService_GetSlo", {"name": "slos/a:b"}),
        ("GET", "/.well-known/openid-configuration", "AuthService_GetOpenIdConfiguration", {}),
        (
            "POST",
            "/v1/events/topics/t/groups/g:subscribe",
            "EventBusService_Subscribe",
            {"topic": "t", "group": "g"},
        ),
    ],
)
def test_router_finds_the_binding(
    router: Router, method: str, path: str, operation: str, values: dict[str, str]
) -> None:
    match = router.match(method, path)
    assert match.binding.operation_id == operation
    assert match.values == values


def test_router_not_found_and_not_allowed(router: Router) -> None:
    with pytest.raises(NoRoute):
        router.match("GET", "/v1/nothing/here")
    with pytest.raises(NoRoute):
        router.match("GET", "relative")
    with pytest.raises(MethodNotAllowed) as info:
        router.match("PUT", "/v1/roles/admin")
    assert info.value.allowed == ["DELETE", "GET", "PATCH"]
    assert router.allowed("/v1/roles") == ["GET", "POST"]
    assert router.allowed("/nothing") == []
