"""Job control: what runs on a queue, and removing jobs and queues.

These functions read the keys that masters and workers write (see
:mod:`~pforeach.backends.redis.keys`), so they work from any process that
reaches Redis while loops run elsewhere. A report is one atomic snapshot
(one Lua script, one round trip): its counts agree with each other.

Where the numbers come from:

* a job's record (``Q.job.J``): who submitted it, from where, and its
  progress, which the master writes about once a second;
* the workers' processing lists and the tasks' alive keys: what runs now
  (a task whose worker died stops counting when its alive key expires);
* the work queue: what waits.

Times are Unix timestamps taken on the machine that wrote them (master or
worker), so ages shown across machines are as good as their clocks agree.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeAlias

import redis

from ...errors import BackendUnavailableError, OptionError, PayloadError
from .client import CONNECTION_ERRORS, ConnectionSpec
from .keys import DROP_JOB, SNAPSHOT, Keys, check_queue_name, parse_task

logger = logging.getLogger(__name__)

#: Where to find Redis: a client, a connection spec, a URL, or None for
#: ``PFOREACH_REDIS_URL`` (else a Redis on this machine).
Target: TypeAlias = redis.Redis | ConnectionSpec | str | None

#: Seconds to wait for a connection when the functions here make their own.
CONNECT_TIMEOUT = 5.0

#: Seconds to wait for a reply: these are short commands, a hung server
#: should not hang the caller.
READ_TIMEOUT = 30.0


# -- records -----------------------------------------------------------------------


@dataclass(frozen=True)
class JobInfo:
    """A running job, as :func:`jobs` reports it.

    Attributes:
        queue: the queue the job runs on.
        job_id: the job's id.
        user: who submitted it.
        host: the machine its master runs on.
        address: the master's IP address as Redis sees it.
        pid: the master's process id.
        submitted: when it was submitted (Unix time, master's clock).
        iterations_total: iterations of the loop; None when not known in
            advance (a generator, a filter, a nested loop).
        iterations_done: iterations whose results the master received.
        tasks_total: tasks of the job; None while the master is still
            cutting the iterations into tasks.
        tasks_submitted: tasks the master has put on the queue so far.
        tasks_queued: tasks waiting in the queue.
        tasks_running: tasks a live worker is running.
        tasks_done: tasks whose results the master received.
    """

    queue: str
    job_id: str
    user: str
    host: str
    address: str
    pid: int
    submitted: float
    iterations_total: int | None
    iterations_done: int
    tasks_total: int | None
    tasks_submitted: int
    tasks_queued: int
    tasks_running: int
    tasks_done: int


@dataclass(frozen=True)
class TaskInfo:
    """A running task, as :func:`tasks` reports it.

    Attributes:
        queue: the queue the task came from.
        job_id: its job.
        task_id: the task's number in its job (0, 1, ...).
        iterations: the loop iterations it holds, ``"first-last"`` (0-based).
        attempt: how many times it was taken, this time included (more than
            1 after a worker died running it).
        user: who submitted the job ("" if the job was removed meanwhile).
        master_host: where the job's master runs.
        worker_id: the worker running it.
        worker_host: the worker's machine.
        worker_pid: the worker's process id.
        started: when the worker took it (Unix time, worker's clock).
        heartbeat: the worker's last heartbeat (Unix time, worker's clock).
        expires_in: seconds until the task counts as lost unless a heartbeat
            comes first.
    """

    queue: str
    job_id: str
    task_id: int
    iterations: str
    attempt: int
    user: str
    master_host: str
    worker_id: str
    worker_host: str
    worker_pid: int
    started: float | None
    heartbeat: float | None
    expires_in: float | None


@dataclass(frozen=True)
class WorkerInfo:
    """A live worker, as :func:`workers` reports it.

    Attributes:
        queue: the queue this report is about.
        worker_id: the worker's id, ``host-pid-random``.
        host: its machine.
        pid: its process id.
        queues: every queue it serves, in the order it serves them.
        started: when it started (Unix time, its clock).
        heartbeat: its last heartbeat (Unix time, its clock).
        job_id: the job of the task it runs; None when idle.
        task_id: the task it runs; None when idle.
        iterations: the iterations of that task, if it came from this queue.
        since: when it started that task.
        tasks_done: tasks it has finished since it started.
    """

    queue: str
    worker_id: str
    host: str
    pid: int
    queues: tuple[str, ...]
    started: float
    heartbeat: float | None
    job_id: str | None
    task_id: int | None
    iterations: str | None
    since: float | None
    tasks_done: int


@dataclass(frozen=True)
class QueueStatus:
    """Everything about one queue at one moment (see :func:`queue_status`).

    Attributes:
        queue: the queue's name.
        address: the Redis server, without credentials.
        length: tasks waiting in the queue, of any job.
        jobs, tasks, workers: as :func:`jobs`, :func:`tasks` and
            :func:`workers` report them.
    """

    queue: str
    address: str
    length: int
    jobs: list[JobInfo]
    tasks: list[TaskInfo]
    workers: list[WorkerInfo]


# -- connecting --------------------------------------------------------------------


def _spec_for(target: ConnectionSpec | str | None) -> ConnectionSpec:
    spec = target if isinstance(target, ConnectionSpec) else ConnectionSpec(target)
    if not isinstance(target, ConnectionSpec):
        spec = replace(spec, connect_timeout=CONNECT_TIMEOUT)
    if "socket_timeout" not in spec.extra:
        spec = replace(spec, extra={**spec.extra, "socket_timeout": READ_TIMEOUT})
    return spec


def describe(target: Target) -> str:
    """The address of ``target``, without credentials, for messages."""
    if not isinstance(target, redis.Redis):
        return _spec_for(target).describe()
    kwargs = target.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    tls = issubclass(target.connection_pool.connection_class, redis.SSLConnection)
    scheme = "rediss" if tls else "redis"
    host, port = kwargs.get("host", "localhost"), kwargs.get("port", 6379)
    return f"{scheme}://{host}:{port}/{kwargs.get('db', 0)}"


@contextmanager
def _session(target: Target) -> Iterator[tuple[Any, str]]:
    """A client for ``target`` and its address; closes a client made here.

    Raises:
        BackendUnavailableError: Redis could not be reached; names the address.
    """
    address = describe(target)
    # redis-py annotates replies as sync-or-async unions; Any reads better.
    client: Any = (
        target if isinstance(target, redis.Redis) else _spec_for(target).connect()
    )
    try:
        yield client, address
    except CONNECTION_ERRORS as exc:
        raise BackendUnavailableError(
            f"cannot reach Redis at {address}: {exc}"
        ) from exc
    except redis.RedisError as exc:
        # A server that refuses us (NOAUTH) or is not Redis at all.
        raise BackendUnavailableError(f"Redis at {address} failed: {exc}") from exc
    finally:
        if client is not target:
            client.close()


# -- reading -----------------------------------------------------------------------


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _record(flat: list[Any]) -> dict[str, str]:
    """A hash from the flat ``[field, value, ...]`` list that HGETALL returns."""
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def _int(value: str | None, default: int = 0) -> int:
    try:
        return int(float(value)) if value else default
    except ValueError:
        return default


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _count(value: str | None) -> int | None:
    """A count where -1 (or nothing) stands for "not known yet"."""
    number = _int(value, -1)
    return None if number < 0 else number


def _known_queues(r: Any) -> list[str]:
    """Queues that exist on the server (they have a ``.live`` key)."""
    suffix = ".live"
    names = (
        _text(k)[: -len(suffix)] for k in r.scan_iter(match="*" + suffix, count=1000)
    )
    # Other programs' keys may end in ".live" too; a queue name has no ".".
    return sorted({name for name in names if _is_queue_name(name)})


def _is_queue_name(name: str) -> bool:
    try:
        check_queue_name(name)
    except OptionError:
        return False
    return True


def _missing_queue(r: Any, queue: str, address: str) -> OptionError:
    known = _known_queues(r)
    listed = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "")
    return OptionError(
        f"no queue {queue!r} at {address}; "
        + (f"queues there: {listed}" if known else "there are no queues there")
    )


@dataclass
class _Held:
    """A task in a worker's processing list, as the snapshot found it."""

    wid: str
    job_id: str
    task_id: int
    span: str
    start: str
    ttl_ms: int
    attempt: int


def _snapshot(r: Any, queue: str, address: str, count_queued: bool) -> QueueStatus:
    keys = Keys(queue)
    reply = r.register_script(SNAPSHOT)(
        keys=[keys.queue], args=["1" if count_queued else "0"]
    )
    exists, job_rows, worker_rows, held_rows, queued_flat, length = reply
    if not exists:
        raise _missing_queue(r, queue, address)

    held: list[_Held] = []
    for wid, head, start, ttl, attempt in held_rows:
        try:
            header, _ = parse_task(bytes(head) + b"\n")
        except PayloadError:
            continue  # not a task header: nothing to report
        held.append(
            _Held(
                _text(wid),
                header.job_id,
                header.task_id,
                header.span,
                _text(start),
                int(ttl),
                _int(_text(attempt), 1),
            )
        )
    queued = {
        _text(queued_flat[i]): int(queued_flat[i + 1])
        for i in range(0, len(queued_flat) - 1, 2)
    }

    worker_records = {_text(wid): _record(flat) for wid, flat in worker_rows}
    job_records: dict[str, dict[str, str]] = {}
    orphans = []
    for job_id, flat in job_rows:
        record = _record(flat)
        if record.get("submitted"):
            job_records[_text(job_id)] = record
        elif not flat:
            orphans.append(_text(job_id))
    if orphans:
        # Their masters died and the records expired: drop the ids, or the
        # set of jobs would grow for ever.
        r.srem(keys.jobs, *orphans)

    return QueueStatus(
        queue,
        address,
        int(length),
        _jobs_from(queue, job_records, held, queued),
        _tasks_from(queue, job_records, worker_records, held),
        _workers_from(queue, worker_records, held),
    )


def _jobs_from(
    queue: str,
    records: Mapping[str, Mapping[str, str]],
    held: list[_Held],
    queued: Mapping[str, int],
) -> list[JobInfo]:
    running: dict[str, int] = {}
    for task in held:
        running[task.job_id] = running.get(task.job_id, 0) + 1
    found = [
        JobInfo(
            queue=queue,
            job_id=job_id,
            user=rec.get("user", ""),
            host=rec.get("host", ""),
            address=rec.get("address", ""),
            pid=_int(rec.get("pid")),
            submitted=_float(rec.get("submitted")) or 0.0,
            iterations_total=_count(rec.get("total")),
            iterations_done=_int(rec.get("iterations_done")),
            tasks_total=_count(rec.get("total_tasks")),
            tasks_submitted=_int(rec.get("tasks")),
            tasks_queued=queued.get(job_id, 0),
            tasks_running=running.get(job_id, 0),
            tasks_done=_int(rec.get("done")),
        )
        for job_id, rec in records.items()
    ]
    return sorted(found, key=lambda j: (j.submitted, j.job_id))


def _tasks_from(
    queue: str,
    jobs: Mapping[str, Mapping[str, str]],
    workers: Mapping[str, Mapping[str, str]],
    held: list[_Held],
) -> list[TaskInfo]:
    found = []
    for task in held:
        job, worker = jobs.get(task.job_id, {}), workers.get(task.wid, {})
        found.append(
            TaskInfo(
                queue=queue,
                job_id=task.job_id,
                task_id=task.task_id,
                iterations=task.span,
                attempt=task.attempt,
                user=job.get("user", ""),
                master_host=job.get("host", ""),
                worker_id=task.wid,
                worker_host=worker.get("host", ""),
                worker_pid=_int(worker.get("pid")),
                # The start value is "<worker id> <time>".
                started=_float(task.start.rpartition(" ")[2]),
                heartbeat=_float(worker.get("beat") or worker.get("started")),
                expires_in=task.ttl_ms / 1000 if task.ttl_ms >= 0 else None,
            )
        )
    return sorted(found, key=lambda t: (t.job_id, t.task_id))


def _workers_from(
    queue: str, records: Mapping[str, Mapping[str, str]], held: list[_Held]
) -> list[WorkerInfo]:
    spans = {(t.wid, t.job_id, t.task_id): t.span for t in held}
    found = []
    for wid, rec in records.items():
        job_id = rec.get("job") or None
        task_id = _int(rec.get("task"), -1) if job_id else -1
        found.append(
            WorkerInfo(
                queue=queue,
                worker_id=wid,
                host=rec.get("host", ""),
                pid=_int(rec.get("pid")),
                queues=tuple(rec.get("queues", "").split()),
                started=_float(rec.get("started")) or 0.0,
                heartbeat=_float(rec.get("beat") or rec.get("started")),
                job_id=job_id,
                task_id=task_id if task_id >= 0 else None,
                iterations=spans.get((wid, job_id or "", task_id)),
                since=_float(rec.get("since")) if job_id else None,
                tasks_done=_int(rec.get("tasks_done")),
            )
        )
    return sorted(found, key=lambda w: (w.host, w.pid, w.worker_id))


def _status(queue: str, client: Target, count_queued: bool) -> QueueStatus:
    """Checks the queue's name, then takes one snapshot of it on ``client``."""
    check_queue_name(queue)
    with _session(client) as (r, address):
        return _snapshot(r, queue, address, count_queued)


# -- public API --------------------------------------------------------------------


def queue_status(queue: str = "jobs", client: Target = None) -> QueueStatus:
    """Jobs, running tasks and live workers of ``queue``, all at one moment.

    Args:
        queue: the queue's name.
        client: a redis client, a :class:`ConnectionSpec` or a URL (default
            ``PFOREACH_REDIS_URL``).

    Raises:
        OptionError: no such queue on the server (the message lists those
            that exist).
        BackendUnavailableError: Redis could not be reached.
    """
    return _status(queue, client, count_queued=True)


def jobs(queue: str = "jobs", client: Target = None) -> list[JobInfo]:
    """The running jobs of ``queue`` and their progress, oldest first.

    Counting the queued tasks of each job reads the whole queue inside
    Redis; that is quick for the queue lengths masters produce (at most
    ``max_inflight`` tasks per job), but not free.

    Args:
        queue: the queue's name.
        client: a redis client, a :class:`ConnectionSpec` or a URL (default
            ``PFOREACH_REDIS_URL``).

    Raises:
        OptionError: no such queue on the server.
        BackendUnavailableError: Redis could not be reached.

    Example:
        >>> for job in jobs("jobs"):  # doctest: +SKIP
        ...     print(job.job_id, job.tasks_done, "/", job.tasks_total)
    """
    return _status(queue, client, count_queued=True).jobs


def tasks(queue: str = "jobs", client: Target = None) -> list[TaskInfo]:
    """The tasks of ``queue`` that live workers are running now.

    Args:
        queue: the queue's name.
        client: a redis client, a :class:`ConnectionSpec` or a URL (default
            ``PFOREACH_REDIS_URL``).

    Raises:
        OptionError: no such queue on the server.
        BackendUnavailableError: Redis could not be reached.
    """
    return _status(queue, client, count_queued=False).tasks


def workers(queue: str = "jobs", client: Target = None) -> list[WorkerInfo]:
    """The live workers of ``queue``: who they are, what they run, since when.

    A worker that dies without saying goodbye drops out of the list once its
    heartbeat expires (``alive_ttl`` seconds). For just the number, use
    ``RedisBackend.workers()`` or ``pforeach.workers()``.

    Args:
        queue: the queue's name.
        client: a redis client, a :class:`ConnectionSpec` or a URL (default
            ``PFOREACH_REDIS_URL``).

    Raises:
        OptionError: no such queue on the server.
        BackendUnavailableError: Redis could not be reached.
    """
    return _status(queue, client, count_queued=False).workers


def queues(client: Target = None) -> list[str]:
    """The names of the queues on the server, sorted.

    A queue exists from its first worker or job until :func:`remove_queue`.
    This scans the server's keys, so it takes a while on a server that holds
    millions of them.

    Raises:
        BackendUnavailableError: Redis could not be reached.
    """
    with _session(client) as (r, _):
        return _known_queues(r)


def remove_job(queue: str, job_id: str, client: Target = None) -> int:
    """Cancels a job from any process: its queued tasks and its keys go.

    Its master stops with :class:`~pforeach.JobCancelledError` at its next
    fault check. Tasks already running finish; their results are dropped.

    Args:
        queue: the queue's name.
        job_id: the job's id, as :func:`jobs` reports it.
        client: a redis client, a :class:`ConnectionSpec` or a URL.

    Returns:
        How many queued tasks were removed.

    Raises:
        OptionError: no such queue, or no such job on it.
        BackendUnavailableError: Redis could not be reached.
    """
    keys = Keys(queue)
    with _session(client) as (r, address):
        pipe = r.pipeline(transaction=False)
        pipe.exists(keys.queue, keys.live, keys.workers, keys.jobs)
        pipe.exists(keys.job(job_id))
        pipe.sismember(keys.jobs, job_id)
        queue_found, record_found, listed = pipe.execute()
        if not queue_found:
            raise _missing_queue(r, queue, address)
        if not record_found and not listed:
            running = sorted(_text(j) for j in r.smembers(keys.jobs))
            raise OptionError(
                f"no job {job_id!r} on queue {queue!r} at {address}; "
                + (f"its jobs: {', '.join(running)}" if running else "it has no jobs")
            )
        removed = int(
            r.register_script(DROP_JOB)(
                keys=[
                    keys.queue,
                    keys.out(job_id),
                    keys.job(job_id),
                    keys.attempts(job_id),
                    keys.jobs,
                ],
                args=[job_id],
            )
        )
    # Start and alive keys of its running tasks are left to their workers
    # (FINISH deletes them) and its master (clean-up on cancel); both expire.
    logger.info(
        "queue %s: job %s removed (%d queued task(s) dropped)", queue, job_id, removed
    )
    return removed


def remove_queue(queue: str, client: Target = None) -> int:
    """Deletes every key of ``queue``.

    Its workers exit after their linger time unless the queue comes back;
    masters of its jobs stop with :class:`~pforeach.JobCancelledError`.

    Args:
        queue: the queue's name.
        client: a redis client, a :class:`ConnectionSpec` or a URL.

    Returns:
        How many keys were deleted.

    Raises:
        OptionError: no such queue.
        BackendUnavailableError: Redis could not be reached.
    """
    keys = Keys(queue)
    with _session(client) as (r, address):
        if not r.exists(keys.queue, keys.live, keys.workers, keys.jobs):
            raise _missing_queue(r, queue, address)
        # '.' cannot occur in a queue name, so "Q.*" never matches the keys
        # of another queue.
        names = [
            keys.queue,
            *(_text(k) for k in r.scan_iter(match=f"{queue}.*", count=1000)),
        ]
        deleted = 0
        pipe = r.pipeline(transaction=False)
        for start in range(0, len(names), 1000):
            # UNLINK frees large values in the background, not in the
            # server's main thread.
            pipe.unlink(*names[start : start + 1000])
        for count in pipe.execute():
            deleted += int(count)
    logger.info("queue %s removed (%d keys deleted)", queue, deleted)
    return deleted


def live_worker_ids(client: Any, keys: Keys) -> list[str]:
    """Ids of the workers registered on a queue whose heartbeat has not expired."""
    wids = sorted(_text(w) for w in client.smembers(keys.workers))
    if not wids:
        return []
    pipe = client.pipeline(transaction=False)
    for wid in wids:
        pipe.exists(keys.worker(wid))
    return [wid for wid, alive in zip(wids, pipe.execute()) if alive]


__all__ = [
    # records
    "JobInfo",
    "QueueStatus",
    "TaskInfo",
    "WorkerInfo",
    # reading
    "jobs",
    "queue_status",
    "queues",
    "tasks",
    "workers",
    # removing
    "remove_job",
    "remove_queue",
]
