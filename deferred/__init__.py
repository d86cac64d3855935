"""TomQueue's deferred manager: the process that releases future jobs when they are due.

Run it next to the workers (``python -m deferred`` or ``tomqueue deferred``), with the same
``TOMQUEUE_AMQP_URL`` and ``TOMQUEUE_PREFIX``. It consumes ``<prefix>.work.deferred``, keeps
every delivery unacked in a heap ordered by ``run_at`` and, when a job is due by its clock,
publishes the notification to ``<prefix>.work`` (confirmed, mandatory) and only then acks
the delivery. In the management UI the held jobs show as *Unacked* on the deferred queue.

Operating it:

- **Settings**: ``--refresh-interval`` / ``TOMQUEUE_DEFERRED_REFRESH`` (default 600 s, 1 to
  1799 s) is the longest one delivery is held; it must stay below RabbitMQ's
  ``consumer_timeout`` (1800 s by default), past which the broker closes the channel. Held
  jobs are republished to the deferred exchange as fresh copies before that.
  ``--stats-interval`` / ``TOMQUEUE_DEFERRED_STATS_INTERVAL`` (30 s) paces the log line with
  the held count and the next due time (also logged at exit; ``Manager.held_count()`` and
  ``Manager.next_due()`` report them in-process).
- **Reporting**: each manager registers in ``tomqueue_deferred_managers`` (host, pid, queue,
  started_at) and refreshes its row every ``heartbeat_interval`` (5 s) with ``last_seen``,
  the held count, the next due time and how many it has published; a clean exit removes
  the row. ``tomqueue status`` lists the managers (a row not refreshed for
  ``lease_timeout`` is marked DEAD) and the deferred queue's depth. The log line of every
  statistics interval has the stable keys ``action=deferred_stats``, ``held``,
  ``next_due``, ``published``, ``refreshed``, ``dropped``, ``reconnects``. A database that
  cannot be reached only stops the reporting, never the releasing.
- **Queue type**: the deferred queue must be a *classic* queue; the manager refuses to start
  (exit 2) if it exists with another type. It consumes with ``prefetch_count=0``
  (unlimited): a quorum queue caps that at 2,000 unacked messages per consumer, and an
  explicit prefetch is capped by the protocol at 65,535, so neither can hold a large backlog.
- **Memory**: about 185-195 bytes per held job (``python -m bench.deferred_memory``), so
  100,000 future jobs cost about 19 MB.
- **Several managers** may run at once; the broker gives each a disjoint share. Duplicate
  notifications (after a crash, a reconnect, a refresh racing a failure) are harmless:
  workers check the job's version in the database.
- **Failures**: a lost connection or channel, a cancelled consumer or a failed publish is
  recovered in-process with bounded exponential backoff; nothing held is lost, because the
  broker requeues unacked deliveries (a deleted queue takes its messages with it: the manager
  re-publishes what it held). Malformed messages are logged and dropped; the sweeper
  republishes any job whose notification went missing, since the database is the truth.
- **Signals**: TERM/INT release everything (the connection is closed, the broker requeues
  the held deliveries) and exit 0 within a fraction of a second; a second signal exits at
  once with status 1.
"""

from __future__ import annotations

from deferred.manager import Manager, main

__all__ = ["Manager", "main"]
