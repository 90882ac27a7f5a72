"""Free TCP ports for the servers tests start, chosen where no client socket can take them.

A port the kernel hands out for ``bind(("127.0.0.1", 0))`` comes from the
ephemeral range, the same range it gives outgoing connections: between the
moment a test picks such a port and the moment its server binds it, any of
the suite's hundreds of client sockets (a Redis Cluster client holds several
per node) may take it, and the server fails with "address in use". Ports
below that range are never handed to client sockets, so they are picked
there, at random (other xdist workers pick too) and checked free by a bind.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_PICK = random.SystemRandom()  # not the seeded module generator: workers must differ
#: The lowest port picked: above the well-known and registered services of a dev machine.
LOWEST = 15000


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
        for _ in range(100 * n):
            port = _PICK.randrange(LOWEST, top)
            if port not in ports and _bindable(port):
                ports.append(port)
                if len(ports) == n:
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
