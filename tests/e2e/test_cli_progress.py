"""Long CLI work shows progress and a summary: ``tomqueue republish --all`` and
``tomqueue migrate``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomqueue
from tests.conftest import REPO_ROOT, worker_env
from tests.jobs import Record
from tomqueue.config import Config


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
    assert "created tables: delayed_jobs" in first.stdout
    assert "schema is at version" in first.stdout.splitlines()[-1]
    assert "created tables" not in again.stdout
