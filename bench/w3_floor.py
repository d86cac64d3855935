"""W3's floor on this host: the same chain as ours with none of our code in it.

A producer INSERTs a job row (one autocommit statement, durable commit) and publishes a
persistent message to a durable classic queue; a consumer process — one thread, pika's
blocking loop — locks the row by primary key (PostgreSQL: ``UPDATE ... RETURNING``;
MySQL/MariaDB, which has no ``UPDATE ... RETURNING``: ``UPDATE`` then ``SELECT``, as ours
does) and stamps the time. No thread hand-offs, no validation, no confirms awaited: what is
left is two durable commits and RabbitMQ's hop, on this host, at this hour. W3 reports it
beside our figure (the host's idle wake-ups decide most of it: see bench/README.md).

    python -m bench.w3_floor --url URL --amqp AMQP --queue NAME --stamps FILE --ready FILE
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import pika

from bench import procs
from bench.env import Target, channel, reset
from bench.jobs import Stamp, stamp
from bench.options import Options
from tomqueue.config import Config
from tomqueue.db import get_autocommit_engine
from tomqueue.enqueue import new_job, validate
from tomqueue.insert_one import statement
from tomqueue.persist import row_values
from tomqueue.transport.amqp import CLASSIC
from tomqueue.worker.hot_sql import COLUMNS

PG_LOCK = (
    "UPDATE delayed_jobs SET locked_at = (clock_timestamp() AT TIME ZONE 'UTC'), "
    "locked_by = 'floor', fence = fence + 1 WHERE id = %s AND locked_at IS NULL "
    f"RETURNING {COLUMNS}"
)
MY_LOCK = (
    "UPDATE delayed_jobs SET locked_at = UTC_TIMESTAMP(6), locked_by = 'floor', "
    "fence = fence + 1 WHERE id = %s AND locked_at IS NULL"
)
MY_READ = f"SELECT {COLUMNS} FROM delayed_jobs WHERE id = %s AND locked_by = 'floor'"


def queue_name(target: Target) -> str:
    return f"{target.prefix}.floor"


def run(target: Target, opts: Options, send_jobs: Any) -> dict[str, Any]:
    """Start the consumer, send W3's jobs through the bare chain with ``send_jobs(send)``
    (``w3_latency``'s pacing), and return its latencies (``w3_latency.latencies``)."""
    reset(target)
    path = str(target.path("w3-floor.stamps"))
    ready = target.path("w3-floor.ready")
    ready.unlink(missing_ok=True)
    name = queue_name(target)
    with channel(target) as ch:
        ch.queue_declare(name, durable=True, arguments=CLASSIC)
        ch.queue_purge(name)
    argv = [sys.executable, "-m", "bench.w3_floor", "--url", target.url]
    argv += ["--amqp", target.amqp_url, "--queue", name, "--stamps", path, "--ready", str(ready)]
    consumer = procs.Proc("floor-w3", argv, target.env(), target.path("floor-w3.log"))
    engine = get_autocommit_engine(target.config)
    raw = engine.raw_connection()
    connection = pika.BlockingConnection(pika.URLParameters(target.amqp_url))
    try:
        procs.wait_until(ready.exists, 30, "the floor consumer to start", 0.05)
        insert, returning = statement(engine), engine.dialect.name == "postgresql"
        values = row_values(new_job(validate(Stamp(path, "floor"), 0, None, None, target.config)))
        cursor = raw.cursor()
        publish = connection.channel()
        props = pika.BasicProperties(delivery_mode=2)

        def send(marker: str) -> None:
            cursor.execute(insert, values)
            job_id = cursor.fetchone()[0] if returning else cursor.lastrowid  # type: ignore[index]
            publish.basic_publish("", name, f"{job_id} {marker}".encode(), props)

        return send_jobs(send, path)  # type: ignore[no-any-return]
    finally:
        consumer.stop()
        consumer.close()
        connection.close()
        raw.close()
        with channel(target) as ch:
            ch.queue_delete(name)
        reset(target)


def consume(url: str, amqp: str, queue: str, stamps: str, ready: str) -> None:
    """The consumer process: lock each job by id, stamp, ack; until SIGTERM (its default
    action ends it: there is nothing to tidy up)."""
    engine = get_autocommit_engine(Config(database_url=url))
    raw = engine.raw_connection()
    cursor = raw.cursor()
    postgres = engine.dialect.name == "postgresql"
    connection = pika.BlockingConnection(pika.URLParameters(amqp))
    ch = connection.channel()
    ch.basic_qos(prefetch_count=10)

    def on_message(_ch: Any, method: Any, _props: Any, body: bytes) -> None:
        job_id, marker = body.decode().split(" ", 1)
        cursor.execute(PG_LOCK if postgres else MY_LOCK, (int(job_id),))
        if not postgres:
            cursor.execute(MY_READ, (int(job_id),))
        if cursor.fetchall():
            stamp(stamps, marker)
        ch.basic_ack(method.delivery_tag)

    ch.basic_consume(queue, on_message)
    Path(ready).touch()
    ch.start_consuming()  # until SIGTERM ends the process


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    for flag in ("--url", "--amqp", "--queue", "--stamps", "--ready"):
        p.add_argument(flag, required=True)
    args = p.parse_args()
    consume(args.url, args.amqp, args.queue, args.stamps, args.ready)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
