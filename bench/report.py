"""The table printed at the end, the targets from the issue with PASS/MISS, and the JSON.

Column ``ours/DJ`` is how many times better ours is: rates ours ÷ baseline, times
baseline ÷ ours; above 1 means ours wins. The reference rows (Celery, Dramatiq; after W1 on
the database they ran beside) put the library's figure in the baseline column and ours ÷
theirs in the ratio column; the header says so when there are any.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Row = tuple[str, str, str, str, str, str, str, str]
"""db, workload, metric, ours, baseline, ours/DJ, target, and the ``Check.name`` it shows."""
HEADER = ("db", "workload", "metric", "ours", "DJ baseline", "ours/DJ", "target", "")
HEADER_WITH_REFERENCES = (*HEADER[:4], "DJ baseline | ref", "ours/DJ | ours/ref", *HEADER[6:])
DRAMATIQ_CHECK = "W1 processed/s vs Dramatiq"
ENQUEUE_API = {"celery": "delay()", "dramatiq": "send()"}


@dataclass(frozen=True)
class Check:
    """One target of the issue, evaluated on one database."""

    database: str
    name: str
    value: float | None
    limit: float
    higher_is_better: bool
    text: str
    note: str = ""

    @property
    def status(self) -> str:
        if self.value is None:
            return "n/a"
        ok = self.value >= self.limit if self.higher_is_better else self.value <= self.limit
        return "PASS" if ok else "MISS"

    def as_dict(self) -> dict[str, Any]:
        return {
            "database": self.database,
            "name": self.name,
            "value": self.value,
            "limit": self.limit,
            "target": self.text,
            "status": self.status,
            "note": self.note,
        }


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "MB":
        return f"{value:.0f} MB"
    return f"{value:.2f} ms" if abs(value) < 100 else f"{value:,.0f} ms"


def better(ours: float | None, base: float | None, rate: bool) -> str:
    if not ours or not base:
        return "-"
    return fmt(ours / base if rate else base / ours, "x")


# --- targets ------------------------------------------------------------------------


def references_on(db: str, found: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``references`` (the JSON's) that ran W1 beside ``db``."""
    return {
        name: entry
        for name, entry in found.items()
        if entry.get("database") == db and isinstance(entry.get("W1"), dict)
    }


def checks(db: str, result: dict[str, Any], refs: dict[str, Any] | None = None) -> list[Check]:
    out: list[Check] = []
    for workload, make in (
        ("W1", _w1_checks),
        ("W2", _w2_checks),
        ("W3", _w3_checks),
        ("W4", _w4_checks),
    ):
        if isinstance(result.get(workload), dict) and "error" not in result[workload]:
            out += make(db, result[workload])
    return out + _reference_checks(db, result.get("W1"), refs or {})


def _reference_checks(db: str, w1: dict[str, Any] | None, refs: dict[str, Any]) -> list[Check]:
    """Issue 5: our W1 processed/s at or above Dramatiq's, when Dramatiq was measured."""
    theirs = refs.get("dramatiq", {}).get("W1", {})
    if "processed_per_s" not in theirs:
        return []
    ours = w1["ours"]["processed_per_s"] if w1 and "error" not in w1 else None
    rate = theirs["processed_per_s"]
    value = ours / rate if ours is not None else None
    return [Check(db, DRAMATIQ_CHECK, value, 1.0, True, ">= Dramatiq", f"Dramatiq {rate:,.0f}/s")]


def _w1_checks(db: str, w1: dict[str, Any]) -> list[Check]:
    ours = w1["ours"]
    return [
        Check(db, "W1 processed/s vs DJ", w1["ratio_processed"], 5.0, True, ">= 5x DJ"),
        Check(
            db,
            "W1 enqueue/s (commit + hand-off)",
            ours["enqueue_per_s"],
            3000.0,
            True,
            ">= 3,000/s",
        ),
        Check(
            db,
            "W1 enqueue+flush/s (confirms)",
            ours.get("enqueue_flush_per_s"),
            3000.0,
            True,
            ">= 3,000/s",
        ),
        *_bulk_checks(db, ours["bulk"]),
    ]


