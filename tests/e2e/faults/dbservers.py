"""Private database servers for fault tests: a PostgreSQL cluster and a MariaDB server of
the test's own (temporary data directory, private port below the ephemeral range, unix
socket in that directory), so a test can restart or crash a whole server without
touching the shared ones.

Both are started as children of the test process (so they are stopped and reaped by PID;
nothing is left to an init that may not reap), every wait is bounded, and ``close()``
removes the data directory. Crash-safety is kept for process crashes only (``fsync=off``,
``innodb_flush_log_at_trx_commit=2``): a server killed with -9 loses nothing committed,
since the kernel still has the pages.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from tests.ports import free_port

PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), default=Path("/nonexistent"))


def _wait(
    ready: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready after {timeout:g}s:\n{_tail(log)}")
        time.sleep(0.05)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"


def _accepts(url: str) -> bool:
    engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 2})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
    finally:
        engine.dispose()


class Server:
    """Start/stop of one server process; subclasses say how to run it."""

    name = "server"
    database = "tq"
    stop_signal = signal.SIGTERM  # a clean stop that does not wait for clients

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix=f"tq-{self.name}-"))
        self.port = free_port()
        self.log = self.base / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def as_user(self) -> dict[str, Any]:
        """Popen arguments that run a tool as the server's OS user (root: none)."""
        return {}

    def run_tool(self, argv: list[str], timeout: float = 60) -> None:
        """Run one of the server's tools as its OS user; fail with its output."""
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, **self.as_user()
        )
        if result.returncode != 0:
            output = result.stdout[-1500:] + result.stderr[-1500:]
            raise AssertionError(f"{' '.join(argv[:2])} failed: {output}")

    def initialize(self, argv: list[str]) -> None:
        """Create the data directory with ``argv``; nothing is left behind if it fails."""
        try:
            self.run_tool(argv, timeout=120)
        except BaseException:
            shutil.rmtree(self.base, ignore_errors=True)
            raise

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60) -> float:
        """Start on the same data directory and port; returns the seconds it took."""
        assert not self.alive(), f"{self.name} is already running"
        started = time.monotonic()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self.as_user(),
            )
        _wait(lambda: _accepts(self.admin_url), timeout, self.name, self.proc, self.log)
        return time.monotonic() - started

    def wait_exit(self, timeout: float = 30) -> None:
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} (pid {self.pid}) still running after {timeout:g}s"
            ) from None

    def kill9(self) -> None:
        """SIGKILL the server (and whatever it forked), and reap it."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(30)

    def close(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill9()
        if self.proc is not None:  # children of a killed postmaster, if any
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)

    @property
    def admin_url(self) -> str:
        raise NotImplementedError

    def url(self) -> str:
        raise NotImplementedError

    def create_database(self) -> None:
        engine = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(f"CREATE DATABASE {self.database}"))
        finally:
            engine.dispose()


class PrivatePostgres(Server):
    """``initdb`` into a temporary directory as the ``postgres`` OS user (PostgreSQL refuses
    root), then ``postgres -D`` on a private port, trust authentication."""

    name = "postgres"
    stop_signal = signal.SIGINT  # fast shutdown (SIGTERM would wait for every client)

    def __init__(self) -> None:
        for tool in ("initdb", "postgres", "pg_ctl"):
            assert (PG_BIN / tool).exists(), f"{PG_BIN / tool} is required"
        super().__init__()
        shutil.chown(self.base, "postgres", "postgres")
        self.data = self.base / "data"
        self.initialize(
            [
                str(PG_BIN / "initdb"),
                f"--pgdata={self.data}",
                "--username=postgres",
                "--auth=trust",
                "--no-sync",
                "--encoding=UTF8",
                "--locale=C",
            ]
        )

    def as_user(self) -> dict[str, Any]:
        return {"user": "postgres", "group": "postgres", "extra_groups": [], "cwd": self.base}

    def argv(self) -> list[str]:
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.base),
            "fsync": "off",
            "full_page_writes": "off",
            "shared_buffers": "32MB",
            "max_connections": "200",
        }
        args = [str(PG_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        return args

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{self.database}"

    def stop(self, mode: str, timeout: float = 60) -> None:
        """``pg_ctl stop -m fast|immediate`` (immediate: no shutdown checkpoint, crash
        recovery at the next start); ``start()`` starts it again."""
        self.run_tool(
            [str(PG_BIN / "pg_ctl"), "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "30"],
            timeout=timeout,
        )
        self.wait_exit(timeout)


class PrivateMariaDB(Server):
    """``mariadb-install-db`` into a temporary directory, then ``mariadbd`` as root on a
    private port with ``--skip-grant-tables`` (root, no password, from anywhere)."""

    name = "mariadb"

    def __init__(self) -> None:
        for tool in ("/usr/bin/mariadb-install-db", "/usr/sbin/mariadbd", "/usr/bin/mariadb-admin"):
            assert Path(tool).exists(), f"{tool} is required"
        super().__init__()
        self.data = self.base / "data"
        self.socket = self.base / "mariadb.sock"
        self.initialize(
            [
                "mariadb-install-db",
                "--no-defaults",
                f"--datadir={self.data}",
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ]
        )

    def argv(self) -> list[str]:
        return [
            "/usr/sbin/mariadbd",
            "--no-defaults",
            f"--datadir={self.data}",
            f"--port={self.port}",
            "--bind-address=127.0.0.1",
            f"--socket={self.socket}",
            f"--pid-file={self.base / 'mariadb.pid'}",
            "--user=root",
            "--skip-grant-tables",
            "--skip-name-resolve",
            "--skip-log-bin",
            "--innodb-buffer-pool-size=64M",
            "--innodb-flush-log-at-trx-commit=2",
            "--max-connections=300",
            "--character-set-server=utf8mb4",
            f"--log-error={self.log}",
        ]

    @property
    def admin_url(self) -> str:
        return f"mysql+pymysql://root@127.0.0.1:{self.port}/mysql"

    def url(self) -> str:
        return f"mysql+pymysql://root@127.0.0.1:{self.port}/{self.database}"

    def shutdown(self, timeout: float = 60) -> None:
        """``mariadb-admin shutdown`` (a clean stop; the process exits when it is done)."""
        self.run_tool(
            ["mariadb-admin", "--no-defaults", f"--socket={self.socket}", "-u", "root", "shutdown"],
            timeout=timeout,
        )
        self.wait_exit(timeout)
