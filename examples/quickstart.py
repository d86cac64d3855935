"""The quick start: enqueue a few jobs and work them off, on the embedded default
(SQLite file ``tomqueue.sqlite3`` in the current directory, no broker).

    python -m examples.quickstart
"""

from __future__ import annotations

import subprocess
import sys

import tomqueue
from examples.jobs import Greet, add
from tomqueue import Delayed
from tomqueue.db import migrate


def main() -> int:
    config = tomqueue.configure()
    print(f"TomQueue quick start: {config.describe()}")
    migrate(config, echo=print)
    Delayed.enqueue(Greet("world"))
    Delayed.enqueue(Greet("urgent world"), priority=-1)  # -1 maps to the 'high' level
    tomqueue.delay(add)(2, 3)
    print("enqueued 3 jobs; starting a worker that exits when they are done")
    worker = [sys.executable, "-m", "tomqueue", "worker", "--import", "examples.jobs",
              "--exit-on-complete"]
    code = subprocess.call(worker)
    print("done" if code == 0 else f"worker exited with {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
