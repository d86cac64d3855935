"""``enqueue_many`` pauses the cyclic garbage collector while it stores a batch, and gives
it back as it found it (bench/README.md, tomqueue/runtime.py: a third of its time went to
full collections set off by the batch's own objects)."""

from __future__ import annotations

import gc
import importlib
from collections.abc import Iterator
from typing import Any

import pytest

from tomqueue import Config, EnqueueError, enqueue_many
from tomqueue.runtime import collector_paused

SEEN: list[bool] = []


class Probe:
    """Records, in its enqueue hook and in ``perform``, whether the collector runs."""

    def enqueue(self, job: Any) -> None:
        SEEN.append(gc.isenabled())

    def perform(self) -> None:
        SEEN.append(gc.isenabled())


@pytest.fixture(autouse=True)
def collector_on() -> Iterator[None]:
    SEEN.clear()
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_the_collector_is_paused_while_a_batch_is_stored(sqlite_config: Config) -> None:
    jobs = enqueue_many([Probe(), Probe()], config=sqlite_config)
    assert [j.id for j in jobs] and all(j.id for j in jobs)
    assert SEEN == [False, False]
    assert gc.isenabled()


def test_the_collector_runs_again_after_a_refused_batch(sqlite_config: Config) -> None:
    with pytest.raises(EnqueueError):
        enqueue_many([Probe(), Probe()], priority="high", config=sqlite_config)  # type: ignore[arg-type]
    assert gc.isenabled()


def test_a_collector_the_application_disabled_stays_disabled(sqlite_config: Config) -> None:
    gc.disable()
    enqueue_many([Probe()], config=sqlite_config)
    assert SEEN == [False]
    assert not gc.isenabled()


def test_jobs_run_inline_with_the_collector_on(sqlite_config: Config) -> None:
    """``delay_jobs=False`` runs the jobs in the call: user code, not a batch to store."""
    enqueue_many([Probe()], config=sqlite_config.replace(delay_jobs=False))
    assert SEEN == [True, True]  # the hook, then perform


def test_nested_pauses_leave_the_collector_to_the_outer_one() -> None:
    with collector_paused():
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner one found it paused: leaves it so
    assert gc.isenabled()


def test_the_collector_runs_again_before_the_notifications_are_published(
    sqlite_config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A synchronous publish waits for the broker's confirms: not with the collector off."""
    enqueue_module = importlib.import_module(
        "tomqueue.enqueue"
    )  # the package's name is the function
    monkeypatch.setattr(
        enqueue_module, "publish", lambda notes, config: SEEN.append(gc.isenabled())
    )
    enqueue_many([Probe()], config=sqlite_config)
    assert SEEN == [False, True]  # the hook, then the publish
