"""Redis backend: a shared job queue that workers on any machine can serve."""

from .backend import RedisBackend
from .control import (
    JobInfo,
    QueueStatus,
    TaskInfo,
    WorkerInfo,
    jobs,
    queue_status,
    queues,
    remove_job,
    remove_queue,
    tasks,
    workers,
)
from .worker import LocalWorkers, run_worker, start_local_workers

__all__ = [
    "LocalWorkers",
    "RedisBackend",
    "JobInfo",
    "QueueStatus",
    "TaskInfo",
    "WorkerInfo",
    "jobs",
    "queue_status",
    "queues",
    "remove_job",
    "remove_queue",
    "run_worker",
    "start_local_workers",
    "tasks",
    "workers",
]
