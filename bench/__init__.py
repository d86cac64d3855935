"""TomQueue's benchmark suite: ``python -m bench`` (see bench/README.md).

Every workload runs TomQueue itself (RabbitMQ notifications, lock by primary key) and a
Delayed::Job-style polling baseline (``bench.dj_baseline``) on the same ``delayed_jobs``
table, on PostgreSQL and MariaDB, and prints the ratios next to the project's targets.
"""
