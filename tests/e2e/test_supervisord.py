"""The shipped docker/supervisord.conf, for real: supervisord runs two workers and one
deferred manager against the local PostgreSQL and RabbitMQ; jobs are enqueued, workers are
restarted mid-run, everything is stopped, and no job is lost or run twice."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from tests import ledger
from tests.conftest import (
    REPO_ROOT,
    job_count,
    worker_env,
)
from tests.jobs import Record, Sleepy
from tomqueue import enqueue
from tomqueue.config import Config

CONF = REPO_ROOT / "docker" / "supervisord.conf"


def _bin(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is not installed (pip install supervisor): the test needs it"
    return found


class Supervisor:
    def __init__(self, config: Config, log_dir: Path) -> None:
        self.env = worker_env(
            config,
            TOMQUEUE_IMPORT="tests.jobs",
            TOMQUEUE_WORKERS="2",
            TOMQUEUE_LOG_DIR=str(log_dir),
        )
        # the programs run `tomqueue` from PATH: this interpreter's, activated or not
        bin_dir = str(Path(sys.executable).parent)
        self.env["PATH"] = os.pathsep.join([bin_dir, self.env.get("PATH", "")])
        self.log_dir = log_dir
        self.proc = subprocess.Popen(
            [_bin("supervisord"), "-c", str(CONF)],
            cwd=REPO_ROOT,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def ctl(self, *args: str) -> str:
        done = subprocess.run(
            [_bin("supervisorctl"), "-c", str(CONF), *args],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return done.stdout + done.stderr

    def log(self) -> str:
        path = self.log_dir / "supervisord.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def running(self) -> bool:
        status = self.ctl("status")
        lines = [ln for ln in status.splitlines() if ln.startswith(("worker", "deferred"))]
        return len(lines) == 3 and all("RUNNING" in ln for ln in lines)

    def shutdown(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def test_supervisord_runs_restarts_and_stops_without_losing_jobs(
    pg_amqp: Config, tmp_path: Path, ledger_path: str
) -> None:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    sup = Supervisor(pg_amqp, log_dir)
    try:
        ledger.wait_for(sup.running, 60, 0.5, "workers and deferred manager RUNNING")
        markers = [f"r{i}" for i in range(300)]
        for i, marker in enumerate(markers[:150]):
            enqueue(Record(ledger_path, marker), priority=i % 3 - 1)
        for marker in markers[150:200]:
            enqueue(Record(ledger_path, marker), run_at=timedelta(seconds=3))
        slow = [f"s{i}" for i in range(4)]
        for marker in slow:
            enqueue(Sleepy(ledger_path, marker, 1.5))
        ledger.wait_for(
            lambda: len(ledger.counts(ledger_path, "start")) >= 2, 30, 0.1, "slow jobs to start"
        )
        restarted = sup.ctl("restart", "worker:*")
        assert "worker:worker_00: started" in restarted, restarted
        ledger.wait_for(sup.running, 60, 0.5, "processes RUNNING again after restart")
        for marker in markers[200:]:
            enqueue(Record(ledger_path, marker))
        sup.ctl("restart", "deferred")
        expected = set(markers) | set(slow)
        ledger.wait_for(
            lambda: set(ledger.counts(ledger_path)) >= expected, 90, 0.2, "every job to run"
        )
        stopped = sup.ctl("stop", "all")
        counts = ledger.counts(ledger_path)
        assert {m: n for m, n in counts.items() if n != 1} == {}, "a job ran twice"
        assert job_count(pg_amqp) == 0
    finally:
        sup.shutdown()
    log = sup.log()
    exits = re.findall(r"(?:stopped|exited): (\S+) \((.*?)\)", log)
    assert exits, f"no exits in supervisord.log:\n{log[-3000:]}"
    unclean = [
        (name, how) for name, how in exits if name != "migrate" and "exit status 0" not in how
    ]
    assert unclean == [], f"processes did not exit cleanly: {unclean}\n{stopped}"
    assert "SIGKILL" not in log
