"""Long CLI work shows progress and a summary: ``tomqueue republish --all`` and
``tomqueue migrate``."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pytest

import tomqueue
from tests.conftest import REPO_ROOT, configured, make_config, wait_until, worker_env
from tests.jobs import Record
from tomqueue.config import Config
from tomqueue.db import get_engine


def _run(config: Config, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tomqueue", *args],
        cwd=REPO_ROOT,
        env=worker_env(config),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_republish_all_prints_progress_per_batch_and_a_summary(
    sqlite_config: Config, ledger_path: str
) -> None:
    tomqueue.enqueue_many(Record(ledger_path, f"r{i}") for i in range(2500))

    done = _run(sqlite_config, "republish", "--all")

    assert done.returncode == 0, done.stderr
    progress = [ln for ln in done.stdout.splitlines() if ln.startswith("...")]
    assert [ln.split()[1] for ln in progress] == ["1000", "2000", "2500"]
    assert done.stdout.splitlines()[-1] == "republished 2500 notification(s)"


def test_migrate_prints_what_it_did_and_is_idempotent(tmp_path: Path) -> None:
    config = Config(database_url=f"sqlite:///{tmp_path / 'm.sqlite3'}")

    first = _run(config, "migrate")
    again = _run(config, "migrate")

    assert first.returncode == 0 and again.returncode == 0, first.stderr + again.stderr
    assert "creating table delayed_jobs with 2 index(es) ..." in first.stdout
    assert "table(s) created" in first.stdout.splitlines()[-2]
    assert "schema is at version" in first.stdout.splitlines()[-1]
    assert "creating" not in again.stdout
    assert "nothing to do: the schema is up to date" in again.stdout


# --- tomqueue migrate on a big table of an older schema (issue 6 item 7) --------------------

ROWS = 200_000
FILL = {
    "postgresql": "SELECT 0, 0, '{}', now(), now(), now(), 1, 0 FROM generate_series(1, {n})",
    "mysql": "SELECT 0, 0, '{}', UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), UTC_TIMESTAMP(6), 1, 0 "
    "FROM seq_1_to_{n}",
}


def older_schema_with_rows(config: Config, database: str) -> None:
    """``delayed_jobs`` of schema 2, holding 200k rows: without ``crashes``, with the old
    sweep index (on the lock columns) instead of the due index."""
    with get_engine(config).begin() as conn:
        conn.exec_driver_sql("ALTER TABLE delayed_jobs DROP COLUMN crashes")
        conn.exec_driver_sql(
            "DROP INDEX ix_delayed_jobs_due" + (" ON delayed_jobs" if database == "mysql" else "")
        )
        conn.exec_driver_sql(
            "CREATE INDEX ix_delayed_jobs_sweep ON delayed_jobs (failed_at, locked_at, run_at)"
        )
        conn.exec_driver_sql(
            "INSERT INTO delayed_jobs (priority, attempts, handler, run_at, created_at, "
            "updated_at, version, fence) " + FILL[database].replace("{n}", str(ROWS))
        )
        conn.exec_driver_sql(
            "ANALYZE " + ("TABLE " if database == "mysql" else "") + "delayed_jobs"
        )


def read_lines(stream: IO[str], into: list[str]) -> threading.Thread:
    def pump() -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("database", ["postgresql", "mysql"])
def test_migrate_prints_each_step_before_it_runs_then_a_summary(
    database: str, tmp_path: Path
) -> None:
    """The ALTER TABLE waits for a transaction that read the table: its line is already
    printed (and flushed through a pipe, no PYTHONUNBUFFERED) while it waits."""
    with configured(make_config(database, "polling", tmp_path)) as config:
        older_schema_with_rows(config, database)
        env = worker_env(config)
        del env["PYTHONUNBUFFERED"]
        blocker = get_engine(config).connect()
        blocker.begin()
        blocker.exec_driver_sql("SELECT id FROM delayed_jobs LIMIT 1").all()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tomqueue", "migrate"],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: list[str] = []
        reader = read_lines(proc.stdout, lines)  # type: ignore[arg-type]
        try:
            adding = "adding column delayed_jobs.crashes ("
            wait_until(lambda: any(ln.startswith(adding) for ln in lines), 30, "the step")
            time.sleep(1.0)
            assert proc.poll() is None and lines[-1].startswith(adding), lines
        finally:
            blocker.rollback()
            blocker.close()
        assert proc.wait(60) == 0, lines
        reader.join(5)
        check_migrate_output(lines, database)
        with get_engine(config).connect() as conn:
            kept = conn.exec_driver_sql("SELECT COUNT(*) FROM delayed_jobs WHERE crashes = 0")
            assert kept.scalar_one() == ROWS


def check_migrate_output(lines: list[str], database: str) -> None:
    print("\n$ tomqueue migrate\n" + "\n".join(lines))
    size = r"\(about [\d,]+ rows, [\d,.]+ MB\)"
    assert re.fullmatch(r"migrating \S+ to schema version \d+", lines[0])
    assert re.fullmatch(rf"adding column delayed_jobs\.crashes {size} \.\.\.", lines[1])
    if database == "postgresql":  # analyzed: PostgreSQL's estimate is exact here
        assert f"about {ROWS:,} rows" in lines[1]
    waited = float(re.fullmatch(r"  done in ([\d.]+) s", lines[2])[1])  # type: ignore[index]
    assert waited >= 1.0, "the step's time includes its wait for the lock"
    assert re.fullmatch(
        rf"creating index ix_delayed_jobs_due on delayed_jobs \(failed_at, run_at\) {size} \.\.\.",
        lines[3],
    )
    assert re.fullmatch(r"  done in [\d.]+ s", lines[4])
    assert lines[5] == "dropping index ix_delayed_jobs_sweep on delayed_jobs (no longer used) ..."
    assert re.fullmatch(r"  done in [\d.]+ s", lines[6])
    assert re.fullmatch(
        r"migrated in [\d.]+ s: 1 column\(s\) added, 1 index\(es\) created, "
        r"1 index\(es\) dropped",
        lines[7],
    )
    assert lines[8].startswith("schema is at version") and len(lines) == 9
