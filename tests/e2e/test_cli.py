"""CLI contract: errors a person can act on, and no password in CLI output or logs."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.conftest import (
    Stack,
    WorkerProcess,
    on_stacks,
    run_cli,
    wait_until,
    worker_env,
)

PASSWORD = "Sup3r-S3cret-pw"


@on_stacks(("sqlite", "polling"))
def test_migrate_unreachable_database_names_url_without_password(stack: Stack) -> None:
    env = worker_env(
        stack.config,
        TOMQUEUE_DATABASE_URL=f"postgresql+psycopg://app:{PASSWORD}@127.0.0.1:1/nowhere",
    )
    result = run_cli("migrate", env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "postgresql+psycopg://app:***@127.0.0.1:1/nowhere" in output
    assert PASSWORD not in output
    assert "Traceback" not in output


@on_stacks(("sqlite", "polling"))
def test_migrate_is_idempotent(stack: Stack) -> None:
    env = worker_env(stack.config)
    first = run_cli("migrate", env=env)
    second = run_cli("migrate", env=env)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "schema is at version" in second.stdout


@on_stacks(("sqlite", "polling"))
def test_bad_config_is_named_not_a_traceback(stack: Stack) -> None:
    env = worker_env(stack.config, TOMQUEUE_MAX_ATTEMPTS="zero")
    result = run_cli("worker", "--import", "tests.jobs", "--exit-on-complete", env=env)
    assert result.returncode == 2
    assert "TOMQUEUE_MAX_ATTEMPTS" in result.stderr
    assert "Traceback" not in result.stderr


@on_stacks(("sqlite", "polling"))
def test_unimportable_import_is_a_clear_error(stack: Stack) -> None:
    result = run_cli(
        "worker",
        "--import",
        "no_such_module_abc",
        "--exit-on-complete",
        env=worker_env(stack.config),
    )
    assert result.returncode == 2
    assert "--import no_such_module_abc" in result.stderr
    assert "Traceback" not in result.stderr


def unreachable_broker_log(stack: Stack, tmp_path: Path, procs: list[WorkerProcess]) -> str:
    env = worker_env(stack.config, TOMQUEUE_AMQP_URL=f"amqp://app:{PASSWORD}@127.0.0.1:1/%2F")
    worker = WorkerProcess(["--import", "tests.jobs"], env, tmp_path / "worker.log")
    procs.append(worker)
    wait_until(lambda: worker.log().count("retrying") >= 2, 20, "two reconnection attempts")
    worker.send(signal.SIGTERM)
    worker.wait(20)
    return worker.log()


@on_stacks(("sqlite", "amqp"))
def test_unreachable_broker_is_retried_with_a_password_free_url(
    stack: Stack, tmp_path: Path, worker_processes: list[WorkerProcess]
) -> None:
    log = unreachable_broker_log(stack, tmp_path, worker_processes)
    assert "cannot connect to the broker at amqp://app:***@127.0.0.1:1/%2F" in log
    assert PASSWORD not in log


@on_stacks(("sqlite", "amqp"))
def test_unreachable_broker_log_has_no_traceback(
    stack: Stack, tmp_path: Path, worker_processes: list[WorkerProcess]
) -> None:
    log = unreachable_broker_log(stack, tmp_path, worker_processes)
    assert "Traceback" not in log


@on_stacks(("sqlite", "amqp"))
def test_tomqueue_deferred_passes_its_options_to_the_manager(stack: Stack) -> None:
    """``tomqueue deferred --metrics-port 9101`` (the README's) reaches the manager's own
    parser: options after ``deferred`` are its, ``--help`` included."""
    env = worker_env(stack.config)
    bad = run_cli("deferred", "--stats-interval", "0", env=env)
    assert bad.returncode == 2
    assert "--stats-interval must be > 0 seconds" in bad.stderr, bad.stderr
    helped = run_cli("deferred", "--help", env=env)
    assert helped.returncode == 0 and "--refresh-interval SECONDS" in helped.stdout
    assert "unrecognized arguments: --bogus" in run_cli("status", "--bogus", env=env).stderr
