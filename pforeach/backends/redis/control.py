"""Job control: what runs on a queue, and removing jobs and queues.

These functions read the same keys the master and workers write, so they
work from any process that can reach Redis, while loops run elsewhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import redis

from ...errors import OptionError, PayloadError
from .client import ConnectionSpec
from .keys import DROP_JOB, Keys, parse_task

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobInfo:
    """A running job, as :func:`jobs` reports it."""

    queue: str
    job_id: str
    user: str
    host: str
    address: str
    pid: int
    submitted: float
    total: int | None  # iterations, when known
    tasks_submitted: int
    tasks_queued: int
    tasks_running: int
    tasks_done: int
    iterations_done: int


@dataclass(frozen=True)
class TaskInfo:
    """A running task, as :func:`tasks` reports it."""

    queue: str
    job_id: str
    task_id: int
    user: str
    master_host: str
    worker_id: str
    worker_host: str
    worker_pid: int
    iterations: str
    started: float
    last_heartbeat_ttl: float | None


@dataclass(frozen=True)
class WorkerInfo:
    """A live worker, as :func:`workers` reports it."""

    queue: str
    worker_id: str
    host: str
    pid: int
    queues: tuple[str, ...]
    started: float
    job_id: str
    task_id: int | None
    since: float | None
    tasks_done: int


def _client(client: redis.Redis | str | None) -> redis.Redis:
    if isinstance(client, redis.Redis):
        return client
    return ConnectionSpec(client).connect()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


def _number(value: Any, default: float = 0.0) -> float:
    try:
        return float(_text(value))
    except ValueError:
        return default


def live_worker_ids(client: redis.Redis, keys: Keys) -> list[str]:
    """Registered workers whose heartbeat has not expired."""
    wids = sorted(_text(w) for w in client.smembers(keys.workers))
    if not wids:
        return []
    pipe = client.pipeline(transaction=False)
    for wid in wids:
        pipe.exists(keys.worker(wid))
    return [wid for wid, alive in zip(wids, pipe.execute()) if alive]


def workers(queue: str = "jobs", client: redis.Redis | str | None = None) -> list[WorkerInfo]:
    """The live workers of ``queue``: who they are, what they run, since when.

    Args:
        queue: the queue name.
        client: a redis client or URL (default ``PFOREACH_REDIS_URL``).
    """
    r, keys = _client(client), Keys(queue)
    wids = live_worker_ids(r, keys)
    pipe = r.pipeline(transaction=False)
    for wid in wids:
        pipe.hgetall(keys.worker(wid))
    found = []
    for wid, record in zip(wids, pipe.execute()):
        if not record:
            continue
        rec = {_text(k): _text(v) for k, v in record.items()}
        task = rec.get("task", "")
        since = rec.get("since", "")
        found.append(WorkerInfo(
            queue, wid, rec.get("host", ""), int(_number(rec.get("pid"))),
            tuple(rec.get("queues", "").split()), _number(rec.get("started")),
            rec.get("job", ""), int(task) if task else None,
            _number(since) if since else None, int(_number(rec.get("tasks_done"))),
        ))
    return found


def _scan(r: redis.Redis, pattern: str) -> list[str]:
    return [_text(k) for k in r.scan_iter(match=pattern, count=1000)]


def jobs(queue: str = "jobs", client: redis.Redis | str | None = None) -> list[JobInfo]:
    """The running jobs of ``queue``, with their progress.

    Args:
        queue: the queue name.
        client: a redis client or URL (default ``PFOREACH_REDIS_URL``).
    """
    r, keys = _client(client), Keys(queue)
    ids = sorted(_text(j) for j in r.smembers(keys.jobs))
    queued: dict[str, int] = {}
    for message in r.lrange(keys.queue, 0, -1):
        parts = message[:80].split(b" ", 2)
        if len(parts) > 2:
            queued[_text(parts[1])] = queued.get(_text(parts[1]), 0) + 1
    found = []
    for job_id in ids:
        rec = {_text(k): _text(v) for k, v in r.hgetall(keys.job(job_id)).items()}
        if not rec:
            r.srem(keys.jobs, job_id)  # its master is gone and the record expired
            continue
        running = len(_scan(r, keys.job_pattern("start", job_id)))
        total = int(_number(rec.get("total"), -1))
        found.append(JobInfo(
            queue, job_id, rec.get("user", ""), rec.get("host", ""), rec.get("address", ""),
            int(_number(rec.get("pid"))), _number(rec.get("submitted")),
            None if total < 0 else total, int(_number(rec.get("tasks"))),
            queued.get(job_id, 0), running, int(_number(rec.get("done"))),
            int(_number(rec.get("iterations_done"))),
        ))
    return found


def tasks(queue: str = "jobs", client: redis.Redis | str | None = None) -> list[TaskInfo]:
    """The running tasks of ``queue``: which job, which worker, since when.

    Args:
        queue: the queue name.
        client: a redis client or URL (default ``PFOREACH_REDIS_URL``).
    """
    r, keys = _client(client), Keys(queue)
    found = []
    for wid in live_worker_ids(r, keys) + _dead_holders(r, keys):
        for message in r.lrange(keys.proc(wid), 0, -1):
            try:
                header, _ = parse_task(message)
            except PayloadError:
                continue
            job_id, task_id = header.job_id, header.task_id
            start = _text(r.get(keys.start(job_id, task_id)))
            if not start:
                continue
            job = {_text(k): _text(v) for k, v in r.hgetall(keys.job(job_id)).items()}
            worker = {_text(k): _text(v) for k, v in r.hgetall(keys.worker(wid)).items()}
            ttl = r.pttl(keys.alive(job_id, task_id))
            found.append(TaskInfo(
                queue, job_id, task_id, job.get("user", ""), job.get("host", ""), wid,
                worker.get("host", ""), int(_number(worker.get("pid"))),
                header.span, _number(start.split(" ")[-1]),
                ttl / 1000 if ttl and ttl > 0 else None,
            ))
    return found


def _dead_holders(r: redis.Redis, keys: Keys) -> list[str]:
    live = set(live_worker_ids(r, keys))
    return [_text(w) for w in r.smembers(keys.workers) if _text(w) not in live]


def remove_job(
    queue: str, job_id: str, client: redis.Redis | str | None = None
) -> int:
    """Cancels a job from any process: its queued tasks and keys are removed.

    Its master stops with JobCancelledError at its next fault check; tasks
    already running finish and their results expire.

    Returns:
        How many queued tasks were removed.
    """
    r, keys = _client(client), Keys(queue)
    if not r.exists(keys.job(job_id)) and not r.sismember(keys.jobs, job_id):
        raise OptionError(f"no job {job_id!r} on queue {queue!r}")
    removed = r.register_script(DROP_JOB)(
        keys=[keys.queue, keys.out(job_id), keys.job(job_id), keys.attempts(job_id), keys.jobs],
        args=[job_id],
    )
    stale = _scan(r, keys.job_pattern("start", job_id)) + _scan(r, keys.job_pattern("alive", job_id))
    if stale:
        r.delete(*stale)
    logger.info("queue %s: removed job %s (%d queued tasks)", queue, job_id, removed)
    return int(removed)


def remove_queue(queue: str, client: redis.Redis | str | None = None) -> int:
    """Deletes every key of ``queue``; its workers exit after their linger time.

    Returns:
        How many keys were deleted.
    """
    r, keys = _client(client), Keys(queue)
    names = set(_scan(r, f"{queue}.*"))
    if r.exists(keys.queue):
        names.add(keys.queue)
    ordered = sorted(names)
    for start in range(0, len(ordered), 500):
        r.delete(*ordered[start : start + 500])
    logger.info("removed queue %s (%d keys)", queue, len(names))
    return len(names)

