"""The master's side of the Redis backend: submit, collect, check, clean up.

One loop is one job. The master writes the job environment (unless Redis
already holds an identical one), a job record, and the tasks; then it drains
the job's result list, passing each task's first result on and dropping
repeats. Every ``ftinterval`` seconds it looks for trouble:

* a task with a start key but no alive key: its worker died; the task goes
  back to the front of the queue;
* a registered worker whose heartbeat expired: whatever it held goes back;
* when the queue is empty, a task that is neither started nor finished for
  a whole interval (its result was lost): it is submitted again;
* a Redis that restarted and lost its data: the environment, the job record
  and every unfinished task are written again.

A thread refreshes the TTLs of the job's keys while the loop runs, so a
master that dies leaves nothing behind for longer than ``key_ttl``.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from ... import serialize
from ...errors import JobCancelledError, PayloadError, SerializationError
from ...job import Job, Task, TaskResult
from .client import CONNECTION_ERRORS, Reconnecting, reach
from .control import live_worker_ids
from .keys import (
    DROP_JOB,
    JOB_QUEUED,
    KEEP_JOB,
    NOTICE_TAG,
    RECLAIM,
    REQUEUE,
    TOUCH_VALUE,
    TaskHeader,
    decode_outcome,
    parse_result,
    parse_task,
)
from .values import part_keys, read_value, write_value

logger = logging.getLogger(__name__)

#: Seconds a job waits for its first result before checking for workers.
_NO_WORKER_GRACE = 3.0

#: Results popped per round trip while they stream in.
_BATCH = 1000

#: Seconds a loop runs before its keeper thread starts.
_KEEPER_DELAY = 0.25


@dataclass
class _Inflight:
    """A submitted task, kept only as the message that can submit it again.

    The task's variables live on in the message's pickled bytes alone, so a
    master with many iterations in flight holds bytes, not Python objects.
    """

    task_id: int
    span: str  # "first-last" iterations, for messages
    size: int  # iterations
    message: bytes
    parts: dict[str, bytes]  # part key -> bytes, for a task too large for one key
    unseen_since: float | None = None  # no start key seen since (lost-result check)
    rejected: int = 0  # results that failed their checks, and notices, so far


class Master:
    """Runs one job on a :class:`~pforeach.backends.redis.RedisBackend`."""

    def __init__(self, backend: Any, job: Job) -> None:
        self.b = backend
        self.job = job
        self.keys = backend.keys
        # redis-py annotates replies as sync-or-async unions; plain Any reads better.
        self.r: Any = backend.client
        self.io = Reconnecting(backend.spec, backend.reconnect_timeout)
        self.inflight: dict[int, _Inflight] = {}
        self._inflight_iterations = 0
        self.exhausted = False
        self.submitted = 0
        self.finished = 0
        self.iterations = 0
        self.run_id = ""
        self._flowing = False  # results were waiting at the last look
        self.next_check = 0.0
        self._stop = threading.Event()
        self._job_missing = threading.Event()
        self._keeper: threading.Thread | None = None
        self._scripts = {
            name: self.r.register_script(src)
            for name, src in (
                ("drop", DROP_JOB),
                ("requeue", REQUEUE),
                ("reclaim", RECLAIM),
                ("queued", JOB_QUEUED),
            )
        }
        self._touch = self.r.register_script(TOUCH_VALUE)

    # -- the run ---------------------------------------------------------------

    def run(self) -> Iterator[TaskResult]:
        job = self.job
        _ = job.env_bytes  # serialize (and fail on unshippable captures) first
        try:
            self._open()
        except CONNECTION_ERRORS:
            # A Redis that is not there (or refuses us) fails the loop at once,
            # naming its address, rather than after reconnect_timeout. Asked
            # only after a failure: a PING before every loop costs a round trip.
            reach(self.r, self.b.spec)
            self.io.call(self._open, "job submission")
        completed = False
        try:
            self.next_check = time.monotonic() + self.b.ftinterval
            worker_check = time.monotonic() + _NO_WORKER_GRACE
            # The keeper first refreshes after its interval (0.5 s or more), so
            # a shorter loop has no use for it; starting a thread costs more
            # than a whole one-task loop's round trips on a busy machine.
            keeper_due = time.monotonic() + _KEEPER_DELAY
            while True:
                self._fill()
                if self.exhausted and not self.inflight:
                    completed = True
                    return
                yield from self._collect()
                if self._keeper is None and time.monotonic() >= keeper_due:
                    self._keeper = threading.Thread(
                        target=self._keep_alive, daemon=True
                    )
                    self._keeper.start()
                if worker_check and time.monotonic() >= worker_check:
                    worker_check = 0.0
                    self.io.call(self._warn_if_unserved, "worker check")
                if time.monotonic() >= self.next_check or self._needs_check():
                    self._fault_check()
                    self.next_check = time.monotonic() + self.b.ftinterval
        finally:
            self._close(completed)

    def _warn_if_unserved(self) -> None:
        """Says so, once, when a job waits on a queue that no worker serves."""
        if self.finished or live_worker_ids(self.r, self.keys):
            return
        logger.warning(
            "job %s: no worker serves queue %s at %s; the loop waits until one "
            "does (for example: pforeach-worker start -n 4 --queue %s --url ...)",
            self.job.job_id,
            self.keys.queue,
            self.b.spec.describe(),
            self.keys.queue,
        )

    def _needs_check(self) -> bool:
        return self.io.reconnected or self._job_missing.is_set()

    # -- submission ------------------------------------------------------------

    def _open(self) -> None:
        job, keys, b = self.job, self.keys, self.b
        address = b.own_address()
        record: dict[str, str | int | float] = {
            "user": getpass.getuser(),
            "host": socket.gethostname(),
            "address": address,
            "pid": os.getpid(),
            "submitted": time.time(),
            "env": job.env_hash,
            "env_size": len(job.env_bytes),
            "total": -1 if job.total is None else job.total,
            "tasks": self.submitted,
            "done": self.finished,
            "iterations_done": self.iterations,
        }
        try:
            replies = self._open_pipeline(record)
        except redis.exceptions.NoScriptError:
            # A server that has not seen the script (or lost it in a restart):
            # load it and write everything again; each command is idempotent.
            self.r.script_load(TOUCH_VALUE)
            replies = self._open_pipeline(record)
        env_present = replies[0]
        self.run_id = str(replies[-1].get("run_id", ""))
        if env_present:
            logger.debug(
                "job %s: environment %s already in Redis", job.job_id, job.env_hash
            )
        else:
            self._upload_env()
        logger.info(
            "job %s: submitting to queue %s at %s",
            job.job_id,
            keys.queue,
            b.spec.describe(),
        )

    def _open_pipeline(self, record: dict[str, str | int | float]) -> list[Any]:
        job, keys, b = self.job, self.keys, self.b
        # One round trip: the record, and whether Redis already holds an
        # identical environment (the same loop run again), kept alive if so.
        # EVALSHA itself rather than the Script object: redis-py asks SCRIPT
        # EXISTS before executing a pipeline that holds a Script, which is
        # one more round trip for every loop.
        pipe = self.r.pipeline(transaction=False)
        pipe.evalsha(self._touch.sha, 1, keys.env(job.env_hash), int(b.env_ttl))
        pipe.hset(keys.job(job.job_id), mapping=record)
        pipe.expire(keys.job(job.job_id), int(b.key_ttl))
        pipe.sadd(keys.jobs, job.job_id)
        pipe.set(keys.live, 1)
        # The run id of the server the job is written to, asked afresh:
        # redis-py silently replaces a connection that died between loops,
        # so a server restarted since the last loop is not otherwise seen,
        # and the first fault check would take the job for lost and submit
        # it all a second time.
        pipe.info("server")
        replies: list[Any] = pipe.execute()
        return replies

    def _upload_env(self) -> None:
        job, b = self.job, self.b
        key = self.keys.env(job.env_hash)
        sealed = serialize.seal(
            job.env_bytes, self.keys.identity("env", job.env_hash), b.secret
        )
        pipe = self.r.pipeline(transaction=False)
        blob = write_value(pipe, key, sealed, b.part_size, b.env_ttl)
        pipe.set(key, blob, ex=int(b.env_ttl))
        pipe.execute()
        logger.info(
            "job %s: uploaded environment %s (%d bytes)",
            job.job_id,
            job.env_hash,
            len(sealed),
        )

    def _message(self, task: Task) -> _Inflight:
        job, b = self.job, self.b
        header = TaskHeader(
            job.job_id,
            task.task_id,
            job.env_hash,
            job.max_attempts,
            job.timeout,
            job.seeds.python,
            job.seeds.numpy,
            _span(task),
        ).encode()
        identity = self.keys.identity("task", job.job_id, task.task_id, header.decode())
        sealed = serialize.seal(serialize.dumps(task), identity, b.secret)
        parts: dict[str, bytes] = {}
        blob = write_value(
            _Collect(parts),
            self.keys.task_value(job.job_id, task.task_id),
            sealed,
            b.part_size,
            b.key_ttl,
        )
        span = _span(task)
        return _Inflight(task.task_id, span, len(task.items), header + blob, parts)

    def _task_of(self, entry: _Inflight) -> Task:
        """The task an in-flight message carries (to name its iterations)."""
        header, _, blob = entry.message.partition(b"\n")
        sealed = b"".join(entry.parts.values()) if blob[:1] == b"#" else blob[1:]
        identity = self.keys.identity(
            "task", self.job.job_id, entry.task_id, header.decode() + "\n"
        )
        task = serialize.loads(serialize.unseal(sealed, identity, self.b.secret))
        assert isinstance(task, Task)
        return task

    def _fill(self) -> None:
        room = self.b.max_inflight - len(self.inflight)
        if (
            self.exhausted
            or room <= 0
            or self._inflight_iterations >= self.b.max_inflight_iterations
        ):
            return
        # Small first batches let workers start while the rest is prepared.
        batch = []
        limit = min(room, 32 if self.submitted == 0 else 512)
        iterations = self._inflight_iterations
        for task in self.job.tasks:
            batch.append(self._message(task))
            iterations += len(task.items)
            if len(batch) >= limit or iterations >= self.b.max_inflight_iterations:
                break
        else:
            self.exhausted = True
        if batch:
            self.io.call(
                lambda: self._push([e.message for e in batch], batch), "submission"
            )
            for entry in batch:
                self.inflight[entry.task_id] = entry
            self._inflight_iterations = iterations
            self.submitted += len(batch)

    def _push(
        self, messages: list[bytes], entries: list[_Inflight], front: bool = False
    ) -> None:
        pipe = self.r.pipeline(transaction=False)
        for entry in entries:
            for key, part in entry.parts.items():
                pipe.set(key, part, ex=int(self.b.key_ttl))
        if front:
            pipe.lpush(self.keys.queue, *reversed(messages))
        else:
            pipe.rpush(self.keys.queue, *messages)
        pipe.execute()

    # -- results ---------------------------------------------------------------

    def _collect(self) -> Iterator[TaskResult]:
        out = self.keys.out(self.job.job_id)
        messages: list[bytes] = []
        if self._flowing:
            messages = (
                self.io.call(lambda: self.r.lpop(out, _BATCH), "collecting") or []
            )
        self._flowing = bool(messages)
        if not messages:
            wait = max(0.05, min(1.0, self.next_check - time.monotonic()))
            popped = self.io.call(lambda: self.r.blpop([out], timeout=wait), "waiting")
            messages = [popped[1]] if popped else []
            self._flowing = bool(messages)  # more may be waiting behind it
        for message in messages:
            result = self._accept(message)
            if result is not None:
                self.finished += 1
                self.iterations += result.size
                yield result

    def _accept(self, message: bytes) -> TaskResult | None:
        job = self.job
        try:
            tag, job_id, task_id, wid, body = parse_result(message)
        except PayloadError as exc:
            logger.warning("job %s: dropping a malformed result: %s", job.job_id, exc)
            return None
        entry = self.inflight.get(task_id)
        if job_id != job.job_id or entry is None:
            logger.debug(
                "job %s: dropping a repeated result of task %d", job.job_id, task_id
            )
            return None
        if tag == NOTICE_TAG:
            # Our own message failed a worker's checks. Once may be a message
            # damaged in Redis (it is sent again); twice is a worker that does
            # not share our secret, which no retry cures.
            text = body[:500].decode(errors="replace")
            entry.rejected += 1
            if entry.rejected >= 2:
                raise PayloadError(
                    f"job {job.job_id}: worker {wid} could not read task {task_id}: "
                    f"{text}; the master and every worker must use the same secret "
                    "(secret=, PFOREACH_SECRET or --secret-file)"
                )
            logger.warning(
                "job %s: worker %s could not read task %d (%s); sending it again",
                job.job_id,
                wid,
                task_id,
                text,
            )
            self.io.call(
                lambda: self._push([entry.message], [entry], front=True), "resubmit"
            )
            return None
        key = self.keys.result_value(job_id, task_id, wid)
        try:
            sealed = self.io.call(
                lambda: read_value(self.r, key, body), "reading a result"
            )
            payload = serialize.unseal(
                sealed, self.keys.identity("result", job_id, task_id), self.b.secret
            )
            kind, value = decode_outcome(payload)
            if kind == "ok" and value.task_id != task_id:
                raise PayloadError(f"it holds the result of task {value.task_id}")
        except Exception as exc:
            # Nothing of a result that fails its checks is unpickled; it is
            # taken for lost and the task runs again. One that passes them but
            # does not unpickle here fails the same way every time, so after a
            # few tries its task fails with the reason.
            entry.rejected += 1
            if (
                isinstance(exc, SerializationError)
                and entry.rejected >= job.max_attempts
            ):
                self._retire(task_id)
                return TaskResult.failed(
                    self._task_of(entry),
                    SerializationError(
                        f"job {job_id}: the result of task {task_id} from worker {wid} "
                        f"cannot be read here: {exc}"
                    ),
                )
            logger.warning(
                "job %s: result of task %d from worker %s (at %s) is unusable (%s); "
                "running the task again",
                job.job_id,
                task_id,
                wid,
                self.keys.out(job_id),
                exc,
            )
            self.io.call(
                lambda: self._push([entry.message], [entry], front=True), "resubmit"
            )
            return None
        finally:
            stale = part_keys(key, body)
            if stale:
                self.r.delete(*stale)
        if kind == "noenv":
            logger.warning(
                "job %s: worker %s found no environment; uploading it again",
                job.job_id,
                wid,
            )
            self.io.call(lambda: self._upload_env(), "environment upload")
            self.io.call(
                lambda: self._push([entry.message], [entry], front=True), "resubmit"
            )
            return None
        self._retire(task_id)
        if kind == "fail":
            return TaskResult.failed(self._task_of(entry), value)
        result: TaskResult = value
        return result

    def _retire(self, task_id: int) -> None:
        """Forgets a finished task and deletes its arguments' part keys, if any:
        nobody needs them any more, and a job leaves no keys behind."""
        entry = self.inflight.pop(task_id)
        self._inflight_iterations -= entry.size
        if entry.parts:
            self.io.call(lambda: self.r.delete(*entry.parts), "clean-up")

    # -- fault checks ----------------------------------------------------------

    def _fault_check(self) -> None:
        self.io.call(self._check_server, "fault check")
        self.io.call(self._reclaim_dead_workers, "fault check")
        self.io.call(self._check_tasks, "fault check")

    def _check_server(self) -> None:
        """Notices a Redis that lost its data, and a job removed by someone else."""
        self.io.reconnected = False
        run_id = str(self.r.info("server").get("run_id", ""))
        if run_id != self.run_id:
            logger.warning(
                "job %s: Redis at %s restarted; writing the job and its %d unfinished "
                "tasks again",
                self.job.job_id,
                self.b.spec.describe(),
                len(self.inflight),
            )
            self._job_missing.clear()
            self._open()
            entries = list(self.inflight.values())
            for start in range(0, len(entries), 512):
                chunk = entries[start : start + 512]
                self._push([e.message for e in chunk], chunk)
            return
        # The keeper's flag only hurries the check: it may date from before a
        # restart handled above, so the record itself decides.
        self._job_missing.clear()
        if not self.r.exists(self.keys.job(self.job.job_id)):
            logger.warning(
                "job %s: removed from queue %s (remove_job or remove_queue); stopping",
                self.job.job_id,
                self.keys.queue,
            )
            raise JobCancelledError(
                f"job {self.job.job_id} was removed from queue {self.keys.queue}"
            )

    def _reclaim_dead_workers(self) -> None:
        keys = self.keys
        wids = [w.decode() for w in self.r.smembers(keys.workers)]
        if not wids:
            return
        pipe = self.r.pipeline(transaction=False)
        for wid in wids:
            pipe.exists(keys.worker(wid))
        for wid, alive in zip(wids, pipe.execute()):
            if alive:
                continue
            # Read first, only to say in the log which tasks go back.
            held = self.r.lrange(keys.proc(wid), 0, -1)
            moved = self._scripts["reclaim"](
                keys=keys.reclaim_keys(wid),
                args=[wid, "0", "0"],
            )
            if moved and moved > 0:
                logger.warning(
                    "queue %s: worker %s stopped answering; back to the queue: %s",
                    keys.queue,
                    wid,
                    _describe_held(held),
                )

    def _check_tasks(self) -> None:
        keys, job = self.keys, self.job
        ids = list(self.inflight)
        pipe = self.r.pipeline(transaction=False)
        for task_id in ids:
            pipe.get(keys.start(job.job_id, task_id))
            pipe.exists(keys.alive(job.job_id, task_id))
        replies = pipe.execute()
        now = time.monotonic()
        unseen = []
        for position, task_id in enumerate(ids):
            start, alive = replies[2 * position], replies[2 * position + 1]
            entry = self.inflight[task_id]
            if alive:
                entry.unseen_since = None  # running (heartbeats keep it so)
            elif start is not None:
                entry.unseen_since = None
                wid = bytes(start).decode().split(" ")[0]
                # REQUEUE checks again, in the same step as the move: the
                # task may have finished since the pipeline above.
                if self._scripts["requeue"](
                    keys=[
                        keys.queue,
                        keys.proc(wid),
                        keys.start(job.job_id, task_id),
                        keys.alive(job.job_id, task_id),
                    ],
                    args=[entry.message],
                ):
                    logger.warning(
                        "job %s: task %d (iterations %s) lost its worker %s; "
                        "resubmitting it",
                        job.job_id,
                        task_id,
                        entry.span,
                        wid,
                    )
            else:
                unseen.append(entry)
        if not unseen:
            return
        # Neither running nor finished: queued, or lost (taken but never
        # marked, or its result gone). Lost is decided only once none of the
        # job's tasks waits in the queue, for a whole interval: a worker that
        # took a task marks it within milliseconds.
        if self._scripts["queued"](keys=[keys.queue], args=[job.job_id]):
            for entry in unseen:
                entry.unseen_since = None
            return
        lost = []
        for entry in unseen:
            if entry.unseen_since is None:
                entry.unseen_since = now
            elif now - entry.unseen_since >= self.b.ftinterval * 0.9:
                lost.append(entry)
                entry.unseen_since = None
        if lost:
            logger.warning(
                "job %s: %d task(s) neither queued, running nor finished; "
                "resubmitting them",
                job.job_id,
                len(lost),
            )
            self._push([e.message for e in lost], lost, front=True)

    # -- keeping keys alive, cleaning up -----------------------------------------

    def _keep_alive(self) -> None:
        b, keys, job_id = self.b, self.keys, self.job.job_id
        client = b.aux_client()
        # At least once a second: the record's progress counts feed job
        # control (jobs(), `pforeach top`), which should not lag behind.
        interval = max(0.5, min(1.0, b.key_ttl / 4, b.env_ttl / 4))
        keep = client.register_script(KEEP_JOB)
        while not self._stop.wait(interval):
            try:
                found = keep(
                    keys=[
                        keys.job(job_id),
                        keys.env(self.job.env_hash),
                        keys.out(job_id),
                        keys.attempts(job_id),
                    ],
                    args=[
                        int(b.key_ttl),
                        int(b.env_ttl),
                        "tasks",
                        self.submitted,
                        "done",
                        self.finished,
                        "iterations_done",
                        self.iterations,
                        "total_tasks",
                        self.submitted if self.exhausted else -1,
                    ],
                )
                # Parts of a large task wait in Redis as long as the task
                # waits in the queue, which may be longer than key_ttl.
                parts = [k for e in list(self.inflight.values()) for k in e.parts]
                if parts:
                    pipe = client.pipeline(transaction=False)
                    for key in parts:
                        pipe.expire(key, int(b.key_ttl))
                    pipe.execute()
            except CONNECTION_ERRORS:
                continue  # the main loop reconnects and decides
            if not found:
                self._job_missing.set()

    def _close(self, completed: bool) -> None:
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join(timeout=2)
        job, keys = self.job, self.keys
        try:
            if not completed:
                # An interrupt may have cut a command short, leaving a reply
                # unread on a pooled connection: start from clean connections.
                self.r.connection_pool.disconnect()
            client = self.b.aux_client()
            removed = 0
            if completed:
                # Nothing of the job is left in the queue: skip the scan.
                pipe = client.pipeline(transaction=False)
                pipe.delete(
                    keys.out(job.job_id),
                    keys.job(job.job_id),
                    keys.attempts(job.job_id),
                )
                pipe.srem(keys.jobs, job.job_id)
                pipe.execute()
            else:
                removed = self._scripts["drop"](
                    keys=[
                        keys.queue,
                        keys.out(job.job_id),
                        keys.job(job.job_id),
                        keys.attempts(job.job_id),
                        keys.jobs,
                    ],
                    args=[job.job_id],
                    client=client,
                )
            if self.inflight:
                pipe = client.pipeline(transaction=False)
                for task_id, entry in self.inflight.items():
                    pipe.delete(
                        keys.start(job.job_id, task_id),
                        keys.alive(job.job_id, task_id),
                        *entry.parts,
                    )
                pipe.execute()
            if not completed:
                # How many of the others run is not known here: remove_job
                # may have taken queued ones before this clean-up.
                logger.info(
                    "job %s: cancelled; %d queued task(s) removed; tasks already "
                    "running finish and their results expire",
                    job.job_id,
                    removed,
                )
        except CONNECTION_ERRORS as exc:
            logger.warning(
                "job %s: could not clean up its keys (%s); they expire within %gs",
                job.job_id,
                exc,
                self.b.key_ttl,
            )


class _Collect:
    """Stands in for a pipeline to catch the part writes of a task message."""

    def __init__(self, parts: dict[str, bytes]) -> None:
        self.parts = parts

    def set(self, key: str, value: bytes, ex: int) -> None:
        self.parts[key] = value


def _describe_held(messages: list[bytes]) -> str:
    """``job J task T (iterations S)`` for each task message, for the log."""
    described = []
    for message in messages:
        try:
            header, _ = parse_task(message)
        except PayloadError:
            described.append("an unreadable task")
            continue
        described.append(
            f"job {header.job_id} task {header.task_id} (iterations {header.span})"
        )
    return ", ".join(described)


def _span(task: Task) -> str:
    first, last = task.items[0][0], task.items[-1][0]
    return str(first) if first == last else f"{first}-{last}"
