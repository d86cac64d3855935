"""The worker stack — the order of the layers, written once.

    error_handling ▸ pop ▸ db_lock ▸ timeout ▸ invoke

Each layer is ``layer(work, call_next)``: it does its part on the one ``Work`` value and
calls the rest of the stack.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tomqueue.worker import db_lock, error_handling, invoke, pop, timeout
from tomqueue.worker.work import Next, Work

Layer = Callable[[Work, Next], None]

LAYERS: Sequence[Layer] = (
    error_handling.layer,
    pop.layer,
    db_lock.layer,
    timeout.layer,
    invoke.layer,
)


def build(layers: Sequence[Layer] = LAYERS) -> Next:
    """Compose layers into one callable: ``build()(work)`` runs the whole stack."""

    def bottom(_work: Work) -> None:
        return None

    call: Next = bottom
    for layer in reversed(layers):
        call = _bind(layer, call)
    return call


def _bind(layer: Layer, call_next: Next) -> Next:
    return lambda work: layer(work, call_next)


run = build()
