"""One frozen, validated configuration object.

Built from keyword arguments, environment variables (``Config.from_env``) or both; every
field is checked once, here, and an error names the field and the constraint it broke.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tomqueue.errors import ConfigError

LEVELS: tuple[str, ...] = ("high", "normal", "low", "bulk")
"""Priority levels, most urgent first."""

DEFAULT_PRIORITY_MAP: Mapping[int, str] = MappingProxyType(
    {-10: "high", -5: "high", -1: "high", 0: "normal", 1: "low", 5: "low", 10: "bulk"}
)
DEFAULT_QUEUE = "balance"
QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

ExceptionReporter = Callable[[BaseException], Any]


def redact_url(url: str | None) -> str:
    """The URL with its password replaced by ``***``: safe for logs and messages."""
    if not url:
        return "<none>"
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


_names_given = itertools.count(1)


def default_worker_name() -> str:
    """``host:<hostname> pid:<pid>``, Delayed::Job's format; a second worker in the same
    process gets ``pid:<pid>.2`` and so on, so every live worker's name is unique."""
    n = next(_names_given)
    suffix = "" if n == 1 else f".{n}"
    return f"host:{socket.gethostname()} pid:{os.getpid()}{suffix}"


@dataclass(frozen=True)
class Config:
    """Every setting of TomQueue. Frozen: build a new one with ``replace``."""

    database_url: str = "sqlite:///tomqueue.sqlite3"
    amqp_url: str | None = None
    prefix: str = "tomqueue"
    # Delayed::Job worker settings
    max_attempts: int = 25
    max_run_time: float = 4 * 3600.0
    default_priority: int = 0
    default_queue: str = DEFAULT_QUEUE
    sleep_delay: float = 5.0
    destroy_failed_jobs: bool = False
    read_ahead: int = 5
    delay_jobs: bool = True
    priority_map: Mapping[int, str] = field(default_factory=lambda: DEFAULT_PRIORITY_MAP)
    # TomQueue settings
    run_at_tolerance: float = 0.25
    # the deferred manager publishes a job this early (never more than run_at_tolerance);
    # the worker locks it and starts it at its run_at, so the publish → lock path is not
    # part of its lateness
    release_ahead: float = 0.05
    delivery_hold_limit: float = 300.0
    stop_grace: float = 30.0
    timeout_grace: float = 5.0
    publish_timeout: float = 10.0
    # enqueue returns after the commit and the hand-off to this process's background
    # publisher; sync_publish=True makes it wait for the broker's confirm as well
    sync_publish: bool = False
    # how long the background publisher re-sends an unconfirmed notification before it
    # gives up on it (logged, reported; the sweeper delivers the job)
    publish_retry_for: float = 30.0
    heartbeat_interval: float = 5.0
    lease_timeout: float = 60.0
    max_crashes: int = 3
    sweep_interval: float = 30.0
    sweep_quiet: float = 60.0
    exception_reporter: ExceptionReporter | None = None

    def __post_init__(self) -> None:
        _validate(self)
        object.__setattr__(self, "priority_map", MappingProxyType(dict(self.priority_map)))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Settings from ``TOMQUEUE_*`` variables, then keyword overrides."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"TOMQUEUE_{f.name.upper()}")
            if raw is None or f.name in ("priority_map", "exception_reporter"):
                continue
            values[f.name] = _parse_env(f.name, raw, cls.__dataclass_fields__[f.name].default)
        values.update(overrides)
        return cls(**values)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={redact_url(getattr(self, f.name))!r}"
            if f.name in ("database_url", "amqp_url")
            else f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
        )
        return f"Config({shown})"

    __str__ = __repr__

    def replace(self, **changes: Any) -> Config:
        return replace(self, **changes)

    @property
    def release_lead(self) -> float:
        """How early the deferred manager publishes a due job: ``release_ahead``, never more
        than ``run_at_tolerance`` (a worker defers again a job that arrives earlier)."""
        return min(self.release_ahead, self.run_at_tolerance)

    def level_for(self, priority: int) -> str:
        """The notification level of a Delayed::Job integer priority (unmapped: normal)."""
        return self.priority_map.get(priority, "normal")

    @property
    def uses_broker(self) -> bool:
        return bool(self.amqp_url)

    def describe(self) -> str:
        """A password-free one-line summary for logs and CLI output."""
        return (
            f"database={redact_url(self.database_url)} "
            f"broker={redact_url(self.amqp_url) if self.amqp_url else '<none: db polling>'} "
            f"prefix={self.prefix}"
        )


