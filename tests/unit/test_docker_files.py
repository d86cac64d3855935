"""docker/ cannot run here (no engine): check its files' structure and that every command
they run is one our CLI accepts."""

from __future__ import annotations

import configparser
import re
import shlex
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from tomqueue.cli import parser

DOCKER = Path(__file__).resolve().parents[2] / "docker"


def _compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def test_compose_has_the_services_with_health_checks_and_ports() -> None:
    services = _compose()["services"]
    assert {"rabbitmq", "postgres", "mariadb", "worker", "deferred", "migrate"} <= set(services)
    assert "management" in services["rabbitmq"]["image"]
    assert "15672:15672" in services["rabbitmq"]["ports"]
    assert "5672:5672" in services["rabbitmq"]["ports"]
    for name in ("rabbitmq", "postgres", "mariadb"):
        assert services[name]["healthcheck"]["test"], name
    for name in ("worker", "deferred"):
        depends = services[name]["depends_on"]
        assert depends["rabbitmq"]["condition"] == "service_healthy"
        assert depends["postgres"]["condition"] == "service_healthy"
        assert depends["migrate"]["condition"] == "service_completed_successfully"
        env = services[name]["environment"]
        assert env["TOMQUEUE_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["TOMQUEUE_AMQP_URL"].startswith("amqp://")
        assert services[name]["stop_signal"] == "SIGTERM"


@pytest.mark.parametrize("service", ["worker", "deferred", "migrate"])
def test_compose_commands_match_the_cli(service: str) -> None:
    command = _compose()["services"][service]["command"]
    assert command[0] == "tomqueue"
    parser().parse_args(command[1:])  # exits (fails the test) on an unknown option


def test_dockerfile_installs_the_packages_and_runs_supervisord() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert text.startswith("# ") and "FROM python:3.11" in text
    for path in ("tomqueue", "deferred", "setup.cfg", "docker/supervisord.conf"):
        assert f"COPY {path}" in text, path
    assert "supervisord" in text.splitlines()[-1]


def _supervisor_programs() -> dict[str, dict[str, str]]:
    ini = configparser.RawConfigParser()
    ini.read(DOCKER / "supervisord.conf")
    return {s.split(":", 1)[1]: dict(ini[s]) for s in ini.sections() if s.startswith("program:")}


def test_supervisord_programs_stop_gracefully() -> None:
    programs = _supervisor_programs()
    assert {"worker", "deferred", "migrate"} <= set(programs)
    for name in ("worker", "deferred"):
        program = programs[name]
        assert program["stopsignal"] == "TERM"
        assert program["stopasgroup"] == "true" and program["killasgroup"] == "true"
        assert program["autorestart"] == "true"
    # longer than the worker's default stop_grace (30 s), so the worker releases its jobs
    assert int(programs["worker"]["stopwaitsecs"]) > 30


def test_supervisord_commands_match_the_cli() -> None:
    for name, program in _supervisor_programs().items():
        argv = shlex.split(program["command"].replace("%(ENV_TOMQUEUE_IMPORT)s", "app.jobs"))
        assert argv[0] == "tomqueue", name
        parser().parse_args(argv[1:])


def _realize(config: Path) -> list[tuple[str, Any]]:
    """Load a configuration the way supervisord does (expansions, includes, checks)."""
    from supervisor.options import ServerOptions

    options = ServerOptions()
    options.realize(args=["-c", str(config)])
    return [(g.name, p) for g in options.process_group_configs for p in g.process_configs]


def _dockerfile_env() -> dict[str, str]:
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(item.split("=", 1) for item in shlex.split(line[4:]))
    return env


def test_the_images_default_command_can_load_the_shipped_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``supervisord -c /etc/supervisord.conf`` in the image: every ``%(ENV_...)s`` the file
    uses must be set by the Dockerfile (supervisord has no defaults for them), and the log
    directory must be created there."""
    env = _dockerfile_env()
    used = set(re.findall(r"%\(ENV_(\w+)\)s", (DOCKER / "supervisord.conf").read_text()))
    assert used <= set(env), f"not set in the Dockerfile: {sorted(used - set(env))}"
    assert f"mkdir -p {env['TOMQUEUE_LOG_DIR']}" in (DOCKER / "Dockerfile").read_text()
    for name in used:
        monkeypatch.setenv(name, env[name])
    monkeypatch.setenv("TOMQUEUE_LOG_DIR", str(tmp_path))  # the image creates its own
    programs = _realize(DOCKER / "supervisord.conf")
    workers = [p for group, p in programs if group == "worker"]
    assert len(workers) == int(env["TOMQUEUE_WORKERS"])
    assert f"--import {env['TOMQUEUE_IMPORT']}" in workers[0].command


def test_readme_plain_host_supervisor_example_loads_and_stops_gracefully(tmp_path: Path) -> None:
    text = (DOCKER.parent / "README.md").read_text()
    start = text.index("```ini\n") + len("```ini\n")
    snippet = text[start : text.index("```", start)]
    # no user "app" nor /var/log/tomqueue on this machine
    snippet = snippet.replace("user=app\n", "").replace("/var/log/tomqueue/", f"{tmp_path}/")
    (tmp_path / "tomqueue.conf").write_text(snippet)
    main = tmp_path / "supervisord.conf"
    main.write_text(
        f"[supervisord]\nlogfile={tmp_path}/supervisord.log\npidfile={tmp_path}/s.pid\n"
        f"[include]\nfiles={tmp_path}/tomqueue.conf\n"
    )
    programs = _realize(main)
    assert sorted({group for group, _ in programs}) == ["tomqueue-deferred", "tomqueue-worker"]
    for group, program in programs:
        argv = shlex.split(program.command)
        assert argv[0].endswith("/tomqueue"), group
        parser().parse_args(argv[1:])
        assert program.stopsignal == signal.SIGTERM
        assert program.stopasgroup and program.killasgroup
        assert program.environment["TOMQUEUE_AMQP_URL"].endswith(":5672/%2F")  # %% unescaped
        if group == "tomqueue-worker":
            assert program.stopwaitsecs > 30  # longer than the worker's stop_grace
