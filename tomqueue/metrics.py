"""Prometheus metrics (optional: ``pip install tomqueue[metrics]``).

Without ``prometheus_client`` every call here is a no-op. A worker or deferred manager
started with ``--metrics-port`` serves ``/metrics``.

- ``tomqueue_jobs_total{outcome,queue}`` — succeeded, retry, failed, released
- ``tomqueue_job_run_seconds{queue}`` — time from lock to recorded outcome
- ``tomqueue_job_wait_seconds{queue}`` — time from ``run_at`` to lock (queue lag per job)
- ``tomqueue_deliveries_skipped_total{reason}`` — missing, stale, failed, locked, early, malformed
- ``tomqueue_deferred_held`` — notifications the deferred manager holds
- ``tomqueue_reconnects_total{role}`` — broker reconnects
- ``tomqueue_queue_lag_seconds{queue,level}`` — age of the oldest ready job, set every
  ``sweep_interval`` by the worker holding the sweeper lease
- ``tomqueue_sweep_lateness_seconds`` — per job the sweeper republished: now - run_at
- ``tomqueue_sweep_since_notified_seconds`` — per republished job that had been notified
  before: now - notified_at
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("tomqueue.metrics")

_prom: Any
try:
    import prometheus_client as _prom
except ImportError:  # pragma: no cover - exercised where the extra is not installed
    _prom = None

_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    1800,
    3600,
)


class _Noop:
    def labels(self, *_a: Any, **_k: Any) -> _Noop:
        return self

    def inc(self, *_a: Any) -> None: ...

    def observe(self, *_a: Any) -> None: ...

    def set(self, *_a: Any) -> None: ...

    def clear(self) -> None: ...


class _Remembered:
    """A labelled metric whose children are remembered by their label values:
    prometheus_client's ``labels()`` converts, validates and locks on every call (2-3 µs,
    three times per job, ~7 % of a busy worker's time). Anything else goes to the metric."""

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[Any, ...], Any] = {}

    def labels(self, *values: Any) -> Any:
        child = self._children.get(values)
        if child is None:  # two threads may both ask: labels() hands both the same child
            child = self._children[values] = self._metric.labels(*values)
        return child

    def clear(self) -> None:
        self._children = {}
        self._metric.clear()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._metric, name)


def _make(kind: str, name: str, doc: str, labels: tuple[str, ...] = ()) -> Any:
    if _prom is None:
        return _Noop()
    if kind == "histogram":
        metric = _prom.Histogram(name, doc, labels, buckets=_BUCKETS)
    else:
        metric = getattr(_prom, kind.capitalize())(name, doc, labels)
    return _Remembered(metric) if labels else metric


JOBS = _make("counter", "tomqueue_jobs", "Jobs by recorded outcome", ("outcome", "queue"))
RUN_SECONDS = _make("histogram", "tomqueue_job_run_seconds", "Lock to outcome", ("queue",))
WAIT_SECONDS = _make("histogram", "tomqueue_job_wait_seconds", "run_at to lock", ("queue",))
SKIPPED = _make("counter", "tomqueue_deliveries_skipped", "Deliveries not run", ("reason",))
DEFERRED_HELD = _make("gauge", "tomqueue_deferred_held", "Held deferred notifications")
RECONNECTS = _make("counter", "tomqueue_reconnects", "Broker reconnects", ("role",))
QUEUE_LAG = _make(
    "gauge", "tomqueue_queue_lag_seconds", "Age of the oldest ready job", ("queue", "level")
)
SWEEP_LATENESS = _make(
    "histogram", "tomqueue_sweep_lateness_seconds", "Republished by the sweeper: now - run_at"
)
SWEEP_SINCE_NOTIFIED = _make(
    "histogram",
    "tomqueue_sweep_since_notified_seconds",
    "Republished by the sweeper: now - notified_at",
)


def serve(port: int, addr: str = "127.0.0.1") -> bool:
    """Serve ``/metrics`` on ``addr:port``; False (logged) without prometheus_client."""
    if _prom is None:
        log.warning(
            "--metrics-port given but prometheus_client is not installed "
            "(pip install 'tomqueue[metrics]')"
        )
        return False
    _prom.start_http_server(port, addr=addr)
    log.info("serving metrics on http://%s:%d/metrics", addr, port)
    return True
