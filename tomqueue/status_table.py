"""``tomqueue status`` for people: the report of ``tomqueue.status.collect`` as tables."""

from __future__ import annotations

from typing import Any

from tomqueue.status import STATES


def render(report: dict[str, Any]) -> str:
    sections = [_queues(report), _workers(report["workers"]), _deferred(report)]
    if report.get("last_sweep") is not None:
        sections.append([_sweep(report["last_sweep"])])
    return "\n\n".join("\n".join(lines) for lines in sections)


def _queues(report: dict[str, Any]) -> list[str]:
    header = (
        f"{'queue':<20} {'level':<7} "
        + " ".join(f"{s:>9}" for s in STATES)
        + f" {'broker':>7} {'lag':>8}"
    )
    lines = [header, "-" * len(header)]
    for row in report["queues"]:
        depth = "-" if row["broker_depth"] is None else str(row["broker_depth"])
        lines.append(
            f"{row['queue']:<20} {row['level']:<7} "
            + " ".join(f"{row[s]:>9}" for s in STATES)
            + f" {depth:>7} {_seconds(row['oldest_ready_age_seconds']):>8}"
        )
    lines.append(f"oldest ready job waited {report['oldest_ready_age_seconds']:.1f} s")
    return lines


def _workers(workers: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'worker':<40} {'queues':<20} {'seen':>6}  jobs"]
    for w in workers:
        state = f"{w['last_seen_seconds_ago']:.0f}s" + ("" if w["alive"] else " DEAD")
        jobs = ",".join(str(j) for j in w["current_jobs"]) or "-"
        lines.append(f"{w['name']:<40} {w['queues']:<20} {state:>6}  {jobs}")
    if not workers:
        lines.append("(no workers registered)")
    return lines


def _deferred(report: dict[str, Any]) -> list[str]:
    managers = report["deferred_managers"]
    lines = [f"{'deferred manager':<40} {'queue':<26} {'seen':>6} {'held':>7}  next due"]
    for m in managers:
        state = f"{m['last_seen_seconds_ago']:.0f}s" + ("" if m["alive"] else " DEAD")
        due = "-"
        if m["next_due"] is not None:
            due = f"{m['next_due'][:23]}Z (in {m['next_due_in_seconds']:.1f} s)"
        lines.append(f"{m['name']:<40} {m['queue']:<26} {state:>6} {m['held']:>7}  {due}")
    if not managers:
        lines.append("(no deferred managers registered)")
    deferred = report["deferred"]
    on_broker = ""
    if deferred["broker_ready"] is not None:
        on_broker = (
            f": {deferred['broker_ready']} ready on the broker, "
            f"{deferred['broker_consumers']} consumer(s)"
        )
    lines.append(
        f"deferred queue {deferred['queue']}{on_broker}; {deferred['held']} held by "
        f"{deferred['managers']} live manager(s)"
    )
    return lines


def _sweep(sweep: dict[str, Any]) -> str:
    text = (
        f"last sweep {_seconds(sweep['seconds_ago'])} ago by {sweep['holder']}: "
        f"republished {sweep['republished']}"
    )
    if sweep["lateness_seconds"] is not None:
        text += f", the most overdue {_seconds(sweep['lateness_seconds'])} past its run_at"
    if sweep["since_notified_seconds"] is not None:
        text += f", the longest unnotified {_seconds(sweep['since_notified_seconds'])}"
    return text


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"
