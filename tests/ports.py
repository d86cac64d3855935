"""Ports for the servers a test starts (private RabbitMQ node, metrics endpoints).

A port taken with ``bind(("127.0.0.1", 0))`` lies in the kernel's ephemeral range, where any
outgoing connection on the machine may take it as its *local* port while our server is
stopped — and a client reconnecting to a stopped server on loopback can even connect to
itself (TCP simultaneous open). Either way the server cannot listen there again
(``eaddrinuse`` on ``rabbitmqctl start_app``). So we pick ports below the ephemeral range.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(part) for part in _RANGE_FILE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports, free now and outside the ephemeral range."""
    low, high = _ephemeral_range()
    candidates = [p for p in range(10000, 65536) if not low <= p <= high]
    random.shuffle(candidates)
    ports: list[int] = []
    for port in candidates:
        if _bindable(port):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise AssertionError(f"no {count} free ports outside the ephemeral range {low}-{high}")


def free_port() -> int:
    return free_ports(1)[0]
