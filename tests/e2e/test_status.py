"""``tomqueue status`` as an operator runs it: the table, ``--json`` and ``--max-age``.

One database state covers every column: ready jobs at two levels (one of them waiting for
two minutes), a scheduled job, a failed job, and a job running on a registered worker. The
work queues hold the notifications nobody consumed, so the broker column has real depths.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import update

import tomqueue
from tests import ledger
from tests.conftest import (
    REPO_ROOT,
    WorkerThread,
    declare_topology,
    drain_queue,
    wait_until,
    worker_env,
)
from tests.jobs import Record, Sleepy
from tomqueue.config import Config
from tomqueue.db import db_now, get_engine
from tomqueue.schema import Job, WorkerRecord

FAST_LEASES = {"TOMQUEUE_HEARTBEAT_INTERVAL": "0.5", "TOMQUEUE_LEASE_TIMEOUT": "3"}


def status(config: Config, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tomqueue", "status", *args],
        cwd=REPO_ROOT,
        env=worker_env(config, **FAST_LEASES),
        capture_output=True,
        text=True,
        timeout=60,
    )


def current_jobs(config: Config) -> list[int]:
    with get_engine(config).connect() as conn:
        rows = conn.execute(WorkerRecord.__table__.select()).all()
    return [job for r in rows for job in json.loads(r.current_jobs or "[]")]


def test_status_table_json_and_max_age(pg_amqp: Config, ledger_path: str, tmp_path: Path) -> None:
    config = pg_amqp.replace(heartbeat_interval=0.5, lease_timeout=3.0, stop_grace=0.5)
    tomqueue.configure(config)
    declare_topology(config, (None, "mail"))
    tomqueue.enqueue(Record(ledger_path, "high"), priority=-1)
    old = tomqueue.enqueue(Record(ledger_path, "old"), priority=0)
    tomqueue.enqueue(Record(ledger_path, "new"), priority=0)
    failed = tomqueue.enqueue(Record(ledger_path, "failed"), priority=0)
    later = tomqueue.enqueue(Record(ledger_path, "later"), priority=1, run_at=timedelta(hours=1))
    lost = tomqueue.enqueue(Record(ledger_path, "lost"), priority=10, queue="mail")
    drain_queue(config, f"{config.prefix}.mail.bulk")  # its notification is lost
    with get_engine(config).begin() as conn:
        now = db_now(conn)
        conn.execute(
            update(Job).where(Job.id == old.id).values(run_at=now - timedelta(seconds=120))
        )
        conn.execute(update(Job).where(Job.id == failed.id).values(failed_at=now))
        conn.execute(
            update(Job)
            .where(Job.id == lost.id)
            .values(run_at=now - timedelta(seconds=90), notified_at=now - timedelta(seconds=75))
        )
    running = tomqueue.enqueue(Sleepy(ledger_path, "busy", 60), queue="mail")
    worker = WorkerThread(config, queues=["mail"], threads=1).start()
    manager = start_manager(config, tmp_path / "manager.log")
    try:
        wait_until(lambda: ledger.counts(ledger_path, "start")["busy"], 20, "the job to run")
        wait_until(lambda: current_jobs(config) == [running.id], 10, "the heartbeat")
        wait_until(lambda: [m["held"] for m in managers(config)] == [1], 20, "the manager")
        assert worker.worker.sweeper.sweep_once() == 1, "the job whose notification was lost"

        as_json = status(config, "--json")
        table = status(config)
        too_old = status(config, "--max-age", "60")
        fresh_enough = status(config, "--json", "--max-age", "600")
    finally:
        worker.stop()
        worker.join(20)
        manager.send_signal(signal.SIGTERM)
        assert manager.wait(15) == 0
    print(f"\n$ tomqueue status\n{table.stdout}\n$ tomqueue status --json\n{as_json.stdout}")

    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    rows = {(r["queue"], r["level"]): r for r in report["queues"]}
    states = ("ready", "scheduled", "running", "failed")
    counts = {key: tuple(r[s] for s in states) for key, r in rows.items()}
    assert counts == {
        ("balance", "high"): (1, 0, 0, 0),
        ("balance", "normal"): (2, 0, 0, 1),
        ("balance", "low"): (0, 1, 0, 0),
        ("mail", "normal"): (0, 0, 1, 0),
        ("mail", "bulk"): (1, 0, 0, 0),
    }
    # the broker holds the notifications nobody consumed (the failed job's one too); the
    # running job's delivery is unacked, so not counted as ready; the scheduled one waits
    # in the deferred queue
    # (the republished one is on its way to the busy worker's buffer: 1 or 0)
    depths = {key: r["broker_depth"] for key, r in rows.items()}
    assert depths.pop(("mail", "bulk")) in (0, 1)
    assert depths == {
        ("balance", "high"): 1,
        ("balance", "normal"): 3,
        ("balance", "low"): 0,
        ("mail", "normal"): 0,
    }
    assert 119 <= report["oldest_ready_age_seconds"] < 180
    lag = {key: r["oldest_ready_age_seconds"] for key, r in rows.items()}
    assert lag[("balance", "high")] < 60 and 119 <= lag[("balance", "normal")] < 180
    assert lag[("balance", "low")] is None and lag[("mail", "normal")] is None
    assert 89 <= lag[("mail", "bulk")] < 150
    assert [(r["queue"], r["level"]) for r in report["queues"]] == [
        ("balance", "high"), ("balance", "normal"), ("balance", "low"),
        ("mail", "normal"), ("mail", "bulk"),
    ]  # fmt: skip
    [held] = report["deferred_managers"]
    assert (held["pid"], held["held"]) == (manager.pid, 1)
    assert held["next_due"] == later.run_at.isoformat()
    assert report["deferred"]["held"] == 1 and report["deferred"]["broker_consumers"] == 1
    sweep = report["last_sweep"]
    assert (sweep["holder"], sweep["republished"]) == (worker.worker.name, 1)
    assert 89 <= sweep["lateness_seconds"] < 150 and 74 <= sweep["since_notified_seconds"] < 150
    [registered] = report["workers"]
    assert registered["name"] == worker.worker.name
    assert registered["queues"] == "mail" and registered["alive"] is True
    assert registered["current_jobs"] == [running.id]
    assert registered["pid"] > 0 and registered["host"]

    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "queue", "level", "ready", "scheduled", "running", "failed", "broker", "lag"
    ]  # fmt: skip
    body = [line.split() for line in lines[2:7]]
    assert [row[:6] for row in body] == [  # levels by urgency, not alphabetically
        ["balance", "high", "1", "0", "0", "0"],
        ["balance", "normal", "2", "0", "0", "1"],
        ["balance", "low", "0", "1", "0", "0"],
        ["mail", "normal", "0", "0", "1", "0"],
        ["mail", "bulk", "1", "0", "0", "0"],
    ]
    assert [row[6] for row in body[:4]] == ["1", "3", "0", "0"]
    lags = [row[7] for row in body]
    assert float(lags[0].rstrip("s")) < 60 and 119 <= float(lags[1].rstrip("s")) < 180
    assert lags[2:4] == ["-", "-"], "no ready job: no lag"
    assert lines[7].startswith("oldest ready job waited 1")
    worker_line = next(line for line in lines if line.startswith(worker.worker.name))
    queues, seen, jobs = worker_line[len(worker.worker.name) :].split()
    assert (queues, jobs) == ("mail", str(running.id)) and seen in ("0s", "1s", "2s")
    assert any(line.startswith(f"host:{socket.gethostname()} pid:{manager.pid} ") for line in lines)
    assert (
        lines[-1].startswith("last sweep ")
        and f"by {worker.worker.name}: republished 1" in lines[-1]
    )

    assert too_old.returncode == 2, too_old.stdout + too_old.stderr
    assert fresh_enough.returncode == 0, fresh_enough.stderr
    assert json.loads(fresh_enough.stdout)["oldest_ready_age_seconds"] >= 119


# --- deferred managers (issue 3 req. 5) ----------------------------------------------------


def start_manager(config: Config, log_path: Path) -> subprocess.Popen[bytes]:
    env = worker_env(config, **FAST_LEASES)
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "tomqueue", "deferred", "--stats-interval", "1"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def managers(config: Config) -> list[dict[str, Any]]:
    done = status(config, "--json")
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout)["deferred_managers"])


def test_status_shows_each_deferred_manager_with_what_it_holds(
    pg_amqp: Config, ledger_path: str, tmp_path: Path
) -> None:
    config = pg_amqp
    later = [
        tomqueue.enqueue(Record(ledger_path, f"later{h}"), run_at=timedelta(hours=h), priority=p)
        for h, p in ((2, 0), (1, 10), (3, -1))
    ]
    first_due = min(job.run_at for job in later)
    one = start_manager(config, tmp_path / "one.log")
    two: subprocess.Popen[bytes] | None = None
    try:
        wait_until(lambda: sum(m["held"] for m in managers(config)) == 3, 20, "3 held")
        report = json.loads(status(config, "--json").stdout)
        table = status(config).stdout
        [row] = report["deferred_managers"]
        assert row["name"] == f"host:{socket.gethostname()} pid:{one.pid}"
        assert (row["pid"], row["host"], row["alive"]) == (one.pid, socket.gethostname(), True)
        assert row["queue"] == f"{config.prefix}.work.deferred" and row["held"] == 3
        assert row["next_due"] == first_due.isoformat()
        assert 3500 < row["next_due_in_seconds"] <= 3600 and row["last_seen_seconds_ago"] < 3
        assert report["deferred"] == {
            "queue": f"{config.prefix}.work.deferred",
            "broker_ready": 0,
            "broker_consumers": 1,
            "held": 3,
            "managers": 1,
        }
        line = next(ln for ln in table.splitlines() if ln.startswith(row["name"]))
        queue, seen, held, due, *_in = line[len(row["name"]) :].split()
        assert (queue, held, due) == (row["queue"], "3", first_due.isoformat()[:23] + "Z")
        assert seen in ("0s", "1s", "2s") and "(in 3" in line
        assert "3 held by 1 live manager(s)" in table and "0 ready on the broker" in table

        one.send_signal(signal.SIGTERM)
        assert one.wait(15) == 0
        assert managers(config) == [], "a clean exit removes the row"

        two = start_manager(config, tmp_path / "two.log")
        wait_until(lambda: [m["held"] for m in managers(config)] == [3], 20, "the second")
        os.killpg(two.pid, signal.SIGKILL)
        two.wait(10)
        wait_until(lambda: not managers(config)[0]["alive"], 10, "the dead one marked")
        assert " DEAD " in status(config).stdout
        assert json.loads(status(config, "--json").stdout)["deferred"]["held"] == 0
    finally:
        for proc in (one, two):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
    print("\n" + (tmp_path / "one.log").read_text()[-1500:])
