"""Failpoints for fault-injection tests: named places where a test can make a process die.

    TOMQUEUE_FAILPOINTS="worker.after_lock=kill9,worker.after_record=exit"

Actions: ``kill9`` (SIGKILL self), ``exit`` (``os._exit(1)``), ``abort`` (``os.abort()``),
``sleep:<seconds>``, ``raise`` (RuntimeError). When the variable is unset, ``hit`` is a dict
lookup on an empty dict.
"""

from __future__ import annotations

import os
import signal
import time

_ACTIONS: dict[str, str] = {}


def _load() -> None:
    _ACTIONS.clear()
    for item in os.environ.get("TOMQUEUE_FAILPOINTS", "").split(","):
        name, _, action = item.strip().partition("=")
        if name and action:
            _ACTIONS[name] = action


def hit(name: str) -> None:
    """Run the action configured for failpoint ``name``, if any."""
    action = _ACTIONS.get(name)
    if action is None:
        return
    if action == "kill9":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "exit":
        os._exit(1)
    elif action == "abort":
        os.abort()
    elif action.startswith("sleep:"):
        time.sleep(float(action.split(":", 1)[1]))
    elif action == "raise":
        raise RuntimeError(f"failpoint {name}")


_load()
