"""``tracing.active()``: the per-enqueue check that a tracer provider is set. While none is,
it reads OpenTelemetry's global instead of calling ``get_tracer_provider()``; a provider
set later, one named by the environment, and an OpenTelemetry without that global are
still found. (tests/integration/test_tracing.py covers the spans themselves.)"""

from __future__ import annotations

from typing import Any

import pytest

trace = pytest.importorskip("opentelemetry.trace")
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")

from tomqueue import tracing  # noqa: E402


@pytest.fixture
def unset(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No provider set and none seen yet (whatever earlier tests of the session set)."""
    monkeypatch.setattr(tracing, "_active", False)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(tracing, "_PROVIDER_FROM_ENV", False)
    return monkeypatch


def count_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """``get_tracer_provider`` counted; it answers as with nothing set."""
    calls: list[int] = []

    def counted() -> Any:
        calls.append(1)
        return trace.ProxyTracerProvider()

    monkeypatch.setattr(trace, "get_tracer_provider", counted)
    return calls


def test_without_a_provider_the_public_call_is_skipped(unset: pytest.MonkeyPatch) -> None:
    calls = count_calls(unset)
    assert not tracing.active()
    assert not tracing.active()
    assert calls == []


def test_a_provider_set_after_the_first_check_is_found(unset: pytest.MonkeyPatch) -> None:
    assert not tracing.active()
    unset.setattr(trace, "_TRACER_PROVIDER", sdk_trace.TracerProvider())
    assert tracing.active()
    unset.setattr(trace, "_TRACER_PROVIDER", None)  # once seen, it stays seen (set once)
    assert tracing.active()


def test_a_provider_named_by_the_environment_asks_the_public_call(
    unset: pytest.MonkeyPatch,
) -> None:
    unset.setattr(tracing, "_PROVIDER_FROM_ENV", True)
    calls = count_calls(unset)
    assert not tracing.active()
    assert calls == [1]


def test_an_opentelemetry_without_the_global_asks_the_public_call(
    unset: pytest.MonkeyPatch,
) -> None:
    unset.delattr(trace, "_TRACER_PROVIDER")
    calls = count_calls(unset)
    assert not tracing.active()
    assert calls == [1]
