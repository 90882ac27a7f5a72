"""The auth tests' shared fixtures: a secure mesh and a real local OIDC issuer."""

from tests.integration.auth.test_auth_service import mesh, oidc

__all__ = ["mesh", "oidc"]
