"""services.pyi is generated from the descriptors and must match them."""

from __future__ import annotations

from autoecoops.sdk import _stubgen, catalog
from autoecoops.sdk.client import Client


def test_the_typing_stub_is_up_to_date() -> None:
    # Stale after a proto change: run `python -m autoecoops.sdk._stubgen`.
    assert _stubgen.main(["--check"]) == 0


def test_every_rpc_has_a_method_named_in_snake_case() -> None:
    client = Client("127.0.0.1:1")
    try:
        for attr, svc in catalog.all_services():
            sub = getattr(client, attr)
            assert type(sub).__name__ == catalog.class_name(svc, False)
            for method in svc.methods:
                bound = getattr(sub, catalog.snake(method.name))
                assert bound.info.full_name == method.full_name
    finally:
        client.close()


def test_snake_case_names() -> None:
    assert catalog.snake("GetOpenIdConfiguration") == "get_open_id_configuration"
    assert catalog.snake("ScanSBOM") == "scan_sbom"
    assert catalog.snake("GetJwks") == "get_jwks"
    assert catalog.snake("ListDeadLetters") == "list_dead_letters"
