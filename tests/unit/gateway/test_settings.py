"""AUTOECOOPS_GATEWAY_* variables: defaults, parsing, and one-line errors."""

from __future__ import annotations

import pytest

from autoecoops.gateway.settings import GatewaySettings
from autoecoops.kernel.mesh.errors import ConfigError


def test_defaults() -> None:
    s = GatewaySettings.from_env({})
    assert s == GatewaySettings()
    assert s.port == 8080
    assert s.max_body_bytes == 4 * 1024 * 1024
    assert s.cors_origins == ()


def test_values_are_read() -> None:
    s = GatewaySettings.from_env(
        {
            "AUTOECOOPS_GATEWAY_PORT": "9090",
            "AUTOECOOPS_GATEWAY_MAX_BODY_BYTES": "1024",
            "AUTOECOOPS_GATEWAY_CORS_ORIGINS": "https://a.example, http://localhost:3000/",
            "AUTOECOOPS_GATEWAY_CORS_ALLOW_CREDENTIALS": "true",
            "AUTOECOOPS_GATEWAY_TIMEOUT_SECONDS": "5",
            "AUTOECOOPS_GATEWAY_OPENAPI_FILE": "/srv/openapi.json",
        }
    )
    assert s.port == 9090
    assert s.max_body_bytes == 1024
    assert s.cors_origins == ("https://a.example", "http://localhost:3000")
    assert s.cors_allow_credentials is True
    assert s.default_timeout == 5.0
    assert s.openapi_file == "/srv/openapi.json"
    assert GatewaySettings.from_env({"AUTOECOOPS_GATEWAY_PORT": "0"}).port == 0


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"AUTOECOOPS_GATEWAY_PORT": "http"}, "AUTOECOOPS_GATEWAY_PORT"),
        ({"AUTOECOOPS_GATEWAY_PORT": "70000"}, "AUTOECOOPS_GATEWAY_PORT"),
        ({"AUTOECOOPS_GATEWAY_MAX_BODY_BYTES": "0"}, "AUTOECOOPS_GATEWAY_MAX_BODY_BYTES"),
        ({"AUTOECOOPS_GATEWAY_CORS_ORIGINS": "a.example"}, "AUTOECOOPS_GATEWAY_CORS_ORIGINS"),
        (
            {"AUTOECOOPS_GATEWAY_CORS_ORIGINS": "https://a.example/path"},
            "AUTOECOOPS_GATEWAY_CORS_ORIGINS",
        ),
        (
            {
                "AUTOECOOPS_GATEWAY_CORS_ORIGINS": "*",
                "AUTOECOOPS_GATEWAY_CORS_ALLOW_CREDENTIALS": "1",
            },
            "AUTOECOOPS_GATEWAY_CORS_ALLOW_CREDENTIALS",
        ),
        ({"AUTOECOOPS_GATEWAY_TIMEOUT_SECONDS": "-1"}, "AUTOECOOPS_GATEWAY_TIMEOUT_SECONDS"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        GatewaySettings.from_env(env)
