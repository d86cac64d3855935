"""Config: one frozen, validated object; errors name the field and the constraint;
passwords never appear in messages."""

from __future__ import annotations

import dataclasses

import pytest

from tomqueue import Config, ConfigError
from tomqueue.config import DEFAULT_PRIORITY_MAP, LEVELS, redact_url


def test_defaults_match_the_contract() -> None:
    config = Config()
    assert config.database_url == "sqlite:///tomqueue.sqlite3"
    assert config.amqp_url is None and not config.uses_broker
    assert config.prefix == "tomqueue"
    assert config.max_attempts == 25
    assert config.max_run_time == 4 * 3600
    assert config.default_priority == 0
    assert config.delay_jobs is True
    assert config.destroy_failed_jobs is False


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_attempts = 3  # type: ignore[misc]
    assert config.replace(max_attempts=3).max_attempts == 3
    assert config.max_attempts == 25


@pytest.mark.parametrize(
    ("field", "value", "constraint"),
    [
        ("database_url", "oracle://db/x", "postgresql, mysql or sqlite"),
        ("amqp_url", "http://rabbit:5672/", "amqp://"),
        ("prefix", "has space", "letters, digits"),
        ("prefix", "", "letters, digits"),
        ("max_attempts", 0, ">= 1"),
        ("max_attempts", 2.5, "integer"),
        ("max_attempts", True, "integer"),
        ("read_ahead", 0, ">= 1"),
        ("read_ahead", 70000, "65535"),
        ("max_run_time", 0, "> 0"),
        ("sleep_delay", -1, "> 0"),
        ("publish_timeout", "10", "> 0"),
        ("publish_retry_for", 0, "> 0"),
        ("publish_retry_for", -1.5, "> 0"),
        ("stop_grace", -0.5, ">= 0"),
        ("timeout_grace", -1, ">= 0"),
        ("run_at_tolerance", -1, ">= 0"),
        ("release_ahead", -0.01, ">= 0"),
        ("release_ahead", "soon", ">= 0"),
        ("delivery_hold_limit", 1800, "consumer_timeout"),
        ("default_queue", "bad queue", "letters, digits"),
        ("default_priority", "high", "integer"),
        ("priority_map", {0: "urgent"}, "values must be one of"),
        ("priority_map", {"0": "high"}, "keys must be integers"),
        ("exception_reporter", 42, "callable"),
    ],
)
def test_invalid_field_names_the_field_and_constraint(
    field: str, value: object, constraint: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Config(**{field: value})  # type: ignore[arg-type]
    message = str(info.value)
    assert field in message
    assert constraint in message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("delay_jobs", "false"),
        ("destroy_failed_jobs", "yes"),
        ("max_run_time", True),
        ("sync_publish", 1),
    ],
)
def test_wrongly_typed_flags_are_rejected(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        Config(**{field: value})  # type: ignore[arg-type]


def test_bad_database_url_error_hides_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        Config(database_url="oracle://scott:tiger-s3cret@db.example/orcl")
    assert "tiger-s3cret" not in str(info.value)
    assert "***" in str(info.value)


def test_bad_amqp_url_error_hides_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        Config(amqp_url="http://guest:rabbit-s3cret@mq:5672/")
    assert "rabbit-s3cret" not in str(info.value)


def test_describe_hides_passwords() -> None:
    config = Config(
        database_url="postgresql+psycopg://app:pg-s3cret@db/app",
        amqp_url="amqp://app:mq-s3cret@mq:5672/%2F",
    )
    text = config.describe()
    assert "pg-s3cret" not in text and "mq-s3cret" not in text
    assert "app:***@db" in text and "app:***@mq" in text


def test_repr_hides_passwords() -> None:
    config = Config(
        database_url="postgresql+psycopg://app:pg-s3cret@db/app",
        amqp_url="amqp://app:mq-s3cret@mq:5672/%2F",
    )
    assert "pg-s3cret" not in repr(config)
    assert "mq-s3cret" not in repr(config)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:p4ss@h/db", "postgresql://u:***@h/db"),
        ("amqp://guest:guest@127.0.0.1:5672/%2F", "amqp://guest:***@127.0.0.1:5672/%2F"),
        ("sqlite:///x.db", "sqlite:///x.db"),
        ("mysql+pymysql://root@127.0.0.1/x", "mysql+pymysql://root@127.0.0.1/x"),
        (None, "<none>"),
    ],
)
def test_redact_url(url: str | None, expected: str) -> None:
    assert redact_url(url) == expected


