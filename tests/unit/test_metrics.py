"""Metrics: a labelled metric's children are looked up once per label values."""

from __future__ import annotations

from typing import Any

import pytest

from tomqueue import metrics

prometheus_client = pytest.importorskip("prometheus_client")


def _sample(name: str, labels: dict[str, str]) -> Any:
    return prometheus_client.REGISTRY.get_sample_value(name, labels)


def test_labels_are_looked_up_once_and_counts_still_add_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    family = metrics.JOBS
    calls: list[tuple[Any, ...]] = []
    real = family._metric.labels

    def counting(*values: Any) -> Any:
        calls.append(values)
        return real(*values)

    monkeypatch.setattr(family._metric, "labels", counting)
    labels = {"outcome": "succeeded", "queue": "unit-metrics"}
    before = _sample("tomqueue_jobs_total", labels) or 0.0
    for _ in range(5):
        family.labels("succeeded", "unit-metrics").inc()
    assert _sample("tomqueue_jobs_total", labels) == before + 5
    assert calls == [("succeeded", "unit-metrics")]


def test_clear_forgets_the_children() -> None:
    labels = {"queue": "unit-metrics", "level": "high"}
    metrics.QUEUE_LAG.labels("unit-metrics", "high").set(3)
    metrics.QUEUE_LAG.clear()
    assert _sample("tomqueue_queue_lag_seconds", labels) is None
    metrics.QUEUE_LAG.labels("unit-metrics", "high").set(4)
    assert _sample("tomqueue_queue_lag_seconds", labels) == 4.0
