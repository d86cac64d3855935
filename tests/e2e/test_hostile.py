"""Must-show 4 (process part): a real worker never imports a module a payload names.

A module ``tests_hostile_module_xyz`` is importable by the worker (it is on PYTHONPATH)
and writes a marker file when imported. Jobs name it as their kind, as a nested object and
as a function reference; the worker (``--import tests.jobs --exit-on-complete``) must fail
them with a clear ``last_error``, keep working (the good jobs behind them run), exit 0, and
the marker file must never appear. Bad broker messages are mixed in on AMQP stacks.
"""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select, update

import tomqueue
from tests import ledger
from tests.conftest import (
    Stack,
    WorkerProcess,
    all_queue_names,
    declare_topology,
    on_stacks,
    publish_raw,
    queue_depth,
    worker_env,
)
from tests.jobs import Record
from tomqueue.db import get_engine
from tomqueue.message import Notification
from tomqueue.schema import Job

HOSTILE = "tests_hostile_module_xyz"

HANDLERS = {
    "kind": {"kind": f"{HOSTILE}:Evil", "attrs": {}},
    "nested": {
        "kind": "tests.jobs:Record",
        "attrs": {"x": {"__tq__": "object", "kind": f"{HOSTILE}:Evil", "attrs": {}}},
    },
    "ref": {
        "kind": "tomqueue.delay:PerformableMethod",
        "attrs": {
            "target": {"__tq__": "ref", "kind": f"{HOSTILE}:run"},
            "method": None,
            "args": [],
            "kwargs": {},
        },
    },
}


@on_stacks(("sqlite", "polling"), ("postgresql", "amqp"), ("mysql", "amqp"))
def test_worker_never_imports_a_module_named_by_a_payload(
    stack: Stack, ledger_path: str, tmp_path: Path, worker_processes: list[WorkerProcess]
) -> None:
    config = stack.config
    marker = tmp_path / "hostile-imported.marker"
    libdir = tmp_path / "lib"
    libdir.mkdir()
    (libdir / f"{HOSTILE}.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "class Evil:\n    def perform(self):\n        pass\n"
        "def run():\n    pass\n"
    )
    if stack.transport == "amqp":
        declare_topology(config)
    bad_ids = {}
    for name, body in HANDLERS.items():
        job = tomqueue.enqueue(Record(ledger_path, f"bad-{name}"), priority=-1)
        with get_engine(config).begin() as conn:
            conn.execute(update(Job).where(Job.id == job.id).values(handler=json.dumps(body)))
        bad_ids[name] = job.id
    if stack.transport == "amqp":
        publish_raw(config, b"\x00\x01 not json")
        publish_raw(config, Notification(999_999_999, 1, job.run_at).encode())
    tomqueue.enqueue(Record(ledger_path, "good1"), priority=0)
    tomqueue.enqueue(Record(ledger_path, "good2"), priority=0)

    worker = WorkerProcess(
        ["--import", "tests.jobs", "--exit-on-complete"],
        worker_env(config, PYTHONPATH=str(libdir)),
        tmp_path / "worker.log",
    )
    worker_processes.append(worker)
    code = worker.wait(30)
    log = worker.log()

    assert code == 0, log[-3000:]
    assert not marker.exists(), "the worker imported the hostile module"
    assert sorted(ledger.markers(ledger_path)) == ["good1", "good2"]
    with get_engine(config).connect() as conn:
        rows = {r.id: r for r in conn.execute(select(Job.__table__)).all()}
    assert set(rows) == set(bad_ids.values()), "only the bad jobs should remain"
    for name, job_id in bad_ids.items():
        row = rows[job_id]
        assert row.failed_at is not None, name
        assert row.locked_at is None, name
        assert row.last_error and "HandlerError" in row.last_error, (name, row.last_error)
        assert HOSTILE in row.last_error and "not told to load" in row.last_error, name
    assert HOSTILE in log and "will not load" in log
    assert "Traceback" not in log
    if stack.transport == "amqp":
        assert "malformed message" in log and "missing" in log
        for name in all_queue_names(config):
            assert queue_depth(config, name)[0] == 0, name
