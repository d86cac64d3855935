"""Issue 2, must-show: the README's two commands work on a fresh clone.

Command one is ``pip install -e . && python -m examples.quickstart``; the test runs its
second half in a fresh copy of the repository's tracked files (the install is this test
environment's own: reinstalling from the copy would repoint it), with no ``TOMQUEUE_*``
variable set, so it runs on the embedded default (SQLite file, no broker). Command two is
the test command ``.ci/run`` runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

README = REPO_ROOT / "README.md"


def quick_start_commands() -> list[str]:
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)]


def test_readme_quick_start_has_the_two_commands_ci_runs() -> None:
    install_and_run, test = quick_start_commands()
    assert install_and_run == "pip install -e . && python -m examples.quickstart"
    assert test == "pip install -e '.[dev]' && python -m pytest"
    assert test in (REPO_ROOT / ".ci" / "run").read_text()


def fresh_copy(target: Path) -> Path:
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, tracked.split("\0")):
        source = REPO_ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def test_quick_start_runs_end_to_end_in_a_fresh_copy(tmp_path: Path) -> None:
    clone = fresh_copy(tmp_path / "clone")
    assert not (clone / "tomqueue.sqlite3").exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOMQUEUE_")}
    env.pop("PYTHONPATH", None)

    done = subprocess.run(
        [sys.executable, "-m", "examples.quickstart"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "broker=<none: db polling>" in out
    performed = [line for line in out.splitlines() if line.startswith(("hello", "2 + 3"))]
    assert performed == ["hello, urgent world", "hello, world", "2 + 3 = 5"], out
    assert out.rstrip().endswith("done")
    assert (clone / "tomqueue.sqlite3").exists()
    assert "Traceback" not in done.stderr
