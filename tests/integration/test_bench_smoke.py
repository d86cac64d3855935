"""The benchmark harness cannot rot: ``python -m bench --quick --db postgresql --only W1``
runs end to end (our worker, the Delayed::Job-style baseline, RabbitMQ) and writes its JSON.

It uses the test database and a private broker prefix, and removes its queues at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pika
import pytest

from tests.conftest import AMQP_URL, POSTGRES_URL, REPO_ROOT

pytestmark = pytest.mark.amqp


def run_bench(output: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOMQUEUE_")}
    env.update(
        TOMQUEUE_BENCH_POSTGRES_URL=POSTGRES_URL,
        TOMQUEUE_BENCH_AMQP_URL=AMQP_URL,
        PYTHONUNBUFFERED="1",
    )
    argv = [sys.executable, "-m", "bench", "--output", str(output), *args]
    return subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_quick_w1_on_postgresql_writes_the_json(tmp_path: Path) -> None:
    output = tmp_path / "latest.json"
    prefix = f"benchsmoke{uuid.uuid4().hex[:8]}"
    done = run_bench(output, "--quick", "--db", "postgresql", "--only", "W1", "--prefix", prefix)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    data = json.loads(output.read_text())
    assert {"meta", "options", "references", "results", "targets"} <= set(data)
    assert data["meta"]["machine"]["nproc"] >= 1
    assert set(data["results"]) == {"postgresql"}
    w1 = data["results"]["postgresql"]["W1"]
    assert "error" not in w1, w1
    for side in ("ours", "baseline"):
        assert w1[side]["enqueue_per_s"] > 0
        assert w1[side]["processed_per_s"] > 0
    assert w1["ours"]["enqueue_flush_per_s"] > 0  # until every notification is confirmed
    assert w1["ours"]["sync"]["enqueue_per_s"] > 0  # sync_publish
    floor = w1["ours"]["floor"]  # enqueue's INSERT alone, one by one
    assert floor["enqueue_per_s"] > 0 and floor["jobs"] == w1["jobs"]
    bulk = w1["ours"]["bulk"]
    assert bulk["available"] in (True, False)
    if bulk["available"]:
        assert bulk["enqueue_per_s"] > 0
    assert w1["ratio_processed"] > 0
    names = {t["name"] for t in data["targets"]}
    assert {
        "W1 processed/s vs DJ",
        "W1 enqueue/s (commit + hand-off)",
        "W1 enqueue+flush/s (confirms)",
    } <= names
    assert {t["status"] for t in data["targets"]} <= {"PASS", "MISS", "n/a"}
    assert "processed/s" in done.stdout and "Targets:" in done.stdout
    assert "password" not in done.stdout.lower()

    # Celery / Dramatiq: measured where `pip install -e '.[bench]'` put them, detected elsewhere
    for name in ("celery", "dramatiq"):
        ref = data["references"][name]
        assert ref["importable"] in (True, False) and ref["note"]
        if ref["importable"]:
            r = ref["W1"]
            assert "error" not in r, r
            assert ref["database"] == "postgresql"
            assert r["enqueue_per_s"] > 0 and r["processed_per_s"] > 0
            assert r["duplicates"] == 0 and r["left_ready"] == 0
            assert f"{name.capitalize()} {ref['version']}: processed/s" in done.stdout
            assert not queue_exists(r["queue"])
    dramatiq_measured = "W1" in data["references"]["dramatiq"]
    assert ("W1 processed/s vs Dramatiq" in names) == dramatiq_measured


def queue_exists(name: str) -> bool:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        connection.channel().queue_declare(name, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker:
        return False
    finally:
        if connection.is_open:
            connection.close()


def test_bad_selection_is_a_clear_error(tmp_path: Path) -> None:
    done = run_bench(tmp_path / "x.json", "--only", "W9")
    assert done.returncode != 0
    assert "--only: expected some of W1, W2, W3, W4" in done.stderr
