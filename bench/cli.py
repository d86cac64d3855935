"""``python -m bench [--quick | --large] [--only W1,W3] [--db postgresql,mysql]``

Runs the selected workloads on each database, prints the table and the targets, and writes
``bench/results/latest.json``. Exits 1 if a workload failed (its error is in the JSON).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from bench import references, report, w1_throughput, w2_backlog, w3_latency, w4_scheduled
from bench.env import REPO_ROOT, Target, delete_broker_objects, drop_dj_index, prepare, versions
from bench.options import DATABASES, DEFAULT, LARGE, QUICK, WORKLOADS, Options
from tomqueue.config import redact_url
from tomqueue.db import dispose_engines
from tomqueue.transport import close_publishers

RESULTS = Path(__file__).resolve().parent / "results"
LARGE_REPEAT = 3  # W2 with --large: the median of three runs counts (see --repeat)
Workload = Callable[[Target, Options], dict[str, Any]]
RUNNERS: dict[str, Workload] = {
    "W1": w1_throughput.run,
    "W2": w2_backlog.run,
    "W3": w3_latency.run,
    "W4": w4_scheduled.run,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke mode: tiny sizes, < 1 min")
    size.add_argument("--large", action="store_true", help="W2 with 1M rows too; DJ sleep 5 s")
    p.add_argument("--only", default=",".join(WORKLOADS), help="workloads, e.g. W1,W3")
    p.add_argument("--db", default=",".join(DATABASES), help="postgresql,mysql")
    p.add_argument(
        "--threads",
        type=int,
        default=Options.threads,
        help="job threads of our worker (default %(default)s)",
    )
    p.add_argument(
        "--baseline-threads",
        type=int,
        default=Options.baseline_threads,
        help="threads of the Delayed::Job-style worker (default %(default)s: its best)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="W2: run each measurement N times, report the median (default 1; 3 with "
        "--large, whose 1M/10k target is a ratio of two half-second measurements)",
    )
    p.add_argument("--w1-jobs", type=int, default=None, help="override W1's job count")
    p.add_argument(
        "--sweep",
        default="",
        metavar="N,N,...",
        help="W1 only: drain at each thread count, to find the best setting",
    )
    p.add_argument(
        "--prefix",
        default=os.environ.get("TOMQUEUE_BENCH_PREFIX", "bench"),
        help="broker namespace (default %(default)s)",
    )
    p.add_argument("--output", default=str(RESULTS / "latest.json"), help="JSON file to write")
    p.add_argument(
        "--profile",
        action="store_true",
        help="record our W1 worker with py-spy (raw stacks beside the logs)",
    )
    p.add_argument(
        "--no-dj-index",
        action="store_true",
        help="leave out Delayed::Job's (priority, run_at) index",
    )
    p.add_argument(
        "--no-references",
        action="store_true",
        help="skip the Celery/Dramatiq W1 reference runs even when they are installed",
    )
    p.add_argument(
        "--keep-broker",
        action="store_true",
        help="keep the prefix's queues and exchanges at the end",
    )
    return p


def options_from(args: argparse.Namespace) -> Options:
    sizes = QUICK if args.quick else LARGE if args.large else DEFAULT
    if args.w1_jobs:
        sizes = replace(sizes, w1_jobs=args.w1_jobs)
    workloads = _pick(args.only, WORKLOADS, "--only")
    databases = _pick(args.db, DATABASES, "--db")
    return Options(
        workloads=workloads,
        databases=databases,
        sizes=sizes,
        mode="quick" if args.quick else "large" if args.large else "default",
        threads=args.threads,
        repeat=max(1, _repeat(args)),
        baseline_threads=args.baseline_threads,
        prefix=args.prefix,
        output=args.output,
        profile=args.profile,
        dj_index=not args.no_dj_index,
        references=not args.no_references,
    )


def _repeat(args: argparse.Namespace) -> int:
    if args.repeat is not None:
        return int(args.repeat)
    return LARGE_REPEAT if args.large else 1


def _pick(raw: str, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    wrong = [n for n in names if n not in allowed]
    if wrong or not names:
        raise SystemExit(f"{flag}: expected some of {', '.join(allowed)}, got {raw!r}")
    return names


def machine() -> dict[str, Any]:
    packages: tuple[str, ...] = ("SQLAlchemy", "psycopg", "PyMySQL", "pika", "tomqueue")
    packages += ("celery", "kombu", "amqp", "dramatiq")  # the W1 references, if installed
    return {
        "nproc": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in packages},
        "git": _git_describe(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def _git_describe() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "tomqueue", "deferred"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "-"
    return f"{head}{' +uncommitted changes' if dirty else ''}"


def run_workload(name: str, target: Target, opts: Options) -> dict[str, Any]:
    started = time.monotonic()
    print(f"[{target.name}] {name} ...", flush=True)
    try:
        result = RUNNERS[name](target, opts)
    except Exception as exc:
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = round(time.monotonic() - started, 1)
    if "skipped" in result:
        print(result["skipped"], flush=True)
    print(f"[{target.name}] {name} done in {result['seconds']:.0f}s", flush=True)
    return result


def run_database(
    db: str, opts: Options, workdir: Path, refs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The workloads on ``db``; with ``refs`` (``references.detect()``), the importable
    reference libraries run W1 right after ours (they use the broker, not the database)."""
    target = Target(db, opts.urls[db], opts.amqp_url, opts.prefix, workdir)
    prepare(target, opts.dj_index)
    out: dict[str, Any] = {"url": redact_url(target.url), "versions": versions(target)}
    try:
        for name in opts.workloads:
            out[name] = run_workload(name, target, opts)
            if name == "W1" and refs is not None:
                references.run(target, opts, refs)
    finally:
        if opts.dj_index:
            drop_dj_index(target.engine)
    return out


