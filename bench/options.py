"""What one ``python -m bench`` invocation runs: workloads, databases and sizes."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

WORKLOADS = ("W1", "W2", "W3", "W4")
DATABASES = ("postgresql", "mysql")
SHAPES = ("ready", "future", "failed")

DEFAULT_URLS = {
    "postgresql": "postgresql+psycopg://postgres@127.0.0.1:5432/tomqueue_bench",
    "mysql": "mysql+pymysql://root@127.0.0.1:3306/tomqueue_bench",
    "amqp": "amqp://guest:guest@127.0.0.1:5672/%2F",
}
URL_ENV = {
    "postgresql": "TOMQUEUE_BENCH_POSTGRES_URL",
    "mysql": "TOMQUEUE_BENCH_MYSQL_URL",
    "amqp": "TOMQUEUE_BENCH_AMQP_URL",
}


def url_for(kind: str) -> str:
    """The URL of a service: ``TOMQUEUE_BENCH_*_URL`` or the default."""
    return os.environ.get(URL_ENV[kind]) or DEFAULT_URLS[kind]


@dataclass(frozen=True)
class Sizes:
    """How much work each workload does."""

    w1_jobs: int = 20_000
    w2_sizes: tuple[int, ...] = (10_000, 100_000)
    w2_batch: int = 2_000
    w2_budget: float = 10.0  # seconds a single W2 measurement may take before it is cut
    w3_seconds: float = 10.0
    w3_interval: float = 0.020
    w4_counts: tuple[int, ...] = (200, 5_000)
    w4_ahead: float = 5.0
    dj_default_sleep: float = 5.0
    dj_fast_sleep: float = 0.1
    measure_dj_default_sleep: bool = False


DEFAULT = Sizes()
QUICK = Sizes(
    w1_jobs=300,
    w2_sizes=(1_000, 5_000),
    w2_batch=200,
    w2_budget=5.0,
    w3_seconds=1.5,
    w4_counts=(50,),
    w4_ahead=1.0,
)
LARGE = Sizes(w2_sizes=(10_000, 100_000, 1_000_000), w2_budget=30.0, measure_dj_default_sleep=True)


@dataclass(frozen=True)
class Options:
    workloads: tuple[str, ...] = WORKLOADS
    databases: tuple[str, ...] = DATABASES
    sizes: Sizes = DEFAULT
    mode: str = "default"
    threads: int = 128  # ours: job places in flight; no-op jobs want many (see --sweep)
    repeat: int = 1
    baseline_threads: int = 4  # the Delayed::Job-style worker peaks at 2-4 threads
    prefix: str = "bench"
    amqp_url: str = field(default_factory=lambda: url_for("amqp"))
    urls: dict[str, str] = field(default_factory=lambda: {d: url_for(d) for d in DATABASES})
    output: str = ""
    profile: bool = False
    dj_index: bool = True
    references: bool = True  # Celery/Dramatiq beside W1 on the first database, if importable