def _bulk_checks(db: str, bulk: dict[str, Any]) -> list[Check]:
    if not bulk.get("available"):
        return []
    rate = bulk["enqueue_per_s"]  # committed and handed off, like single enqueue's figure
    return [Check(db, "W1 enqueue_many/s", rate, 20000.0, True, ">= 20,000/s")]


def _w2_checks(db: str, w2: dict[str, Any]) -> list[Check]:
    sizes = w2["sizes"]
    label = f"{_size(sizes[-1])}/{_size(sizes[0])}"
    note = "" if sizes[-1] >= 1_000_000 else "target is for 1M rows: run with --large"
    return [
        Check(
            db,
            f"W2 {shape} per-job {label}",
            shape_result["ratio_ours"],
            1.2,
            False,
            "<= 1.2x",
            note,
        )
        for shape, shape_result in w2["shapes"].items()
    ]


def _w3_checks(db: str, w3: dict[str, Any]) -> list[Check]:
    ours = w3["ours"]
    return [
        Check(db, "W3 latency p50", ours.get("p50_ms"), 3.0, False, "<= 3 ms"),
        Check(db, "W3 latency p99", ours.get("p99_ms"), 8.0, False, "<= 8 ms"),
    ]


def _w4_checks(db: str, w4: dict[str, Any]) -> list[Check]:
    if "skipped" in w4:
        return []
    counts = [k for k in w4 if k.isdigit()]
    if not counts:
        return []
    count = "200" if "200" in counts else counts[0]
    note = "" if count == "200" else f"measured with {count} jobs (--quick)"
    r = w4[count]
    return [
        Check(db, f"W4 {count} jobs lateness p50", r.get("p50_ms"), 10.0, False, "<= 10 ms", note),
        Check(db, f"W4 {count} jobs lateness p99", r.get("p99_ms"), 50.0, False, "<= 50 ms", note),
    ]