def sweep(db: str, opts: Options, counts: list[int], workdir: Path) -> dict[str, Any]:
    """W1 at each thread count (both sides), to pick the default ``--threads``."""
    out: dict[str, Any] = {}
    for n in counts:
        out[str(n)] = run_database(
            db, replace(opts, threads=n, baseline_threads=n, workloads=("W1",)), workdir
        )["W1"]
        w1 = out[str(n)]
        if "error" not in w1:
            print(
                f"[{db}] {n} threads: ours {w1['ours']['processed_per_s']:.0f}/s, "
                f"DJ {w1['baseline']['processed_per_s']:.0f}/s",
                flush=True,
            )
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    opts = options_from(args)
    workdir = Path(opts.output).resolve().parent / "work"  # logs and stamp files
    shutil.rmtree(workdir, ignore_errors=True)
    started = time.monotonic()
    data: dict[str, Any] = {
        "meta": {
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "argv": sys.argv[1:] if argv is None else argv,
            "machine": machine(),
        },
        "options": {
            **asdict(opts),
            "urls": {k: redact_url(v) for k, v in opts.urls.items()},
            "amqp_url": redact_url(opts.amqp_url),
        },
        "references": references.detect(),
        "results": {},
    }
    try:
        for db in opts.databases:
            if args.sweep:
                counts = [int(n) for n in args.sweep.split(",")]
                data["results"][db] = {"sweep": sweep(db, opts, counts, workdir)}
            else:
                first = db == opts.databases[0] and opts.references
                refs = data["references"] if first else None
                data["results"][db] = run_database(db, opts, workdir, refs)
    finally:
        references.mark_not_run(data["references"], _why_no_references(opts, args.sweep))
        close_publishers()
        if not args.keep_broker:
            _cleanup_broker(opts, workdir)
        dispose_engines()
    return finish(data, opts, time.monotonic() - started)


def _why_no_references(opts: Options, sweep: str) -> str:
    if not opts.references:
        return "--no-references"
    if sweep:
        return "--sweep"
    if "W1" not in opts.workloads:
        return "W1 not selected"
    return "interrupted"


def _cleanup_broker(opts: Options, workdir: Path) -> None:
    try:
        target = Target(
            opts.databases[0], opts.urls[opts.databases[0]], opts.amqp_url, opts.prefix, workdir
        )
        delete_broker_objects(target)
    except Exception as exc:  # only tidiness
        print(f"could not delete the broker objects of prefix {opts.prefix}: {exc}")


def finish(data: dict[str, Any], opts: Options, seconds: float) -> int:
    all_checks: list[report.Check] = []
    table: list[report.Row] = []
    failed = False
    measured = False
    for db, result in data["results"].items():
        refs = report.references_on(db, data["references"])
        measured |= bool(refs)
        all_checks += report.checks(db, result, refs)
        table += report.rows(db, result, refs)
        failed |= any(isinstance(v, dict) and "error" in v for v in result.values())
    failed |= any("error" in ref.get("W1", {}) for ref in data["references"].values())
    data["targets"] = [c.as_dict() for c in all_checks]
    data["meta"]["seconds"] = round(seconds, 1)
    data["meta"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report.write_json(Path(opts.output), data)
    print()
    print(report.render(table, all_checks, references=measured))
    print()
    print(report.render_checks(all_checks))
    for name, ref in data["references"].items():
        print(f"reference {name}: {ref['note']}")
    print(f"\n{seconds:.0f}s; JSON: {opts.output}")
    return 1 if failed else 0