def test_from_env_reads_tomqueue_variables() -> None:
    env = {
        "TOMQUEUE_DATABASE_URL": "postgresql+psycopg://u@h/db",
        "TOMQUEUE_AMQP_URL": "amqp://guest:guest@h:5672/%2F",
        "TOMQUEUE_PREFIX": "myapp",
        "TOMQUEUE_MAX_ATTEMPTS": "7",
        "TOMQUEUE_MAX_RUN_TIME": "12.5",
        "TOMQUEUE_DELAY_JOBS": "false",
        "TOMQUEUE_DESTROY_FAILED_JOBS": "yes",
    }
    config = Config.from_env(env)
    assert config.database_url == "postgresql+psycopg://u@h/db"
    assert config.uses_broker and config.prefix == "myapp"
    assert config.max_attempts == 7 and config.max_run_time == 12.5
    assert config.delay_jobs is False and config.destroy_failed_jobs is True


def test_publishing_settings_default_to_the_background_publisher_and_read_env() -> None:
    assert Config().sync_publish is False and Config().publish_retry_for == 30.0
    config = Config.from_env(
        {"TOMQUEUE_SYNC_PUBLISH": "true", "TOMQUEUE_PUBLISH_RETRY_FOR": "2.5"}
    )
    assert config.sync_publish is True and config.publish_retry_for == 2.5


def test_from_env_empty_amqp_url_means_polling() -> None:
    config = Config.from_env({"TOMQUEUE_AMQP_URL": ""})
    assert config.amqp_url is None and not config.uses_broker


def test_from_env_overrides_win() -> None:
    config = Config.from_env({"TOMQUEUE_MAX_ATTEMPTS": "7"}, max_attempts=3)
    assert config.max_attempts == 3


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("TOMQUEUE_MAX_ATTEMPTS", "many"),
        ("TOMQUEUE_DELAY_JOBS", "perhaps"),
        ("TOMQUEUE_SLEEP_DELAY", "x"),
        ("TOMQUEUE_SYNC_PUBLISH", "sometimes"),
        ("TOMQUEUE_PUBLISH_RETRY_FOR", "soon"),
    ],
)
def test_from_env_bad_value_names_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({name: raw})
    assert name in str(info.value) and raw in str(info.value)


def test_priority_map_is_immutable_and_copied() -> None:
    mapping = {0: "normal", -1: "high"}
    config = Config(priority_map=mapping)
    mapping[0] = "bulk"
    assert config.level_for(0) == "normal"
    with pytest.raises(TypeError):
        config.priority_map[5] = "low"  # type: ignore[index]


def test_default_priority_map() -> None:
    assert LEVELS == ("high", "normal", "low", "bulk")
    config = Config()
    expected = {-10: "high", -5: "high", -1: "high", 0: "normal", 1: "low", 5: "low", 10: "bulk"}
    assert dict(DEFAULT_PRIORITY_MAP) == expected
    for priority, level in expected.items():
        assert config.level_for(priority) == level


@pytest.mark.parametrize("priority", [-3, 2, 3, 11, 100, -100])
def test_unmapped_priorities_go_to_normal(priority: int) -> None:
    assert Config().level_for(priority) == "normal"


def test_custom_priority_map() -> None:
    config = Config(priority_map={0: "bulk", 3: "high"})
    assert config.level_for(0) == "bulk"
    assert config.level_for(3) == "high"
    assert config.level_for(-1) == "normal"  # not in the custom map
