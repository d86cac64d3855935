"""The worker stack — the order of the layers, written once.

    error_handling ▸ pop ▸ db_lock ▸ timeout ▸ invoke

The first three are *batch layers*: they work on a batch of deliveries at once, so a batch
shares one lock statement, one commit and one round of acks. Each has two halves over a
batch, ``enter(batch, call_next)`` on the way down and ``leave(batch, call_next)`` on the way
back up once the jobs have run; a layer that is done with a delivery on the way down
(``work.stop(reason)``) sends it straight back up. The last two are *job layers*:
``layer(work, call_next)`` around one job, in one job thread. ``pipeline.py`` runs the
halves in their threads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from tomqueue.worker import db_lock, error_handling, invoke, pop, timeout
from tomqueue.worker.work import Batch, BatchNext, Next, Work


class BatchLayer(Protocol):
    def enter(self, batch: Batch, call_next: BatchNext) -> None: ...

    def leave(self, batch: Batch, call_next: BatchNext) -> None: ...


T = TypeVar("T")
JobLayer = Callable[[Work, Next], None]

BATCH_LAYERS: Sequence[BatchLayer] = (error_handling, pop, db_lock)
JOB_LAYERS: Sequence[JobLayer] = (timeout.layer, invoke.layer)


def descend(bottom: BatchNext) -> BatchNext:
    """The way down through the batch layers; ``bottom`` gets what is left to run."""
    call = bottom
    for layer in reversed(BATCH_LAYERS):
        call = _bind(layer.enter, call)
    return call


def ascend() -> BatchNext:
    """The way back up: each layer's ``leave``, innermost first, outermost around all."""
    call: BatchNext = _nothing
    for layer in reversed(BATCH_LAYERS):
        call = _bind(layer.leave, call)
    return call


def job() -> Next:
    """The job layers composed: ``job()(work)`` runs one locked job."""
    call: Next = _nothing
    for layer in reversed(JOB_LAYERS):
        call = _bind(layer, call)
    return call


def _nothing(_value: object) -> None:
    return None


def _bind(
    layer: Callable[[T, Callable[[T], None]], None], call_next: Callable[[T], None]
) -> Callable[[T], None]:
    return lambda value: layer(value, call_next)
