"""Issue 6 item 5/6: logs visible outside Python. The real CLI processes log JSON lines with
the stable keys (``--log-format json`` / ``TOMQUEUE_LOG_FORMAT``), or follow a logging
configuration the user brings (``--log-config`` / ``TOMQUEUE_LOG_CONFIG``: JSON, YAML or
INI). The library itself never configures handlers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import tomqueue
from tests.conftest import REPO_ROOT, Stack, on_stacks, run_cli, wait_until, worker_env
from tests.jobs import Boom, Record

STABLE = {"time", "level", "logger", "message", "pid"}


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line must be one JSON object."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@on_stacks(("sqlite", "polling"))
def test_worker_logs_one_json_object_per_line_with_the_stable_keys(
    stack: Stack, ledger_path: str
) -> None:
    ok = tomqueue.enqueue(Record(ledger_path, "ok"), queue="mail")
    boom = tomqueue.enqueue(Boom(ledger_path, "boom"), queue="mail")
    argv = ["worker", "--log-format", "json", "--import", "tests.jobs", "--queue", "mail"]
    done = run_cli(*argv, "--exit-on-complete", env=worker_env(stack.config))
    assert done.returncode == 0, done.stderr
    lines = json_lines(done.stderr)
    assert all(line.keys() >= STABLE for line in lines)
    [succeeded] = [line for line in lines if line.get("action") == "succeeded"]
    assert succeeded["job_id"] == ok.id and succeeded["job_class"] == "tests.jobs:Record"
    assert succeeded["queue"] == "mail" and 0 <= succeeded["duration"] < 5
    assert (succeeded["level"], succeeded["logger"]) == ("INFO", "tomqueue.worker")
    assert succeeded["message"] == f"job {ok.id} succeeded in {succeeded['duration']:.3f}s"
    when = datetime.fromisoformat(succeeded["time"].replace("Z", "+00:00"))
    assert abs(datetime.now(UTC) - when) < timedelta(minutes=1)
    [error] = [line for line in lines if line.get("action") == "error"]
    assert (error["job_id"], error["level"]) == (boom.id, "WARNING")
    assert {"worker_start", "retry", "worker_exit"} <= {line.get("action") for line in lines}


@on_stacks(("sqlite", "amqp"))
def test_deferred_manager_logs_json_from_the_environment_with_held_and_next_due(
    stack: Stack, ledger_path: str, tmp_path: Path
) -> None:
    job = tomqueue.enqueue(Record(ledger_path, "later"), run_at=timedelta(hours=1))
    log_path = tmp_path / "deferred.log"
    env = worker_env(stack.config, TOMQUEUE_LOG_FORMAT="json")
    with open(log_path, "wb") as log:
        manager = subprocess.Popen(
            [sys.executable, "-m", "deferred", "--stats-interval", "0.2"],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:

        def stats() -> list[dict[str, Any]]:
            lines = json_lines(log_path.read_text())
            return [ln for ln in lines if ln.get("action") == "deferred_stats" and ln["held"]]

        wait_until(stats, 20, "a statistics line holding the job")
        line = stats()[-1]
        assert line["held"] == 1 and line["next_due"] == job.run_at.isoformat()[:23] + "Z"
        assert line["logger"] == "deferred" and {"published", "reconnects"} <= line.keys()
    finally:
        manager.send_signal(signal.SIGTERM)
        assert manager.wait(20) == 0
    last = json_lines(log_path.read_text())[-1]
    assert last["action"] == "deferred_exit" and last["held"] == 0


CONFIGS = {
    "json": json.dumps(
        {
            "version": 1,
            "formatters": {"mine": {"format": "mine %(levelname)s %(name)s: %(message)s"}},
            "handlers": {
                "file": {"class": "logging.FileHandler", "filename": "{log}", "formatter": "mine"}
            },
            "root": {"level": "INFO", "handlers": ["file"]},
        }
    ),
    "yaml": """
version: 1
formatters:
  lines: {"()": tomqueue.logconfig.JsonFormatter}
handlers:
  file: {class: logging.FileHandler, filename: "{log}", formatter: lines}
root: {level: INFO, handlers: [file]}
""",
    "ini": """
[loggers]
keys=root
[handlers]
keys=file
[formatters]
keys=mine
[logger_root]
level=INFO
handlers=file
[handler_file]
class=FileHandler
formatter=mine
args=('{log}',)
[formatter_mine]
format=mine %(levelname)s %(name)s: %(message)s
""",
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@on_stacks(("sqlite", "polling"))
def test_a_users_logging_config_file_replaces_ours(
    stack: Stack, ledger_path: str, tmp_path: Path, kind: str
) -> None:
    log = tmp_path / "app.log"
    config = tmp_path / f"logging.{kind}"
    config.write_text(CONFIGS[kind].replace("{log}", str(log)))
    tomqueue.enqueue(Record(ledger_path, "ok"))
    env = worker_env(stack.config, TOMQUEUE_LOG_CONFIG=str(config))
    done = run_cli("worker", "--import", "tests.jobs", "--exit-on-complete", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", "our own handler stays out of the way"
    text = log.read_text()
    if kind == "yaml":
        assert any(line.get("action") == "succeeded" for line in json_lines(text))
    else:
        assert "mine INFO tomqueue.worker: job " in text and " succeeded in " in text


@on_stacks(("sqlite", "polling"))
def test_bad_log_settings_are_named_not_a_traceback(stack: Stack, tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"version": 1, "handlers": {"x": {"class": "no.such.Handler"}}}')
    for args, env, named in (
        (["--log-config", str(broken)], {}, f"log config {broken}"),
        ([], {"TOMQUEUE_LOG_CONFIG": str(tmp_path / "missing.ini")}, "no such file"),
        ([], {"TOMQUEUE_LOG_FORMAT": "xml"}, "log format must be one of text, json"),
    ):
        done = run_cli("status", *args, env=worker_env(stack.config, **env))
        assert done.returncode == 2 and named in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_the_library_never_configures_handlers(tmp_path: Path) -> None:
    code = (
        "import logging, tomqueue, deferred\n"
        "from tests.jobs import Record\n"
        "from tomqueue.db import migrate\n"
        f"config = tomqueue.configure(database_url='sqlite:///{tmp_path}/lib.sqlite3')\n"
        "migrate(config)\n"
        f"tomqueue.enqueue(Record('{tmp_path}/ledger', 'x'))\n"
        "assert tomqueue.work_off(5, imports=['tests.jobs']) == (1, 0)\n"
        "assert logging.getLogger().handlers == [], logging.getLogger().handlers\n"
        "real = [(n, h) for n in logging.root.manager.loggerDict\n"
        "        for h in logging.getLogger(n).handlers if type(h) is not logging.NullHandler]\n"
        "assert real == [], real\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
