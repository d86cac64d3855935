"""Logging of the command-line processes (``tomqueue ...``, ``python -m deferred``).

The library never configures handlers; only these entry points do, and only for
themselves:

- ``--log-format text`` (default): ``time LEVEL logger pid=N message`` on stderr.
- ``--log-format json`` (or ``TOMQUEUE_LOG_FORMAT=json``): one JSON object per line on
  stderr, for log shippers. Keys: ``time`` (ISO 8601 UTC), ``level``, ``logger``,
  ``message``, ``pid``, ``exception`` (when there is one), and every ``extra`` key the
  record carries — the stable ones are ``job_id``, ``job_class``, ``queue``, ``action``,
  ``duration`` (jobs), ``held``, ``next_due``, ``published`` (deferred manager) and
  ``republished``, ``lateness``, ``since_notified`` (sweeper).
- ``--log-config FILE`` (or ``TOMQUEUE_LOG_CONFIG``): the user's own configuration,
  ``.json`` / ``.yaml`` / ``.yml`` for ``logging.config.dictConfig`` (YAML needs PyYAML),
  anything else for ``logging.config.fileConfig``. It replaces the two above; a formatter
  there may use ``tomqueue.logconfig.JsonFormatter``. ``disable_existing_loggers``
  defaults to false here (tomqueue's loggers exist before the file is read).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import logging.config
import os
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tomqueue.errors import ConfigError

FORMATS = ("text", "json")
FORMAT_ENV = "TOMQUEUE_LOG_FORMAT"
CONFIG_ENV = "TOMQUEUE_LOG_CONFIG"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s pid=%(process)d %(message)s"

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, pid and the extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``; the time's date and seconds are formatted once per second (the
    worker writes a line per job, and ``strftime`` was close to half of formatting one)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second, text = self._second
        if int(record.created) != second:
            second = int(record.created)
            text = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(record.created))
            self._second = (second, text)
        return f"{text},{int(record.msecs):03d}"


def add_options(parser: argparse.ArgumentParser, default: object = None) -> None:
    """``--log-format`` and ``--log-config`` on a command's parser."""
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default=default,
        help=f"text (default) or json: one JSON object per line (env {FORMAT_ENV})",
    )
    parser.add_argument(
        "--log-config",
        default=default,
        metavar="FILE",
        help=f"logging config: .json/.yaml for dictConfig, else fileConfig (env {CONFIG_ENV})",
    )


def _utc(created: float) -> str:
    moment = datetime.fromtimestamp(created, UTC).replace(tzinfo=None)
    return moment.isoformat(timespec="milliseconds") + "Z"


def setup(
    log_format: str | None = None,
    config_file: str | None = None,
    verbose: bool = False,
    env: Mapping[str, str] | None = None,
) -> None:
    """Configure logging for a CLI process: options first, then the environment. A
    process whose root logger already has handlers (embedded, tests) keeps them, unless
    a configuration file is given."""
    env = os.environ if env is None else env
    config_file = config_file or env.get(CONFIG_ENV) or None
    if config_file:
        load_config_file(config_file)
        return
    log_format = (log_format or env.get(FORMAT_ENV) or "text").strip().lower()
    if log_format not in FORMATS:
        raise ConfigError(f"log format must be one of {', '.join(FORMATS)}, got {log_format!r}")
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root.addHandler(handler)
    _skip_unused_record_fields()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # tomqueue logs its own clear line for broker trouble; pika's tracebacks add noise
    logging.getLogger("pika").setLevel(logging.DEBUG if verbose else logging.CRITICAL)


def _skip_unused_record_fields() -> None:
    """Neither of our formats shows the caller's file and line or the thread's name:
    records skip looking them up (the logging HOWTO's "Optimization"; ~15 % of a record's
    cost). A ``--log-config`` file, which may show them, keeps them."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False


def load_config_file(path: str) -> None:
    """dictConfig from JSON or YAML, fileConfig otherwise; a clear error if it fails."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"log config {path}: no such file")
    try:
        if file.suffix.lower() in (".json", ".yaml", ".yml"):
            config = json.loads(file.read_text()) if file.suffix == ".json" else _yaml(file)
            if not isinstance(config, dict):
                raise ConfigError(f"log config {path}: expected a mapping (dictConfig schema)")
            # tomqueue's loggers exist by now: keep them unless the file says otherwise
            config.setdefault("disable_existing_loggers", False)
            logging.config.dictConfig(config)
        else:
            logging.config.fileConfig(file, disable_existing_loggers=False)
    except ConfigError:
        raise
    except Exception as exc:  # json, yaml, configparser and logging's own ValueError
        raise ConfigError(f"log config {path}: {type(exc).__name__}: {exc}") from None


def _yaml(file: Path) -> Any:
    try:
        yaml: Any = importlib.import_module("yaml")  # optional: PyYAML
    except ImportError:
        raise ConfigError(
            f"log config {file}: YAML needs PyYAML (pip install pyyaml), or use .json"
        ) from None
    return yaml.safe_load(file.read_text())
