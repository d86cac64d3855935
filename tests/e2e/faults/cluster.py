"""Real ``tomqueue worker`` / ``tomqueue deferred`` processes for fault tests, with short
timings, and the end-of-scenario checks.

Every process runs in its own session (process group), is stopped by its PID, and logs to a
file under the test's tmp_path. ``kill9`` records when a process was certainly dead: the
ledger check uses it as the latest end of the runs that process never finished.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import select

from tests.conftest import REPO_ROOT, all_queue_names, queue_depth, wait_until, worker_env
from tomqueue.config import Config
from tomqueue.db import get_engine
from tomqueue.schema import Job, jobs

# Short timings for every subprocess (Config.from_env): a dead worker's lease expires in
# 3 s, the sweeper looks every second for jobs not notified for 2 s.
FAST: dict[str, str] = {
    "TOMQUEUE_HEARTBEAT_INTERVAL": "0.5",
    "TOMQUEUE_LEASE_TIMEOUT": "3",
    "TOMQUEUE_SWEEP_INTERVAL": "1",
    "TOMQUEUE_SWEEP_QUIET": "2",
    "TOMQUEUE_STOP_GRACE": "2",
    "TOMQUEUE_TIMEOUT_GRACE": "1",
    "TOMQUEUE_DEFERRED_STATS_INTERVAL": "1",
}
LEASE = float(FAST["TOMQUEUE_LEASE_TIMEOUT"])
SWEEP = float(FAST["TOMQUEUE_SWEEP_INTERVAL"]) + float(FAST["TOMQUEUE_SWEEP_QUIET"])
JOBS_MODULE = "tests.fault_jobs"


class Proc:
    """A subprocess in its own session, its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log_path = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, *argv],
                cwd=REPO_ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.died_at: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 30.0, count: int = 1) -> None:
        def seen() -> bool:
            assert self.alive(), (
                f"{self.name} exited with {self.proc.returncode}:\n" + (self.log()[-3000:])
            )
            return self.log().count(text) >= count

        wait_until(seen, timeout, f"{text!r} (x{count}) in {self.log_path.name}", interval=0.05)

    def children(self) -> list[int]:
        with contextlib.suppress(psutil.Error):
            return [c.pid for c in psutil.Process(self.pid).children()]
        return []

    def signal(self, signum: int) -> None:
        if self.alive():
            self.proc.send_signal(signum)

    def kill9(self) -> float:
        """SIGKILL the process group; returns the time by which it was certainly dead."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.died_at = time.time()
        return self.died_at

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise AssertionError(
                f"{self.name} (pid {self.pid}) did not exit within {timeout:g}s:\n"
                + self.log()[-3000:]
            ) from None
        self.died_at = self.died_at or time.time()
        return code

    def stop(self, timeout: float = 15.0) -> int | None:
        """TERM, bounded wait, then KILL (teardown)."""
        if not self.alive():
            return self.proc.returncode
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            return None


class Cluster:
    """The processes of one scenario; ``close()`` stops whatever is left."""

    def __init__(self, config: Config, tmp_path: Path, **env: str) -> None:
        self.config = config
        self.tmp_path = tmp_path
        self.extra_env = env
        self.procs: list[Proc] = []

    def env(self, config: Config | None = None, **extra: str) -> dict[str, str]:
        env = worker_env(config or self.config)
        env.update(FAST)
        env.update(self.extra_env)
        env.update(extra)
        return env

    def process(self, kind: str, argv: Sequence[str], env: dict[str, str]) -> Proc:
        name = f"{kind}{len(self.procs)}"
        proc = Proc(name, argv, env, self.tmp_path / f"{name}.log")
        self.procs.append(proc)
        return proc

    def worker(
        self,
        *args: str,
        config: Config | None = None,
        wait: bool = True,
        env: dict[str, str] | None = None,
    ) -> Proc:
        argv = ["-m", "tomqueue", "worker", "--import", JOBS_MODULE, *args]
        proc = self.process("worker", argv, self.env(config, **(env or {})))
        if wait:
            processes = int(args[args.index("-n") + 1]) if "-n" in args else 1
            proc.wait_log("consuming", timeout=30, count=processes)
        return proc

    def workers(self, count: int, *args: str, **kwargs: object) -> list[Proc]:
        """Start ``count`` workers at once, then wait for each to consume."""
        procs = [self.worker(*args, wait=False, **kwargs) for _ in range(count)]  # type: ignore[arg-type]
        for proc in procs:
            proc.wait_log("consuming", timeout=30)
        return procs

    def deferred(self, wait: bool = True, config: Config | None = None) -> Proc:
        proc = self.process("deferred", ["-m", "tomqueue", "deferred"], self.env(config))
        if wait:
            proc.wait_log("holding the deliveries of", timeout=30)
        return proc

    @property
    def deaths(self) -> dict[int, float]:
        return {p.pid: p.died_at for p in self.procs if p.died_at is not None}

    def logs(self, tail: int = 2500) -> str:
        return "\n".join(f"--- {p.name} (pid {p.pid}) ---\n{p.log()[-tail:]}" for p in self.procs)

    def close(self) -> None:
        for proc in self.procs:
            if proc.alive():
                proc.signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill9()
            for child in proc.children():  # -n children whose parent was killed
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)


# --- the end of a scenario ----------------------------------------------------------------------


def rows(config: Config) -> list[Any]:
    with get_engine(config).connect() as conn:
        return list(conn.execute(select(jobs).order_by(Job.id)).all())


def row(config: Config, job_id: int):  # type: ignore[no-untyped-def]
    with get_engine(config).connect() as conn:
        return conn.execute(select(jobs).where(Job.id == job_id)).first()


def describe(r) -> str:  # type: ignore[no-untyped-def]
    return (
        f"job {r.id}: attempts={r.attempts} crashes={r.crashes} locked_by={r.locked_by!r} "
        f"locked_at={r.locked_at} failed_at={r.failed_at} run_at={r.run_at} "
        f"notified_at={r.notified_at} version={r.version} last_error={(r.last_error or '')[:200]!r}"
    )


def assert_settled(
    config: Config,
    failed: Sequence[int] = (),
    timeout: float = 15.0,
    queues: bool = True,
) -> None:
    """Nothing left behind: ``delayed_jobs`` holds only the expected failed rows (unlocked),
    and no work queue holds a message."""
    expected = set(failed)

    def settled() -> bool:
        left = rows(config)
        return {r.id for r in left} == expected and all(r.locked_at is None for r in left)

    try:
        wait_until(settled, timeout, "delayed_jobs to hold only the expected failed rows", 0.1)
    except AssertionError:
        left = rows(config)
        raise AssertionError(
            f"left behind in delayed_jobs (expected only failed {sorted(expected)}):\n  "
            + "\n  ".join(describe(r) for r in left[:20])
        ) from None
    for r in rows(config):
        assert r.failed_at is not None, describe(r)
    if queues and config.amqp_url:
        for name in all_queue_names(config):
            wait_until(lambda n=name: queue_depth(config, n)[0] == 0, 10, f"{name} to drain")
