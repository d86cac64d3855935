"""The reference rows and the Dramatiq target in ``bench.report`` (synthetic results: no
library, service or benchmark run needed)."""

from __future__ import annotations

from typing import Any

from bench import references, report


def w1(processed: float = 400.0) -> dict[str, Any]:
    side = {"enqueue_per_s": 500.0, "processed_per_s": processed, "peak_rss_mb": 64.0}
    return {
        "jobs": 1000,
        "threads": 4,
        "ours": {**side, "bulk": {"available": False, "note": "no enqueue_many"}},
        "baseline": {**side, "processed_per_s": 100.0},
        "ratio_processed": processed / 100.0,
        "ratio_enqueue": 1.0,
    }


def ref(processed: float, db: str = "postgresql") -> dict[str, Any]:
    return {
        "importable": True,
        "version": "9.9",
        "database": db,
        "W1": {
            "enqueue_per_s": 5000.0,
            "processed_per_s": processed,
            "peak_rss_mb": 30.0,
            "threads": 4,
        },
    }


def test_dramatiq_target_passes_at_or_above_its_figure() -> None:
    refs = {"dramatiq": ref(2000.0)}
    for ours, status in ((1999.0, "MISS"), (2000.0, "PASS"), (2500.0, "PASS")):
        found = report.checks("postgresql", {"W1": w1(ours)}, refs)
        check = next(c for c in found if c.name == report.DRAMATIQ_CHECK)
        assert check.status == status
        assert check.value == ours / 2000.0
        assert check.note == "Dramatiq 2,000/s"


def test_no_dramatiq_target_without_a_dramatiq_measurement() -> None:
    for refs in (
        None,
        {"celery": ref(1500.0)},
        {"dramatiq": {**ref(1.0), "W1": {"error": "RuntimeError: boom"}}},
    ):
        names = {c.name for c in report.checks("postgresql", {"W1": w1()}, refs)}
        assert report.DRAMATIQ_CHECK not in names


def test_reference_rows_follow_w1_and_render_with_their_header() -> None:
    refs = {"celery": ref(1500.0), "dramatiq": ref(2000.0)}
    result = {"W1": w1(400.0)}
    table = report.rows("postgresql", result, refs)
    metrics = [row[2] for row in table]
    first = metrics.index("worker peak RSS") + 1  # the references follow our W1 rows
    assert metrics[first:] == [
        "Celery 9.9: enqueue/s (delay(), no confirms)",
        "Celery 9.9: processed/s (4 threads)",
        "Celery 9.9: worker peak RSS",
        "Dramatiq 9.9: enqueue/s (send(), no confirms)",
        "Dramatiq 9.9: processed/s (4 threads)",
        "Dramatiq 9.9: worker peak RSS",
    ]
    dramatiq = table[first + 4]
    assert dramatiq[3:7] == ("400/s", "2,000/s", "0.20x", ">= Dramatiq")
    assert all(len(row) == 8 for row in table)
    text = report.render(table, report.checks("postgresql", result, refs), references=True)
    assert "DJ baseline | ref" in text.splitlines()[0]
    line = next(x for x in text.splitlines() if "Dramatiq 9.9: processed/s" in x)
    assert line.rstrip().endswith("MISS")
    plain = report.render(report.rows("postgresql", result), [])
    assert "| ref" not in plain and "Celery" not in plain


def test_error_rows_render() -> None:
    result = {"W1": {"error": "RuntimeError: worker died"}}
    refs = {"dramatiq": {**ref(1.0), "W1": {"error": "RuntimeError: its worker died too"}}}
    table = report.rows("postgresql", result, refs)
    text = report.render(table, report.checks("postgresql", result, refs), references=True)
    assert "RuntimeError: worker died" in text
    assert "Dramatiq 9.9: error" in text and "its worker died too" in text


def test_references_on_picks_the_database_they_ran_beside() -> None:
    found = {
        "celery": ref(1.0, "mysql"),
        "dramatiq": ref(1.0),
        "other": {"importable": False, "note": "not installed"},
    }
    assert set(report.references_on("postgresql", found)) == {"dramatiq"}
    assert set(report.references_on("mysql", found)) == {"celery"}


def test_notes_say_why_an_importable_reference_did_not_run() -> None:
    found = {
        "celery": {"importable": True, "note": ""},
        "dramatiq": {**ref(1.0), "note": "measured"},
        "x": {"importable": False, "note": "not installed"},
    }
    references.mark_not_run(found, "W1 not selected")
    assert found["celery"]["note"] == "importable, not run (W1 not selected)"
    assert found["dramatiq"]["note"] == "measured"
    assert found["x"]["note"] == "not installed"


def test_w1_shows_how_long_one_enqueue_call_took_when_measured() -> None:
    measured = w1()
    measured["ours"]["enqueue_call_ms"] = {"p50": 0.29, "p99": 1.754, "max": 3.2}
    [row] = [r for r in report._w1_rows("postgresql", measured) if "call" in r[2]]
    assert row[2:4] == ("enqueue call p50 / p99 / max", "0.29 / 1.75 / 3.20 ms")
    assert not [r for r in report._w1_rows("postgresql", w1()) if "call" in r[2]]


def test_w1_shows_the_insert_alone_floor_beside_our_enqueue_rate() -> None:
    measured = w1()
    measured["ours"]["floor"] = {"jobs": 5000, "enqueue_per_s": 3000.0, "enqueue_seconds": 1.67}
    [row] = [r for r in report._w1_rows("postgresql", measured) if "floor" in r[2]]
    ours = measured["ours"]["enqueue_per_s"] / 3000.0
    label = f"enqueue floor: its INSERT alone (5,000; ours {ours:.2f}x)"
    assert row[2:4] == (label, "3,000/s")
    assert not [r for r in report._w1_rows("postgresql", w1()) if "floor" in r[2]]
