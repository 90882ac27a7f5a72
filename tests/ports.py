"""Free TCP ports for the servers tests start, chosen where no client socket can take them.

A port the kernel hands out for ``bind(("127.0.0.1", 0))`` comes from the
ephemeral range, the same range it gives outgoing connections: between the
moment a test picks such a port and the moment its server binds it, any of
the suite's hundreds of client sockets (a Redis Cluster client holds several
per node) may take it, and the server fails with "address in use". Ports
below that range are never handed to client sockets, so they are picked
there and checked free by a bind. Two more races are closed: each xdist
worker picks from its own slice of the range (another worker's port, picked
but not bound yet, still looks free), and a process never hands out the same
port twice within ``REUSE_AFTER`` seconds (a mesh picks all its ports before
it binds the first, after seconds of loading a model).
"""

from __future__ import annotations

import os
import random
import re
import socket
import time
from pathlib import Path

_PICK = random.SystemRandom()  # not the seeded module generator: workers must differ
#: The lowest port picked: above the well-known and registered services of a dev machine.
LOWEST = 15000
#: Seconds before a port this process handed out may be handed out again.
REUSE_AFTER = 60.0
_handed: dict[int, float] = {}


def _slice(low: int, top: int) -> tuple[int, int]:
    """This xdist worker's part of ``[low, top)`` (all of it outside xdist)."""
    worker = re.fullmatch(r"gw(\d+)", os.environ.get("PYTEST_XDIST_WORKER", ""))
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if worker is None or count <= 1:
        return low, top
    span = (top - low) // count
    at = low + int(worker.group(1)) % count * span
    return at, at + span


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports nobody listens on now, outside the ephemeral range."""
    top = _ephemeral_low()
    ports: list[int] = []
    if top - LOWEST >= 1000:
        low, high = _slice(LOWEST, top)
        now = time.monotonic()
        for _ in range(100 * n):
            port = _PICK.randrange(low, high)
            if port in ports or now - _handed.get(port, -REUSE_AFTER) < REUSE_AFTER:
                continue
            if _bindable(port):
                ports.append(port)
                if len(ports) == n:
                    _handed.update(dict.fromkeys(ports, now))
                    return ports
    # An ephemeral range that starts low: let the kernel choose.
    socks = []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(int(s.getsockname()[1]))
        return ports
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """A TCP port nobody listens on now, outside the ephemeral range."""
    return free_ports(1)[0]
