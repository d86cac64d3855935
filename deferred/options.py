"""Settings of the deferred manager that are not (yet) fields of ``tomqueue.Config``.

| option | env var | default |
| --- | --- | --- |
| ``--refresh-interval SECONDS`` | ``TOMQUEUE_DEFERRED_REFRESH`` | 600 |
| ``--stats-interval SECONDS`` | ``TOMQUEUE_DEFERRED_STATS_INTERVAL`` | 30 |
| ``--log-format text|json`` | ``TOMQUEUE_LOG_FORMAT`` | text |
| ``--log-config FILE`` | ``TOMQUEUE_LOG_CONFIG`` | — (see ``tomqueue.logconfig``) |

The refresh interval is the longest the manager holds one delivery. RabbitMQ closes a
channel whose delivery stays unacknowledged past ``consumer_timeout`` (30 min by default),
so the interval must stay below it; the manager republishes a fresh copy of every job held
that long and acknowledges the old delivery.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tomqueue.errors import ConfigError
from tomqueue.logconfig import add_options as add_log_options

DEFAULT_REFRESH = 600.0
DEFAULT_STATS_INTERVAL = 30.0
MIN_REFRESH = 1.0
MAX_REFRESH = 1799.0  # below RabbitMQ's default consumer_timeout of 1800 s
REFRESH_ENV = "TOMQUEUE_DEFERRED_REFRESH"
STATS_ENV = "TOMQUEUE_DEFERRED_STATS_INTERVAL"


@dataclass(frozen=True)
class Options:
    refresh_interval: float = DEFAULT_REFRESH
    stats_interval: float = DEFAULT_STATS_INTERVAL
    verbose: bool = False
    metrics_port: int | None = None
    log_format: str | None = None  # None: TOMQUEUE_LOG_FORMAT, else text
    log_config: str | None = None  # None: TOMQUEUE_LOG_CONFIG, if set


def check_refresh(value: float, source: str = "refresh_interval") -> float:
    if not (isinstance(value, int | float) and math.isfinite(value)):
        raise ConfigError(f"{source} must be a number of seconds, got {value!r}")
    if not MIN_REFRESH <= value <= MAX_REFRESH:
        raise ConfigError(
            f"{source} must be between {MIN_REFRESH:g} and {MAX_REFRESH:g} seconds "
            f"(below RabbitMQ's consumer_timeout, 1800 s by default), got {value!r}"
        )
    return float(value)


def check_stats(value: float, source: str = "stats_interval") -> float:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{source} must be > 0 seconds, got {value!r}")
    return float(value)


def _env_seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deferred",
        description="TomQueue deferred manager: holds future jobs' notifications and "
        "publishes each to the work exchange when it is due.",
    )
    p.add_argument(
        "--refresh-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"longest time one delivery is held before a fresh copy replaces it "
        f"(env {REFRESH_ENV}, default {DEFAULT_REFRESH:g})",
    )
    p.add_argument(
        "--stats-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"how often to log the held count and next due time "
        f"(env {STATS_ENV}, default {DEFAULT_STATS_INTERVAL:g})",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on 127.0.0.1:PORT",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_log_options(p)
    return p


def parse(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Options:
    """Options from the command line, then the environment, then defaults (validated)."""
    env = os.environ if env is None else env
    args = parser().parse_args(list(argv))
    if args.refresh_interval is not None:
        refresh = check_refresh(args.refresh_interval, "--refresh-interval")
    else:
        refresh = check_refresh(_env_seconds(env, REFRESH_ENV, DEFAULT_REFRESH), REFRESH_ENV)
    if args.stats_interval is not None:
        stats = check_stats(args.stats_interval, "--stats-interval")
    else:
        stats = check_stats(_env_seconds(env, STATS_ENV, DEFAULT_STATS_INTERVAL), STATS_ENV)
    return Options(
        refresh, stats, bool(args.verbose), args.metrics_port, args.log_format, args.log_config
    )
