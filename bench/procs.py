"""The processes a workload starts: a ``tomqueue worker``, the baseline, the deferred manager.

Each runs in its own session with its output in a log file beside the results; ``Proc``
stops it (TERM, then KILL) and samples its peak RSS with psutil.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

from bench.env import REPO_ROOT, Target


class Proc:
    """A subprocess with a log file and a peak-RSS sampler.

    With ``tree``, the peak is that of the largest process in its tree (a supervisor that
    forks its worker, as Dramatiq's does).
    """

    def __init__(
        self, name: str, argv: Sequence[str], env: dict[str, str], log: Path, tree: bool = False
    ) -> None:
        self.name = name
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in wait()
        self._tree = tree
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            list(argv),
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE if name.startswith("baseline") else self._log,
            stderr=self._log,
            start_new_session=True,
        )
        self.peak_rss = 0
        self._sampling = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _sample(self) -> None:
        try:
            process = psutil.Process(self.proc.pid)
            while not self._sampling.wait(0.05):
                self.peak_rss = max(self.peak_rss, process.memory_info().rss)
                if self._tree:
                    for child in process.children(recursive=True):
                        with contextlib.suppress(psutil.Error):
                            self.peak_rss = max(self.peak_rss, child.memory_info().rss)
        except psutil.Error:
            return

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        """Wait for the exit (kill after ``timeout``); returns the exit code."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(
                f"{self.name} (pid {self.pid}) did not exit within {timeout:g}s; "
                f"see {self.log_path}"
            ) from None
        finally:
            self._sampling.set()
        return code

    def stop(self, timeout: float = 30.0) -> int:
        if self.running():
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        self._sampling.set()
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def summary(self) -> dict[str, Any]:
        """The baseline's closing JSON line (``{}`` for other processes)."""
        if self.proc.stdout is None:
            return {}
        lines = self.proc.stdout.read().decode(errors="replace").strip().splitlines()
        try:
            return dict(json.loads(lines[-1])) if lines else {}
        except ValueError:
            return {}

    def close(self) -> None:
        self._sampling.set()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def tomqueue_worker(
    target: Target, threads: int, exit_on_complete: bool, tag: str, profile: bool = False
) -> Proc:
    """``tomqueue worker --import bench.jobs --threads N`` with the broker configured."""
    argv = [sys.executable, "-m", "tomqueue", "worker", "--import", "bench.jobs"]
    argv += ["--threads", str(threads)]
    if exit_on_complete:
        argv.append("--exit-on-complete")
    if profile:
        out = target.path(f"profile-{tag}.txt")
        argv = [
            "py-spy",
            "record",
            "--gil",
            "--nonblocking",
            "-f",
            "raw",
            "-r",
            "200",
            "-o",
            str(out),
            "--",
            *argv,
        ]
    return Proc(f"worker-{tag}", argv, target.env(), target.path(f"worker-{tag}.log"))


def dj_baseline(target: Target, threads: int, tag: str, *extra: str) -> Proc:
    argv = [sys.executable, "-m", "bench.dj_baseline", "--url", target.url]
    argv += ["--threads", str(threads), *extra]
    return Proc(f"baseline-{tag}", argv, target.env(), target.path(f"baseline-{tag}.log"))


def deferred_manager(target: Target, tag: str) -> Proc:
    argv = [sys.executable, "-m", "tomqueue", "deferred"]
    return Proc(f"deferred-{tag}", argv, target.env(), target.path(f"deferred-{tag}.log"))


def wait_until(
    condition: Callable[[], object], timeout: float, what: str, interval: float = 0.02
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
