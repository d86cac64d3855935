"""docker/ cannot run here (no engine): check its files' structure and that every command
they run is one our CLI accepts."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

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
