"""``tomqueue status``: what the queues hold and who works on them.

- per queue and priority level (most urgent first): jobs ready, scheduled, running and
  failed in the database, ready messages in the level's broker queue, and the lag (age of
  the oldest ready job);
- the age of the oldest ready job overall: ``--max-age S`` exits 2 when it passes S seconds
  (Delayed::Job's ``check(max_age)``);
- the worker registry, and the deferred managers with what each holds and when its next
  job is due, plus the deferred queue's depth on the broker;
- the periodic sweeper's last report: when, by whom, how many notifications it
  republished and how late they were.

``collect`` builds the report (the ``--json`` output); ``tomqueue.status_table`` renders it.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, case, func, inspect, select

from tomqueue.config import LEVELS, Config
from tomqueue.db import db_now, get_engine
from tomqueue.leases import live_workers_since
from tomqueue.schema import DeferredManagerRecord, Job, WorkerRecord
from tomqueue.sweep_report import last_sweep
from tomqueue.topology import Topology

STATES = ("ready", "scheduled", "running", "failed")

Counts = dict[tuple[str, str], dict[str, Any]]


def collect(config: Config) -> dict[str, Any]:
    with get_engine(config).connect() as conn:
        now = db_now(conn)
        table = _jobs(conn, config, now)
        workers = _workers(conn, config, now)
        managers = _managers(conn, config, now)
        sweep = last_sweep(conn, now)
    depths = _depths(config, sorted({q for q, _lv in table}))
    ages = [r["oldest_ready_age_seconds"] for r in table.values()]
    return {
        "database_time": now.isoformat(),
        "queues": [
            {"queue": q, "level": lv, **row, "broker_depth": depths.get((q, lv))}
            for (q, lv), row in sorted(table.items(), key=_urgency)
        ],
        "oldest_ready_age_seconds": max((a for a in ages if a is not None), default=0.0),
        "workers": workers,
        "deferred": _deferred(config, managers),
        "deferred_managers": managers,
        "last_sweep": sweep,
    }


def _urgency(item: tuple[tuple[str, str], Any]) -> tuple[str, int]:
    (queue, level), _row = item
    return queue, LEVELS.index(level)


def _jobs(conn: Connection, config: Config, now: datetime) -> Counts:
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
    table: Counts = defaultdict(lambda: {**dict.fromkeys(STATES, 0), "oldest": None})
    for queue, priority, st, count, first_run_at in rows:
        row = table[(queue or config.default_queue, config.level_for(priority))]
        row[st] += count
        if st == "ready" and first_run_at is not None:
            first = _as_datetime(first_run_at)
            row["oldest"] = first if row["oldest"] is None else min(row["oldest"], first)
    for row in table.values():
        oldest = row.pop("oldest")
        row["oldest_ready_age_seconds"] = (now - oldest).total_seconds() if oldest else None
    return table


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
            "last_seen_seconds_ago": _seconds_ago(now, w.last_seen),
            "alive": w.last_seen >= alive_since,
            "current_jobs": json.loads(w.current_jobs or "[]"),
        }
        for w in rows
    ]


def _seconds_ago(now: datetime, then: datetime) -> float:
    """Age of a heartbeat, never negative: one written after this report read the database
    clock (a process refreshing its row meanwhile) is 0 s old, not "-0s"."""
    return max(0.0, round((now - then).total_seconds(), 1))


def _managers(conn: Connection, config: Config, now: datetime) -> list[dict[str, Any]]:
    """The deferred managers' registry (empty on a schema that predates it)."""
    table = DeferredManagerRecord.__table__
    if not inspect(conn).has_table(table.name):  # type: ignore[attr-defined]
        return []
    rows = conn.execute(select(table).order_by(DeferredManagerRecord.name)).all()
    alive_since = live_workers_since(now, config)
    return [
        {
            "name": m.name,
            "host": m.host,
            "pid": m.pid,
            "queue": m.queue,
            "started_at": _as_datetime(m.started_at).isoformat(),
            "last_seen_seconds_ago": _seconds_ago(now, _as_datetime(m.last_seen)),
            "alive": _as_datetime(m.last_seen) >= alive_since,
            "held": m.held,
            "next_due": _as_datetime(m.next_due).isoformat() if m.next_due else None,
            "next_due_in_seconds": (
                round((_as_datetime(m.next_due) - now).total_seconds(), 3) if m.next_due else None
            ),
            "published": m.published,
        }
        for m in rows
    ]


def _deferred(config: Config, managers: list[dict[str, Any]]) -> dict[str, Any]:
    """The deferred queue: ready messages and consumers on the broker (None without one),
    and what the live managers of this prefix say they hold."""
    name = Topology.of(config).deferred_queue
    mine = [m for m in managers if m["alive"] and m["queue"] == name]
    ready, consumers = _queue_state(config, name) if config.uses_broker else (None, None)
    return {
        "queue": name,
        "broker_ready": ready,
        "broker_consumers": consumers,
        "held": sum(m["held"] for m in mine),
        "managers": len(mine),
    }


def _queue_state(config: Config, name: str) -> tuple[int, int]:
    """(ready messages, consumers) of a broker queue; (0, 0) if it does not exist."""
    from pika.exceptions import ChannelClosedByBroker

    from tomqueue.transport.amqp import connect

    connection = connect(config, "inspect")
    try:
        ok = connection.channel().queue_declare(name, passive=True)
        return int(ok.method.message_count), int(ok.method.consumer_count)
    except ChannelClosedByBroker:  # 404: not declared yet
        return 0, 0
    finally:
        if connection.is_open:
            connection.close()


def _depths(config: Config, queues: list[str]) -> dict[tuple[str, str], int]:
    if not config.uses_broker or not queues:
        return {}
    from tomqueue.transport.amqp import queue_depths

    found = queue_depths(config, list(queues))
    return {(q or config.default_queue, lv): n for (q, lv), n in found.items()}


def _as_datetime(value: datetime | str) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def main(args: argparse.Namespace) -> int:
    from tomqueue.status_table import render

    report = collect(Config.from_env())
    print(json.dumps(report, indent=2) if args.json else render(report))
    if args.max_age is not None and report["oldest_ready_age_seconds"] > args.max_age:
        return 2
    return 0
