"""Broker control for fault tests.

- ``close_connections(pids)``: close the connections that *our* processes opened on a
  broker, found by their ``connection_name`` (``tomqueue-<role> <host> pid:<pid>``), so
  other people's connections on the shared broker are never touched.
- ``PrivateBroker``: a RabbitMQ node of the test's own (private ports, data directory,
  cookie, config), for faults that hit a whole node: ``close_all_connections``,
  ``stop_app`` / ``start_app``. Started and stopped by PID; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import pika

from tests.ports import free_ports

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")  # the scripts themselves, not Debian's su wrappers
_NAME = re.compile(r'\{"connection_name","tomqueue-(?P<role>[a-z]+) \S+ pid:(?P<pid>\d+)"\}')


def _ctl(args: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> str:
    # the shared node: Debian's wrapper (it runs as the rabbitmq user, with its cookie);
    # a private node: the script itself, with the node's own environment
    tool = "rabbitmqctl" if env is None else str(RABBIT_BIN / "rabbitmqctl")
    result = subprocess.run(
        [tool, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr[-2000:]}")
    return result.stdout


def list_connections(
    node_args: list[str], env: dict[str, str] | None = None
) -> list[tuple[str, str, int]]:
    """[(connection pid, role, os pid)] of the tomqueue connections on a node."""
    out = _ctl([*node_args, "-q", "list_connections", "pid", "client_properties"], env)
    found: list[tuple[str, str, int]] = []
    for line in out.splitlines():
        match = _NAME.search(line)
        if match and line.startswith("<"):
            found.append((line.split("\t", 1)[0], match["role"], int(match["pid"])))
    return found


def close_connections(
    pids: Iterable[int],
    roles: Iterable[str] = ("worker",),
    node_args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> int:
    """Close the connections of these OS processes (and roles); returns how many."""
    pids, roles = set(pids), set(roles)
    closed = 0
    for conn_pid, role, os_pid in list_connections(node_args or [], env):
        if os_pid in pids and role in roles:
            with contextlib.suppress(AssertionError):  # closed meanwhile
                _ctl([*(node_args or []), "close_connection", conn_pid, "test"], env)
                closed += 1
    return closed


class PrivateBroker:
    """A RabbitMQ node of the test's own, on private ports, with default settings."""

    def __init__(self, base: Path, advanced: str = "[].\n", name: str = "tqfaults") -> None:
        """``advanced``: the node's advanced.config (e.g. a short consumer_timeout)."""
        for tool in ("rabbitmq-server", "rabbitmqctl"):
            assert (RABBIT_BIN / tool).exists(), f"{RABBIT_BIN / tool} is required"
        self.base = base
        self.port, dist, self.epmd = free_ports(3)
        self.node = f"{name}{uuid.uuid4().hex[:8]}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        (base / "home").mkdir(parents=True)
        (base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        (base / "advanced.config").write_text(advanced)
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq-env.conf").write_text("")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
            "HOME": str(base / "home"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(dist),
            "ERL_EPMD_PORT": str(self.epmd),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 90) -> None:
        with open(self.base / "server.out", "wb") as out:
            self.proc = subprocess.Popen(
                [str(RABBIT_BIN / "rabbitmq-server")],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_accepting(timeout)

    def accepts(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, (
            self.base / "server.out"
        ).read_text(errors="replace")[-3000:]
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            pika.BlockingConnection(pika.URLParameters(self.url)).close()
            return True
        except (OSError, pika.exceptions.AMQPError):
            return False

    def wait_accepting(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.accepts():
            if time.monotonic() > deadline:
                raise AssertionError(f"private RabbitMQ node not up after {timeout:g}s")
            time.sleep(0.1)

    def timeouts_logged(self) -> int:
        """How often the node closed a channel for an unacked delivery (consumer_timeout)."""
        text = "".join(p.read_text(errors="replace") for p in (self.base / "log").glob("*.log"))
        return text.count("timed out waiting for delivery acknowledgement")

    def ctl(self, *args: str, timeout: float = 60) -> str:
        return _ctl(["-n", self.node, *args], self.env, timeout)

    def close_connections(self, pids: Iterable[int], roles: Iterable[str] = ("worker",)) -> int:
        return close_connections(pids, roles, ["-n", self.node], self.env)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                self.ctl("stop", timeout=30)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        subprocess.run(["epmd", "-port", str(self.epmd), "-kill"], capture_output=True, timeout=30)