def _parse_env(name: str, raw: str, default: Any) -> Any:
    if name == "amqp_url":
        return raw or None
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ConfigError(
            f"TOMQUEUE_{name.upper()}={raw!r} is not a valid {type(default).__name__}"
        ) from None
    return raw


def _require(ok: bool, name: str, constraint: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name} {constraint}, got {value!r}")


def _seconds(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


_POSITIVE_INTS = ("max_attempts", "read_ahead", "max_crashes")
_POSITIVE_SECONDS = (
    "max_run_time",
    "sleep_delay",
    "delivery_hold_limit",
    "publish_timeout",
    "publish_retry_for",
    "heartbeat_interval",
    "lease_timeout",
    "sweep_interval",
    "sweep_quiet",
)
_NONNEGATIVE_SECONDS = ("run_at_tolerance", "release_ahead", "stop_grace", "timeout_grace")


def _validate(c: Config) -> None:
    _validate_names(c)
    _validate_numbers(c)
    _validate_relations(c)
    for key, level in dict(c.priority_map).items():
        _require(isinstance(key, int), "priority_map", "keys must be integers", key)
        _require(level in LEVELS, "priority_map", f"values must be one of {LEVELS}", level)
    _require(
        c.exception_reporter is None or callable(c.exception_reporter),
        "exception_reporter",
        "must be callable",
        c.exception_reporter,
    )


def _validate_names(c: Config) -> None:
    url_ok = isinstance(c.database_url, str) and c.database_url.split(":", 1)[0].split("+", 1)[
        0
    ] in ("postgresql", "mysql", "sqlite")
    _require(
        url_ok,
        "database_url",
        "must be a SQLAlchemy URL for postgresql, mysql or sqlite",
        redact_url(c.database_url) if isinstance(c.database_url, str) else c.database_url,
    )
    if c.amqp_url:
        _require(
            c.amqp_url.startswith(("amqp://", "amqps://")),
            "amqp_url",
            "must start with amqp:// or amqps://",
            redact_url(c.amqp_url),
        )
    _require(
        bool(re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", c.prefix)),
        "prefix",
        "must be 1-100 letters, digits, '_', '.' or '-'",
        c.prefix,
    )
    _require(
        bool(QUEUE_NAME_RE.match(c.default_queue)),
        "default_queue",
        "must be 1-64 letters, digits, '_' or '-'",
        c.default_queue,
    )


def _validate_numbers(c: Config) -> None:
    for name in ("destroy_failed_jobs", "delay_jobs", "sync_publish"):
        value = getattr(c, name)
        _require(isinstance(value, bool), name, "must be True or False", value)
    for name in _POSITIVE_INTS:
        value = getattr(c, name)
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        _require(ok, name, "must be an integer >= 1", value)
    _require(
        isinstance(c.default_priority, int),
        "default_priority",
        "must be an integer",
        c.default_priority,
    )
    for name in _POSITIVE_SECONDS:
        value = getattr(c, name)
        _require(_seconds(value) and value > 0, name, "must be > 0 seconds", value)
    for name in _NONNEGATIVE_SECONDS:
        value = getattr(c, name)
        _require(_seconds(value) and value >= 0, name, "must be >= 0 seconds", value)


def _validate_relations(c: Config) -> None:
    _require(c.read_ahead <= 65535, "read_ahead", "must be <= 65535 (AMQP prefetch)", c.read_ahead)
    _require(
        c.lease_timeout >= 3 * c.heartbeat_interval,
        "lease_timeout",
        f"must be at least 3 heartbeat intervals ({3 * c.heartbeat_interval:g} s)",
        c.lease_timeout,
    )
    _require(
        c.delivery_hold_limit < 1800,
        "delivery_hold_limit",
        "must stay below RabbitMQ's consumer_timeout (1800 s)",
        c.delivery_hold_limit,
    )


_current: Config | None = None


def configure(config: Config | None = None, **settings: Any) -> Config:
    """Set the process-wide configuration (from the environment plus ``settings``)."""
    global _current
    _current = config.replace(**settings) if config else Config.from_env(**settings)
    return _current


def current() -> Config:
    """The process-wide configuration; read from the environment on first use."""
    global _current
    if _current is None:
        _current = Config.from_env()
    return _current
