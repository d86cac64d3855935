"""The long-running processes settle the garbage collector once they have started."""

from __future__ import annotations

import argparse
import gc
import os
from collections.abc import Iterator
from typing import Any

import pytest

import deferred.manager
import tomqueue.worker.process
from tomqueue import cli, runtime


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_settle_gc_freezes_what_start_up_made_and_collects_young_objects_less_often(
    restored_gc: None,
) -> None:
    gc.set_threshold(700, 10, 10)
    runtime.settle_gc()
    assert gc.get_freeze_count() > 10_000  # the modules, classes and their objects
    assert gc.get_threshold() == (runtime.GC_YOUNG_THRESHOLD, 10, 10)


class _Recorder:
    def __init__(self, steps: list[str], *_a: Any, **_k: Any) -> None:
        self.steps = steps
        steps.append("start-up")

    def run(self) -> int:
        self.steps.append("run")
        return 0


def test_the_worker_settles_the_collector_after_start_up_and_before_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    steps: list[str] = []
    monkeypatch.setattr(cli, "settle_gc", lambda: steps.append("settle"))
    monkeypatch.setattr(
        tomqueue.worker.process, "Worker", lambda *a, **k: _Recorder(steps, *a, **k)
    )
    monkeypatch.setattr(cli, "_config", lambda: None)
    args = argparse.Namespace(
        processes=1, metrics_port=None, imports=[], queues=[], threads=1,
        min_priority=None, max_priority=None, exit_on_complete=True,
    )  # fmt: skip
    assert cli.cmd_worker(args) == 0
    assert steps == ["start-up", "settle", "run"]


def test_the_deferred_manager_settles_the_collector_before_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    steps: list[str] = []
    monkeypatch.setattr(deferred.manager, "settle_gc", lambda: steps.append("settle"))
    monkeypatch.setattr(deferred.manager, "Manager", lambda *a, **k: _Recorder(steps, *a, **k))
    monkeypatch.setattr(deferred.manager, "setup_logging", lambda *a, **k: None)
    monkeypatch.setenv("TOMQUEUE_DATABASE_URL", "sqlite://")
    assert deferred.manager.main([]) == 0
    assert steps == ["start-up", "settle", "run"]


def test_current_pid_is_the_process_id_in_a_forked_child_too() -> None:
    """The engines' and publishers' caches key on it: a child must see its own id."""
    assert runtime.current_pid() == os.getpid()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.write(write, f"{runtime.current_pid()} {os.getpid()}".encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        seen, actual = (int(n) for n in pipe.read().split())
    os.waitpid(child, 0)
    assert seen == actual != os.getpid()
