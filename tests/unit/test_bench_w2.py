"""W2's measuring in ``bench.w2_backlog`` and the ``--repeat`` default of ``bench.cli``
(the database, the broker and the processes replaced by stubs: no service needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import cli, w2_backlog
from bench.env import Target
from bench.options import QUICK, Options


def stub_runs(monkeypatch: pytest.MonkeyPatch, starts: list[list[float]]) -> None:
    """Each run (ours, then the baseline, ``repeat`` times) appends the next list of start
    times to the stamp file, as the jobs' ``Stamp`` would."""
    runs = iter(starts)
    path: dict[str, str] = {}

    def load_backlog(target: Target, shape: str, size: int, batch: int, handler: str) -> Any:
        path["stamps"] = str(target.path(f"w2-{shape}-{size}.stamps"))
        return None

    def one_run(*_args: Any) -> dict[str, Any]:
        with open(path["stamps"], "a") as f:
            f.writelines(f"{t} -\n" for t in next(runs))
        return {"wall_s": 1.0, "cut": False}

    monkeypatch.setattr(w2_backlog, "load_backlog", load_backlog)
    monkeypatch.setattr(w2_backlog, "measure_ours", one_run)
    monkeypatch.setattr(w2_backlog, "measure_baseline", one_run)
    monkeypatch.setattr(w2_backlog, "restore_batch", lambda *_args: (1, 1))


def evenly(start: float, every_ms: float, n: int = 20) -> list[float]:
    return [start + i * every_ms / 1000 for i in range(n)]


def test_a_measurement_counts_only_its_own_stamps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stamp file left by an earlier measurement of the same shape and size (an earlier
    call in one process, or a work directory kept) does not leak into the first run."""
    target = Target("postgresql", "sqlite://", "", "t", tmp_path)
    stale = target.path("w2-future-10000.stamps")
    stale.write_text("".join(f"{t} -\n" for t in evenly(0.0, 500.0)))
    stub_runs(monkeypatch, [evenly(100.0, 0.25), evenly(200.0, 1.0)])

    result = w2_backlog.measure(target, Options(sizes=QUICK, repeat=1), "future", 10000)

    assert result["ours"]["ms_per_job"] == pytest.approx(0.25)
    assert result["baseline"]["ms_per_job"] == pytest.approx(1.0)
    assert result["ours"]["processed"] == 20


def test_repeat_reports_the_median_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = Target("postgresql", "sqlite://", "", "t", tmp_path)
    ours = [evenly(10.0, 0.4), evenly(20.0, 0.2), evenly(30.0, 0.3)]
    baseline = [evenly(15.0, 2.0), evenly(25.0, 1.0), evenly(35.0, 3.0)]
    stub_runs(monkeypatch, [run for pair in zip(ours, baseline, strict=True) for run in pair])

    result = w2_backlog.measure(target, Options(sizes=QUICK, repeat=3), "ready", 10000)

    assert result["ours"]["ms_per_job"] == pytest.approx(0.3)
    assert result["ours"]["runs_ms_per_job"] == pytest.approx([0.4, 0.2, 0.3])
    assert result["baseline"]["ms_per_job"] == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("argv", "repeat"),
    [
        ([], 1),
        (["--quick"], 1),
        (["--large"], cli.LARGE_REPEAT),
        (["--large", "--repeat", "1"], 1),
        (["--repeat", "5"], 5),
    ],
)
def test_repeat_default(argv: list[str], repeat: int) -> None:
    """``--large`` measures W2 three times by default: its 1M/10k target is a ratio of two
    half-second measurements, each of which moves ±30 % on a shared host."""
    assert cli.LARGE_REPEAT == 3
    assert cli.options_from(cli.parser().parse_args(argv)).repeat == repeat
