"""The Celery application of the benchmark: the bodies as Celery tasks.

The benchmark and its ``celery worker`` subprocesses both import this module;
the Redis URL (broker and result backend) comes from ``PFBENCH_CELERY_URL``.
Settings are Celery's defaults except where noted.
"""

from __future__ import annotations

import os

from celery import Celery

from . import bodies

URL = os.environ.get("PFBENCH_CELERY_URL", "redis://127.0.0.1:6379/1")
QUEUE = "pfbench-celery"

app = Celery("pfbench", broker=URL, backend=URL)
app.conf.update(
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=600,
)


@app.task(name="pfbench.noop")
def noop(i: int) -> int:
    return bodies.noop(i)


@app.task(name="pfbench.noop_range")
def noop_range(lo: int, hi: int) -> list[int]:
    return bodies.noop_range(lo, hi)


@app.task(name="pfbench.noop_list")
def noop_list(items: list[int]) -> list[int]:
    return bodies.noop_list(items)


@app.task(name="pfbench.pi_task")
def pi_task(j: int, samples: int) -> float:
    return bodies.pi_task(j, samples)


@app.task(name="pfbench.env_read_redis")
def env_read_redis(url: str, key: str, i: int, tasks: int) -> float:
    return bodies.env_read_redis(url, key, i, tasks)


# The fault workload gives Celery its documented protection against a lost
# worker process: acknowledge after the task ran, and requeue on worker loss.
@app.task(name="pfbench.slow_task", acks_late=True, reject_on_worker_lost=True)
def slow_task(i: int, marker_dir: str, seconds: float) -> int:
    return bodies.slow_task(i, marker_dir, seconds)


TASKS = {
    "noop": noop,
    "noop_range": noop_range,
    "noop_list": noop_list,
    "pi_task": pi_task,
    "env_read_redis": env_read_redis,
    "slow_task": slow_task,
}
