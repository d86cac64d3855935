"""Example jobs for the quick start: ``python -m examples.quickstart``."""

from __future__ import annotations

import logging

log = logging.getLogger("examples")


class Greet:
    """A Delayed::Job-style payload: any object with ``perform()``."""

    max_attempts = 3

    def __init__(self, name: str) -> None:
        self.name = name

    def perform(self) -> None:
        print(f"hello, {self.name}", flush=True)


def add(a: int, b: int) -> None:
    print(f"{a} + {b} = {a + b}", flush=True)
