"""Delayed method calls: ``tomqueue.delay(obj).method(args)`` and ``handle_asynchronously``.

The target (a module-level function, a class, or an object of a module-level class) and the
arguments are stored in a ``PerformableMethod`` handler; the worker needs the target's
module in its ``--import`` list.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from tomqueue.errors import EnqueueError

F = TypeVar("F", bound=Callable[..., Any])


class PerformableMethod:
    """The payload of a delayed call: ``target.method(*args, **kwargs)``."""

    def __init__(
        self, target: Any, method: str | None, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if method is not None and (not method.isidentifier() or method.startswith("_")):
            raise EnqueueError(f"cannot delay private or invalid method name {method!r}")
        if method is not None and not callable(getattr(target, method, None)):
            raise EnqueueError(f"{type(target).__name__} has no method {method!r}")
        if method is None and not callable(target):
            raise EnqueueError(f"{target!r} is not callable")
        self.target = target
        self.method = method
        self.args = list(args)
        self.kwargs = kwargs

    @property
    def display_name(self) -> str:
        if self.method is None:
            return getattr(self.target, "__qualname__", repr(self.target))
        owner = self.target if isinstance(self.target, type) else type(self.target)
        return f"{owner.__qualname__}#{self.method}"

    def perform(self) -> Any:
        fn = self.target if self.method is None else getattr(self.target, self.method)
        original = getattr(fn, "_tomqueue_original", None)
        if original is not None:  # a handle_asynchronously wrapper: run the real function
            fn = original.__get__(self.target) if self.method else original
        return fn(*self.args, **self.kwargs)


class DelayProxy:
    """``delay(obj, priority=...)`` returns this; calling a method enqueues the call."""

    def __init__(self, target: Any, options: dict[str, Any]) -> None:
        self._target = target
        self._options = options

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            from tomqueue.enqueue import enqueue

            return enqueue(PerformableMethod(self._target, name, args, kwargs), **self._options)

        return call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from tomqueue.enqueue import enqueue

        return enqueue(PerformableMethod(self._target, None, args, kwargs), **self._options)


def delay(target: Any, **options: Any) -> DelayProxy:
    """``delay(obj).method(*args)`` or ``delay(func)(*args)``: enqueue the call.

    Options are enqueue's: ``priority``, ``run_at``, ``queue``, ``session``, ``connection``.
    """
    return DelayProxy(target, options)


def handle_asynchronously(fn: F | None = None, **options: Any) -> Any:
    """Decorator: calling the function (or method) enqueues it instead of running it."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if "." in func.__qualname__ and args:  # a method: args[0] is self
                return delay(args[0], **options).__getattr__(func.__name__)(*args[1:], **kwargs)
            return delay(wrapper, **options)(*args, **kwargs)

        wrapper._tomqueue_original = func  # type: ignore[attr-defined]
        wrapper.now = func  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate(fn) if fn is not None else decorate
