"""The OpenAPI 3.1 document: built from the same bindings as the routes, valid,
and complete (operations, parameters, schemas, errors, security)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2
from openapi_spec_validator import validate

from autoecoops.gateway.openapi import build_document, comments_of, route_keys
from autoecoops.gateway.rules import Binding, mesh_bindings
from autoecoops.gateway.server import default_document_path, load_document
from autoecoops.gateway.settings import GatewaySettings
from autoecoops.kernel.mesh.errors import ConfigError

GENERATED = Path(__file__).resolve().parents[3] / "gen" / "openapi" / "openapi.json"


@pytest.fixture(scope="module")
def doc(
    kitchen_bindings: list[Binding], kitchen_file: descriptor_pb2.FileDescriptorProto
) -> dict[str, Any]:
    return build_document(kitchen_bindings, comments_of([kitchen_file]))


def schema(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = doc["components"]["schemas"][f"autoecoops.gatewaytest.v1.{name}"]
    return found


def test_the_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    validate(doc)
    assert doc["openapi"] == "3.1.0"


def test_the_generated_mesh_document_is_valid_and_matches_the_routes() -> None:
    generated = json.loads(GENERATED.read_text())
    validate(generated)
    assert route_keys(generated) == route_keys(build_document(mesh_bindings()))
    assert default_document_path() == GENERATED


def test_every_binding_is_an_operation_named_service_method(doc: dict[str, Any]) -> None:
    ops = {
        op["operationId"]: (path, verb)
        for path, v in doc["paths"].items()
        for verb, op in v.items()
    }
    assert ops["KitchenService_Echo"] == ("/v1/kitchens/{inner_id}", "get")
    # Additional bindings are numbered from 2, as grpc-gateway does.
    assert ops["KitchenService_Echo2"] == ("/v1/kitchens:echo", "post")
    assert ops["KitchenService_Echo3"] == ("/v1/kitchens/{name}/inner", "put")
    assert ops["KitchenService_Frobnicate"] == ("/v1/things/{name}:frobnicate", "post")
    # A multi-segment variable is spelled out, so generic clients need not send a raw '/'.
    assert ops["KitchenService_GetThing"] == ("/v1/rooms/{room}/things/{thing}", "get")
    assert ops["KitchenService_GetFile"] == ("/v1/files/{path}", "get")
    assert ops["Gateway_Health"] == ("/healthz", "get")
    echo = doc["paths"]["/v1/kitchens/{inner_id}"]["get"]
    assert echo["tags"] == ["KitchenService"]
    assert echo["summary"] == "Returns its request: the JSON mapping round trip."
    assert echo["x-grpc-method"] == "autoecoops.gatewaytest.v1.KitchenService.Echo"
    assert {"name": "KitchenService", "description": "Serves every shape of HTTP binding."} in doc[
        "tags"
    ]


def test_parameters(doc: dict[str, Any]) -> None:
    params = {p["name"]: p for p in doc["paths"]["/v1/kitchens/{inner_id}"]["get"]["parameters"]}
    assert params["inner_id"]["in"] == "path" and params["inner_id"]["required"] is True
    assert params["inner_id"]["description"].startswith("Sets `inner.id`.")
    # Every field the path does not bind is a query parameter, by JSON name.
    assert params["int64Value"]["schema"] == {
        "type": "string",
        "format": "int64",
        "pattern": "^-?[0-9]+$",
    }
    assert params["inner.count"]["in"] == "query"
    assert "inner.id" not in [p for p in params if params[p]["in"] == "query"]
    assert params["tags"]["schema"]["type"] == "array"
    assert params["tags"]["explode"] is True
    assert params["color"]["schema"] == {
        "$ref": "#/components/schemas/autoecoops.gatewaytest.v1.Color"
    }
    assert params["when"]["schema"]["format"] == "date-time"
    assert params["renamed"]["in"] == "query"
    assert params["name"]["description"] == "A name."
    # Maps, repeated messages and Struct cannot be query parameters.
    assert not {"counts", "byId", "inners", "extra", "anyValue"} & set(params)
    thing = {
        p["name"]: p for p in doc["paths"]["/v1/rooms/{room}/things/{thing}"]["get"]["parameters"]
    }
    assert thing["room"]["schema"]["pattern"] == "^[^/]+$"
    # body "*" leaves nothing for the query.
    assert "parameters" not in doc["paths"]["/v1/kitchens:echo"]["post"]


def test_request_bodies(doc: dict[str, Any]) -> None:
    echo2 = doc["paths"]["/v1/kitchens:echo"]["post"]["requestBody"]
    assert echo2["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/autoecoops.gatewaytest.v1.Kitchen"
    }
    assert echo2["required"] is False  # an empty body is all defaults
    inner = doc["paths"]["/v1/kitchens/{name}/inner"]["put"]["requestBody"]
    assert inner["content"]["application/json"]["schema"]["$ref"].endswith(".Inner")
    # Fields the path binds are not part of a body "*".
    frob = doc["paths"]["/v1/things/{name}:frobnicate"]["post"]["requestBody"]
    ref = frob["content"]["application/json"]["schema"]["$ref"].split("/")[-1]
    body = doc["components"]["schemas"][ref]
    assert set(body["properties"]) == {"times"}
    upload = doc["paths"]["/v1/uploads"]["post"]["requestBody"]
    assert list(upload["content"]) == ["application/x-ndjson"]


def test_schemas(doc: dict[str, Any]) -> None:
    k = schema(doc, "Kitchen")
    props = k["properties"]
    assert k["additionalProperties"] is False
    assert k["description"] == "Every kind of field."
    assert props["int32Value"]["maximum"] == 2**31 - 1
    assert props["uint64Value"]["pattern"] == "^[0-9]+$"
    assert props["bytesValue"]["contentEncoding"] == "base64"
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert props["inners"]["items"] == {
        "$ref": "#/components/schemas/autoecoops.gatewaytest.v1.Inner"
    }
    assert props["counts"] == {"type": "object", "additionalProperties": _INT32}
    assert props["byId"]["propertyNames"] == {"pattern": "^-?[0-9]+$"}
    assert props["when"]["format"] == "date-time"
    assert props["ttl"]["pattern"].endswith("s$")
    assert props["maybe"]["format"] == "int32"
    assert props["flag"] == {"type": "boolean"}
    assert props["extra"]["type"] == "object"
    assert "renamed" in props and "custom" not in props
    assert props["etag"]["readOnly"] is True
    assert props["etag"]["description"] == "Set by the server."
    # The oneof: never both.
    assert k["not"] == {"anyOf": [{"required": ["left", "right"]}]}
    assert props["left"] == {"type": "string"}
    color = schema(doc, "Color")
    assert color["enum"] == ["COLOR_UNSPECIFIED", "COLOR_RED", "COLOR_BLUE"]
    assert "- `COLOR_RED`: Red." in color["description"]


_INT32 = {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1}


def test_responses_errors_and_security(doc: dict[str, Any]) -> None:
    echo = doc["paths"]["/v1/kitchens/{inner_id}"]["get"]
    assert echo["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        ".Kitchen"
    )
    assert echo["security"] == []  # public
    assert "401" not in echo["responses"]
    for code in ("400", "404", "501", "503", "default"):
        assert echo["responses"][code]["$ref"].startswith("#/components/responses/")
    secret = doc["paths"]["/v1/secret"]["get"]
    assert secret["security"] == [{"bearer": []}]
    assert secret["responses"]["401"] == {"$ref": "#/components/responses/Unauthenticated"}
    assert "Permission: `kitchen.secret.get`." in secret["description"]
    unauth = doc["components"]["responses"]["Unauthenticated"]
    assert "WWW-Authenticate" in unauth["headers"]
    assert unauth["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/google.rpc.Status"
    }
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "An access token from auth-service (POST /v1/auth/token).",
    }
    status = doc["components"]["schemas"]["google.rpc.Status"]
    assert status["required"] == ["code", "message", "details"]
    # response_body: the body is the field's schema.
    get_file = doc["paths"]["/v1/files/{path}"]["get"]["responses"]["200"]
    assert get_file["content"]["application/json"]["schema"]["$ref"].endswith(".FileMeta")
    assert "413" in doc["paths"]["/v1/kitchens:echo"]["post"]["responses"]
    assert "413" not in echo["responses"]


def test_stream_responses(doc: dict[str, Any]) -> None:
    watch = doc["paths"]["/v1/watch/{topic}"]["get"]["responses"]["200"]["content"]
    assert set(watch) == {"application/x-ndjson", "text/event-stream"}
    item = watch["application/x-ndjson"]["schema"]
    assert item["properties"]["result"]["$ref"].endswith(".WatchEvent")
    assert item["properties"]["error"]["$ref"].endswith("google.rpc.Status")


def test_the_gateway_serves_the_generated_file_only_when_it_matches(
    tmp_path: Path, kitchen_bindings: list[Binding]
) -> None:
    mesh = mesh_bindings()
    served = load_document(GatewaySettings(openapi_file=str(GENERATED)), mesh)
    assert served == json.loads(GENERATED.read_text())  # with its descriptions
    # A file for other routes (stale) is not served: the live document is.
    served = load_document(GatewaySettings(openapi_file=str(GENERATED)), kitchen_bindings)
    assert route_keys(served) == route_keys(build_document(kitchen_bindings))
    with pytest.raises(ConfigError, match="OPENAPI_FILE"):
        load_document(GatewaySettings(openapi_file=str(tmp_path / "missing.json")), mesh)
