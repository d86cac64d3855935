"""Lifecycle callbacks, like Delayed::Job's plugins: ``before``/``after`` named events.

Events: ``enqueue`` (job), ``perform`` (job, payload), ``error`` (job, exc), ``failure`` (job).

    from tomqueue import lifecycle
    lifecycle.before("perform", lambda job, payload: ...)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

EVENTS = ("enqueue", "perform", "error", "failure")
_callbacks: dict[tuple[str, str], list[Callable[..., Any]]] = {}
_lock = threading.Lock()


def _register(when: str, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    if name not in EVENTS:
        raise ValueError(f"unknown lifecycle event {name!r}; events are {EVENTS}")
    with _lock:
        _callbacks.setdefault((when, name), []).append(fn)
    return fn


def before(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    return _register("before", name, fn)


def after(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    return _register("after", name, fn)


def run(when: str, name: str, *args: Any) -> None:
    for fn in list(_callbacks.get((when, name), ())):
        fn(*args)


def reset() -> None:
    with _lock:
        _callbacks.clear()
