"""The test ledger's reader leaves a line still being written for the next read."""

from __future__ import annotations

from pathlib import Path

from tests import ledger


def test_a_partial_last_line_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    assert ledger.complete_lines(path) == []
    path.write_text("perform a 1 t\nperform b 1 t\nperf")
    assert ledger.markers(path) == ["a", "b"]
    path.write_text("perform a 1 t\nperform b 1 t\nperform c 1 t\n")
    assert ledger.markers(path) == ["a", "b", "c"]
