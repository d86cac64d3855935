"""The command-line processes' own log formats."""

from __future__ import annotations

import logging

import pytest

from tomqueue import logconfig


def _record(created: float) -> logging.LogRecord:
    record = logging.LogRecord("tomqueue.worker", logging.INFO, "", 0, "job %s", (7,), None)
    record.created, record.msecs = created, (created - int(created)) * 1000
    return record


def test_the_text_format_writes_what_logging_formatter_would_across_seconds() -> None:
    ours, stock = logconfig.TextFormatter(), logging.Formatter(logconfig.TEXT_FORMAT)
    for created in (1_780_000_000.0, 1_780_000_000.999, 1_780_000_001.5, 1_780_000_000.25):
        assert ours.format(_record(created)) == stock.format(_record(created))


def test_our_formats_skip_the_callers_file_line_and_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(logging, "_srcfile", logging._srcfile)
    monkeypatch.setattr(logging, "logThreads", True)
    monkeypatch.setattr(logging, "logMultiprocessing", True)
    logconfig.setup("text", env={})
    assert isinstance(root.handlers[0].formatter, logconfig.TextFormatter)
    assert logging._srcfile is None and not logging.logThreads
    record = logging.getLogger("tomqueue.test").makeRecord(
        "tomqueue.test", logging.INFO, "f.py", 3, "m", (), None
    )
    assert record.threadName is None
