"""``tomqueue status``: jobs per queue and level from the database, broker queue depths,
and the age of the oldest ready job. ``--max-age S`` exits 2 when that age passes S seconds
(Delayed::Job's ``check(max_age)``)."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, case, func, select

from tomqueue.config import Config
from tomqueue.db import db_now, get_engine
from tomqueue.leases import live_workers_since
from tomqueue.schema import Job, WorkerRecord

STATES = ("ready", "scheduled", "running", "failed")


def collect(config: Config) -> dict[str, Any]:
    engine = get_engine(config)
    with engine.connect() as conn:
        now = db_now(conn)
        state = case(
            (Job.failed_at.is_not(None), "failed"),
            (Job.locked_at.is_not(None), "running"),
            (Job.run_at > now, "scheduled"),
            else_="ready",
        )
        rows = conn.execute(
            select(
                Job.queue, Job.priority, state.label("state"), func.count(), func.min(Job.run_at)
            ).group_by(Job.queue, Job.priority, state)
        ).all()
        workers = _workers(conn, config, now)
    table: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: dict.fromkeys(STATES, 0))
    oldest: datetime | None = None
    for queue, priority, st, count, first_run_at in rows:
        table[(queue or config.default_queue, config.level_for(priority))][st] += count
        if st == "ready" and first_run_at is not None:
            first = (
                first_run_at
                if isinstance(first_run_at, datetime)
                else datetime.fromisoformat(first_run_at)
            )
            oldest = first if oldest is None else min(oldest, first)
    depths = _depths(config, sorted({q for q, _lv in table}))
    return {
        "database_time": now.isoformat(),
        "queues": [
            {"queue": q, "level": lv, **counts, "broker_depth": depths.get((q, lv))}
            for (q, lv), counts in sorted(table.items())
        ],
        "oldest_ready_age_seconds": (now - oldest).total_seconds() if oldest else 0.0,
        "workers": workers,
    }


def _workers(conn: Connection, config: Config, now: datetime) -> list[dict[str, Any]]:
    rows = conn.execute(select(WorkerRecord.__table__).order_by(WorkerRecord.name)).all()
    alive_since = live_workers_since(now, config)
    return [
        {
            "name": w.name,
            "host": w.host,
            "pid": w.pid,
            "queues": w.queues,
            "started_at": w.started_at.isoformat(),
            "last_seen_seconds_ago": round((now - w.last_seen).total_seconds(), 1),
            "alive": w.last_seen >= alive_since,
            "current_jobs": json.loads(w.current_jobs or "[]"),
        }
        for w in rows
    ]


def _depths(config: Config, queues: list[str]) -> dict[tuple[str, str], int]:
    if not config.uses_broker or not queues:
        return {}
    from tomqueue.transport.amqp import queue_depths

    found = queue_depths(config, list(queues))
    return {(q or config.default_queue, lv): n for (q, lv), n in found.items()}


def render(report: dict[str, Any]) -> str:
    header = (
        f"{'queue':<20} {'level':<7} " + " ".join(f"{s:>9}" for s in STATES) + f" {'broker':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in report["queues"]:
        depth = "-" if row["broker_depth"] is None else str(row["broker_depth"])
        lines.append(
            f"{row['queue']:<20} {row['level']:<7} "
            + " ".join(f"{row[s]:>9}" for s in STATES)
            + f" {depth:>7}"
        )
    lines.append(f"oldest ready job waited {report['oldest_ready_age_seconds']:.1f} s")
    lines.append("")
    lines.append(f"{'worker':<40} {'queues':<20} {'seen':>6}  jobs")
    for w in report["workers"]:
        state = f"{w['last_seen_seconds_ago']:.0f}s" + ("" if w["alive"] else " DEAD")
        jobs = ",".join(str(j) for j in w["current_jobs"]) or "-"
        lines.append(f"{w['name']:<40} {w['queues']:<20} {state:>6}  {jobs}")
    if not report["workers"]:
        lines.append("(no workers registered)")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    report = collect(Config.from_env())
    print(json.dumps(report, indent=2) if args.json else render(report))
    if args.max_age is not None and report["oldest_ready_age_seconds"] > args.max_age:
        return 2
    return 0
