"""Other job queues as reference points for W1, when they happen to be installed.

Nothing is installed for this: Celery and Dramatiq are only detected. Running them needs
their own broker set-up and worker processes; until someone writes those runners, the
suite reports which ones are importable.
"""

from __future__ import annotations

import importlib.util
from typing import Any

CANDIDATES = ("celery", "dramatiq")


def detect() -> dict[str, Any]:
    """``{name: {"importable": bool, "note": ...}}`` for each candidate."""
    out: dict[str, Any] = {}
    for name in CANDIDATES:
        found = importlib.util.find_spec(name) is not None
        out[name] = {
            "importable": found,
            "note": (
                "importable, but its W1 runner is not written yet"
                if found
                else "not installed (not installed by the benchmark on purpose): skipped"
            ),
        }
    return out
