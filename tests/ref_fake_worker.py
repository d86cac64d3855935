"""A stand-in for a Celery or Dramatiq worker, for ``tests/integration/test_bench_references.py``:
consumes the reference queue with pika and records each message in the ledger, as the
reference apps' no-op jobs do, so ``bench.references.run_w1`` is tested without either
library installed.

``python -m tests.ref_fake_worker MODE THREADS`` (queue, URL and ledger from the
``BENCH_REF_*`` environment), MODE one of:

- ``normal``: prefetch 2 x THREADS, record, ack; exits on SIGTERM;
- ``exit-after-K``: exits with status 3 after K messages;
- ``stubborn``: starts a child that sleeps (its pid in ``<ledger>.child``) and ignores
  SIGTERM, like a supervisor whose worker hangs on shutdown;
- ``leaves-child``: starts the same child, exits on SIGTERM without it (an orphan left in
  the process group).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pika

from bench import ref_ledger


def main() -> int:
    mode, threads = sys.argv[1], int(sys.argv[2])
    queue, ledger = os.environ[ref_ledger.QUEUE_ENV], os.environ[ref_ledger.LEDGER_ENV]
    stop = False

    def on_term(_signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    if mode in ("stubborn", "leaves-child"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        with open(f"{ledger}.child", "w") as f:
            f.write(str(child.pid))
    if mode == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, on_term)
    limit = int(mode.rsplit("-", 1)[1]) if mode.startswith("exit-after-") else None

    connection = pika.BlockingConnection(pika.URLParameters(os.environ[ref_ledger.URL_ENV]))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=2 * threads)
    done = 0
    for method, _props, _body in channel.consume(queue, inactivity_timeout=0.1):
        if stop:
            break
        if method is None:
            continue
        ref_ledger.append_time(ledger)
        channel.basic_ack(method.delivery_tag)
        done += 1
        if limit is not None and done >= limit:
            connection.close()
            return 3
    connection.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