def _size(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k" if n >= 1000 else str(n)


# --- the table ----------------------------------------------------------------------


def rows(db: str, result: dict[str, Any], refs: dict[str, Any] | None = None) -> list[Row]:
    makers: dict[str, Callable[[str, dict[str, Any]], list[Row]]] = {
        "W1": _w1_rows,
        "W2": _w2_rows,
        "W3": _w3_rows,
        "W4": _w4_rows,
    }
    out: list[Row] = []
    for workload, make in makers.items():
        value = result.get(workload)
        if value is None:
            continue
        if "error" in value:
            out.append((db, workload, "error", value["error"][:60], "", "", "", ""))
        else:
            out += make(db, value)
        if workload == "W1":
            out += _reference_rows(db, value, refs or {})
    return out


def _reference_rows(db: str, w1: dict[str, Any], refs: dict[str, Any]) -> list[Row]:
    ours = w1["ours"] if "error" not in w1 else {}
    out: list[Row] = []
    for name, entry in refs.items():
        label = f"{name.capitalize()} {entry.get('version') or ''}".strip()
        r = entry["W1"]
        if "error" in r:
            out.append((db, "W1", f"{label}: error", "", r["error"][:60], "", "", ""))
            continue
        enq = (ours.get("enqueue_per_s"), r["enqueue_per_s"])
        done = (ours.get("processed_per_s"), r["processed_per_s"])
        dramatiq = name == "dramatiq"
        out += [
            (
                db,
                "W1",
                f"{label}: enqueue/s ({ENQUEUE_API.get(name, 'API')}, no confirms)",
                fmt(enq[0], "/s"),
                fmt(enq[1], "/s"),
                better(*enq, True),
                "",
                "",
            ),
            (
                db,
                "W1",
                f"{label}: processed/s ({r['threads']} threads)",
                fmt(done[0], "/s"),
                fmt(done[1], "/s"),
                better(*done, True),
                ">= Dramatiq" if dramatiq else "",
                DRAMATIQ_CHECK if dramatiq else "",
            ),
            (
                db,
                "W1",
                f"{label}: worker peak RSS",
                fmt(ours.get("peak_rss_mb"), "MB"),
                fmt(r["peak_rss_mb"], "MB"),
                "",
                "",
                "",
            ),
        ]
    return out


def _w1_rows(db: str, w1: dict[str, Any]) -> list[Row]:
    o, b = w1["ours"], w1["baseline"]
    enq, done = (
        (o["enqueue_per_s"], b["enqueue_per_s"]),
        (o["processed_per_s"], b["processed_per_s"]),
    )
    return [
        (
            db,
            "W1",
            f"enqueue/s ({w1['jobs']:,} jobs: commit + hand-off)",
            fmt(enq[0], "/s"),
            fmt(enq[1], "/s"),
            better(*enq, True),
            ">= 3,000/s",
            "W1 enqueue/s (commit + hand-off)",
        ),
        (
            db,
            "W1",
            "enqueue+flush/s (until all confirmed)",
            fmt(o.get("enqueue_flush_per_s"), "/s"),
            "",
            "",
            ">= 3,000/s",
            "W1 enqueue+flush/s (confirms)",
        ),
        *_w1_floor_rows(db, o.get("floor"), enq[0]),
        *_w1_call_rows(db, o.get("enqueue_call_ms")),
        *_w1_sync_rows(db, o.get("sync")),
        *_w1_bulk_rows(db, o["bulk"]),
        (
            db,
            "W1",
            f"processed/s ({w1['threads']} threads)",
            fmt(done[0], "/s"),
            fmt(done[1], "/s"),
            better(*done, True),
            ">= 5x DJ",
            "W1 processed/s vs DJ",
        ),
        (
            db,
            "W1",
            "worker peak RSS",
            fmt(o["peak_rss_mb"], "MB"),
            fmt(b["peak_rss_mb"], "MB"),
            "",
            "",
            "",
        ),
    ]


def _w1_floor_rows(db: str, floor: dict[str, Any] | None, ours: float) -> list[Row]:
    """The rate of ``enqueue``'s INSERT alone: what one-by-one ``enqueue`` could reach."""
    if not floor:
        return []
    rate = floor["enqueue_per_s"]
    label = f"enqueue floor: its INSERT alone ({floor['jobs']:,}; ours {ours / rate:.2f}x)"
    return [(db, "W1", label, fmt(rate, "/s"), "", "", "", "")]


def _w1_call_rows(db: str, calls: dict[str, float] | None) -> list[Row]:
    """How long one ``enqueue`` call took: p50 / p99 / max."""
    if not calls:
        return []
    times = " / ".join(f"{calls[k]:.2f}" for k in ("p50", "p99", "max"))
    return [(db, "W1", "enqueue call p50 / p99 / max", f"{times} ms", "", "", "", "")]


def _w1_sync_rows(db: str, sync: dict[str, Any] | None) -> list[Row]:
    if not sync:
        return []
    label = f"enqueue/s, sync_publish ({sync['jobs']:,} jobs)"
    return [(db, "W1", label, fmt(sync["enqueue_per_s"], "/s"), "", "", "", "")]


def _w1_bulk_rows(db: str, bulk: dict[str, Any]) -> list[Row]:
    if not bulk["available"]:
        return [(db, "W1", "enqueue_many/s", "n/a", "", "", bulk.get("note", ""), "")]
    label = f"enqueue_many/s (batches of {bulk['batch']})"
    return [
        (
            db,
            "W1",
            label,
            fmt(bulk["enqueue_per_s"], "/s"),
            "",
            "",
            ">= 20,000/s",
            "W1 enqueue_many/s",
        ),
        (
            db,
            "W1",
            "enqueue_many+flush/s (until all confirmed)",
            fmt(bulk.get("enqueue_flush_per_s"), "/s"),
            "",
            "",
            "",
            "",
        ),
    ]


def _w2_rows(db: str, w2: dict[str, Any]) -> list[Row]:
    out: list[Row] = []
    label = f"{_size(w2['sizes'][-1])}/{_size(w2['sizes'][0])}"
    for shape, s in w2["shapes"].items():
        for size, r in s["sizes"].items():
            o, b = r["ours"]["ms_per_job"], r["baseline"]["ms_per_job"]
            cut = " (cut)" if r["baseline"].get("cut") else ""
            out.append(
                (
                    db,
                    "W2",
                    f"{shape} {_size(int(size))}: ms/job",
                    fmt(o),
                    fmt(b) + cut,
                    better(o, b, False),
                    "",
                    "",
                )
            )
        out.append(
            (
                db,
                "W2",
                f"{shape} {label} per-job ratio",
                fmt(s["ratio_ours"], "x"),
                fmt(s["ratio_baseline"], "x"),
                "",
                "<= 1.2x (1M/10k)",
                f"W2 {shape} per-job {label}",
            )
        )
    return out


def _w3_rows(db: str, w3: dict[str, Any]) -> list[Row]:
    o, b = w3["ours"], w3["baseline"]
    out: list[Row] = []
    for p, target in (("p50", "<= 3 ms"), ("p95", ""), ("p99", "<= 8 ms")):
        mine, theirs = o.get(f"{p}_ms"), b.get(f"{p}_ms")
        out.append(
            (
                db,
                "W3",
                f"enqueue->start {p} (DJ sleep {b['sleep']:g}s)",
                fmt(mine),
                fmt(theirs),
                better(mine, theirs, False),
                target,
                f"W3 latency {p}" if target else "",
            )
        )
    floor = w3.get("floor", {})
    for p in ("p50", "p99"):
        mine, bare = o.get(f"{p}_ms"), floor.get(f"{p}_ms")
        if bare:
            share = f" (ours {mine / bare:.2f}x)" if mine else ""
            out.append((db, "W3", f"bare-chain floor {p}{share}", fmt(bare), "", "", "", ""))
    slow = w3.get("baseline_default_sleep")
    if slow:
        mine, theirs = o.get("p50_ms"), slow.get("p50_ms")
        out.append(
            (
                db,
                "W3",
                f"enqueue->start p50 (DJ sleep {slow['sleep']:g}s)",
                fmt(mine),
                fmt(theirs),
                better(mine, theirs, False),
                "",
                "",
            )
        )
    return out


def _w4_rows(db: str, w4: dict[str, Any]) -> list[Row]:
    if "skipped" in w4:
        return [(db, "W4", "skipped: deferred manager not available", "", "", "", "", "")]
    out: list[Row] = []
    for count, r in ((k, v) for k, v in w4.items() if k.isdigit()):
        for p, target in (("p50", "<= 10 ms"), ("p99", "<= 50 ms")):
            name = f"W4 {count} jobs lateness {p}"
            out.append(
                (
                    db,
                    "W4",
                    f"{count} jobs lateness {p}",
                    fmt(r.get(f"{p}_ms")),
                    "",
                    "",
                    target if count == "200" else "",
                    name,
                )
            )
        out += _w4_detail_rows(db, count, r)
    return out


def _w4_detail_rows(db: str, count: str, r: dict[str, Any]) -> list[Row]:
    def pair(part: dict[str, Any] | None) -> str:
        part = part or {}
        return f"{fmt(part.get('p50_ms'))} / {fmt(part.get('p99_ms'))}"

    rss = r["peak_rss_mb"]
    rates = f"{fmt(r.get('due_rate_per_s'), '/s')} / {fmt(r.get('start_rate_per_s'), '/s')}"
    return [
        (
            db,
            "W4",
            f"{count} jobs: deferred release p50/p99",
            pair(r.get("release")),
            "",
            "",
            "",
            "",
        ),
        (
            db,
            "W4",
            f"{count} jobs: release->start p50/p99",
            pair(r.get("release_to_start")),
            "",
            "",
            "",
            "",
        ),
        (db, "W4", f"{count} jobs: due rate / start rate", rates, "", "", "", ""),
        (
            db,
            "W4",
            f"{count} jobs: first job's lateness",
            fmt(r.get("first_job_ms")),
            "",
            "",
            "",
            "",
        ),
        (
            db,
            "W4",
            f"{count} jobs: peak RSS worker/deferred",
            f"{rss['worker']:.0f} / {rss['deferred']:.0f} MB",
            "",
            "",
            "",
            "",
        ),
    ]


def render(table: list[Row], all_checks: list[Check], references: bool = False) -> str:
    status = {(c.database, c.name): c.status for c in all_checks}
    header = HEADER_WITH_REFERENCES if references else HEADER
    lines = [header] + [(*row[:7], status.get((row[0], row[7]), "")) for row in table]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    text = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def render_checks(all_checks: list[Check]) -> str:
    lines = ["Targets:"]
    for c in all_checks:
        value = "-" if c.value is None else f"{c.value:,.2f}"
        note = f"  ({c.note})" if c.note else ""
        lines.append(f"  {c.status:4}  {c.database:10}  {c.name:32} {value:>10}  {c.text}{note}")
    return "\n".join(lines)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
