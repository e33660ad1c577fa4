"""Redis workers: the task loop, its supervisor, and local worker pools.

A *worker* is one process that takes tasks from one or more queues and runs
them, one at a time (:class:`Worker`). ``pforeach-worker start -n 4`` runs a
:class:`Supervisor` that starts n worker processes and watches over them:

* it keeps their heartbeats (the worker key and each running task's alive
  key) fresh from its own process, so a body stuck for minutes in a C call
  that holds the GIL still counts as alive;
* it stops a task that runs past its job's ``timeout``, reports the timeout
  as that task's result, and starts a fresh worker;
* when a worker process dies it puts the worker's task back at the front of
  the queue at once, and starts another;
* on SIGTERM or Ctrl+C, it asks its workers to hand running tasks back and
  exits.

Workers report to their supervisor over a pipe, one line per change:
``W <worker id>`` once, ``R <queue> <job> <task> <timeout>`` when a task
starts and ``I`` when it is done.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any

import redis

from ... import serialize
from ...errors import (
    BackendUnavailableError,
    OptionError,
    PayloadError,
    SerializationError,
    TaskTimeoutError,
    WorkerLostError,
)
from ...job import Failure, JobEnv, LoadedEnv, Task, TaskResult
from ...rng import SeedPlan
from .backend import load_secret, warn_if_exposed
from .client import CONNECTION_ERRORS, ConnectionSpec, Reconnecting, reach
from .keys import (
    FINISH,
    NOTICE_TAG,
    RECLAIM,
    RESULT_TAG,
    TAKE,
    Keys,
    TaskHeader,
    encode_outcome,
    parse_task,
    result_message,
)
from .values import DEFAULT_PART_SIZE, read_value, write_value

logger = logging.getLogger(__name__)

#: Exit code of a worker that stopped on purpose (queue removed, stop asked):
#: its supervisor does not start another.
EXIT_DONE = 0


@dataclass
class WorkerConfig:
    """How workers connect and behave; picklable, passed to worker processes.

    Attributes:
        queues: the queues to serve, first come first served.
        spec: where Redis is.
        secret: the shared HMAC key (None: payloads are not signed).
        alive_ttl: seconds a heartbeat lasts; refreshed three times as often.
        linger: seconds a worker waits after its queue was removed before it
            exits (the queue may come back meanwhile).
        block: seconds one blocking wait for a task lasts.
        key_ttl: seconds result and start keys last.
        part_size: values larger than this are stored in parts.
        env_cache: how many job environments a worker keeps.
        reconnect_timeout: seconds to keep trying a lost Redis before giving up.
        log_file, log_level: logging of worker processes.
        import_path: directories put first on the worker processes' module
            search path (start_local_workers passes the master's, so loop
            bodies defined in modules the master can import work locally).
    """

    queues: list[str]
    spec: ConnectionSpec = field(default_factory=ConnectionSpec)
    secret: bytes | None = None
    alive_ttl: float = 10.0
    linger: float = 30.0
    block: float = 2.0
    key_ttl: float = 120.0
    part_size: int = DEFAULT_PART_SIZE
    env_cache: int = 8
    reconnect_timeout: float = 3600.0
    log_file: str | None = None
    log_level: str = "INFO"
    import_path: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.queues:
            raise OptionError("a worker needs at least one queue")
        self.keys = [Keys(q) for q in self.queues]
        if self.alive_ttl < 1:
            raise OptionError(f"alive_ttl must be >= 1 second, not {self.alive_ttl!r}")


def new_worker_id() -> str:
    host = socket.gethostname().replace(" ", "_") or "host"
    return f"{host}-{os.getpid()}-{random.getrandbits(24):06x}"


class _Stop(BaseException):
    """Raised in the main thread to abandon the running task (hand it back)."""


class _Timeout(BaseException):
    """Raised in the main thread when a task runs past its time limit."""


@dataclass
class _Current:
    """What a worker is doing, for heartbeats."""

    queue: str = ""
    job_id: str = ""
    task_id: int = -1
    since: float = 0.0
    timeout: float | None = None
    tasks_done: int = 0


class Worker:
    """Takes tasks from Redis queues and runs them, in this process.

    Args:
        config: the worker's settings.
        report: called with a status line whenever the worker starts or
            finishes a task (the supervisor's pipe); None for a worker that
            runs alone, which then keeps its own heartbeat in a thread.
    """

    def __init__(
        self, config: WorkerConfig, report: Callable[[str], None] | None = None
    ) -> None:
        self.config = config
        self.wid = new_worker_id()
        # redis-py annotates replies as sync-or-async unions; plain Any reads better.
        self.r: Any = config.spec.connect()
        self.io = Reconnecting(config.spec, config.reconnect_timeout)
        self.report = report
        self.current = _Current()
        self.stopping = False
        self._running = False
        self._waiting = False  # blocked waiting for a task
        self._envs: OrderedDict[str, JobEnv] = OrderedDict()
        self._loaded: OrderedDict[str, LoadedEnv] = OrderedDict()
        self._turn = 0
        self._gone_since: dict[str, float] = {}
        self._take = self.r.register_script(TAKE)
        self.answers = Answers(self.r, config, self.io)
        self._reclaim = self.r.register_script(RECLAIM)
        self._parent = os.getppid()
        self._run_id = ""

    # -- life cycle --------------------------------------------------------------

    def serve(self) -> int:
        """Serves until stopped or until every queue is removed; returns EXIT_DONE."""
        self.io.call(self._register, "registration")
        if self.report is not None:
            self.report(f"W {self.wid}")
        heart = None if self.report is not None else _OwnHeartbeat(self)
        logger.info(
            "worker %s: serving %s at %s",
            self.wid,
            ", ".join(self.config.queues),
            self.config.spec.describe(),
        )
        try:
            while not self.stopping and self._serving():
                self._step()
        except _Stop:
            logger.info("worker %s: stopping; handing back its task, if any", self.wid)
        finally:
            if heart is not None:
                heart.stop()
            self._unregister()
        return EXIT_DONE

    def _register(self) -> None:
        pipe = self.r.pipeline(transaction=False)
        for keys in self.config.keys:
            pipe.sadd(keys.workers, self.wid)
            pipe.hset(
                keys.worker(self.wid),
                mapping={
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "queues": " ".join(self.config.queues),
                    "started": time.time(),
                    "tasks_done": 0,
                    "job": "",
                    "task": "",
                    "since": "",
                },
            )
            pipe.expire(keys.worker(self.wid), int(self.config.alive_ttl))
            pipe.incr(keys.count)
            pipe.set(keys.live, 1, nx=True)
        _execute_logged(pipe, f"worker {self.wid}: registration")
        self._run_id = self._server_id()

    def _server_id(self) -> str:
        """The Redis server's run id ("" if INFO is not allowed)."""
        try:
            return str(self.r.info("server").get("run_id", ""))
        except redis.ResponseError:
            return ""

    def _unregister(self) -> None:
        """Hands back anything still held and removes the worker's keys."""
        try:
            for keys in self.config.keys:
                self._reclaim(
                    keys=keys.reclaim_keys(self.wid),
                    args=[self.wid, "1", "1"],
                )
        except (redis.RedisError, OSError) as exc:  # lost, or a key of the wrong type
            logger.warning("worker %s: could not unregister (%s)", self.wid, exc)
        self.r.close()

    def _serving(self) -> bool:
        """False once every queue has been gone for longer than the linger time."""
        if self.report is not None and os.getppid() != self._parent:
            logger.warning("worker %s: its supervisor is gone; exiting", self.wid)
            return False
        return len(self._gone_since) < len(self.config.queues) or any(
            time.monotonic() - since < self.config.linger
            for since in self._gone_since.values()
        )

    def _check_queues(self) -> None:
        if self.io.reconnected:
            # A Redis that restarted empty forgot this worker and its queues'
            # live keys: register again, or the worker would take its queues
            # for removed and exit after the linger time.
            self.io.reconnected = False
            run_id = self._server_id()
            if not run_id or run_id != self._run_id:
                logger.warning(
                    "worker %s: Redis restarted; registering again", self.wid
                )
                self._register()
        pipe = self.r.pipeline(transaction=False)
        for keys in self.config.keys:
            pipe.exists(keys.live)
        for keys, live in zip(self.config.keys, pipe.execute()):
            if live:
                self._gone_since.pop(keys.queue, None)
            elif keys.queue not in self._gone_since:
                logger.info(
                    "worker %s: queue %s was removed; exiting in %gs unless it comes back",
                    self.wid,
                    keys.queue,
                    self.config.linger,
                )
                self._gone_since[keys.queue] = time.monotonic()

    # -- one task ------------------------------------------------------------------

    def _take_args(self, mode: str, index: int = 0) -> list[Any]:
        cfg = self.config
        return [
            self.wid,
            f"{time.time():.3f}",
            int(cfg.alive_ttl),
            int(cfg.key_ttl),
            mode,
            index,
        ]

    def _next_message(self) -> tuple[Keys, bytes, int] | None:
        keys_list = self.config.keys
        flat: list[str] = []
        for keys in keys_list:
            flat += [keys.queue, keys.proc(self.wid)]
        reply = self.io.call(
            lambda: self._take(keys=flat, args=self._take_args("take")), "take"
        )
        if not reply:
            # Nothing queued: block on one queue (in turn, when there are
            # several) until a task arrives or the wait times out.
            self._turn = (self._turn + 1) % len(keys_list)
            keys = keys_list[self._turn]
            wait = (
                self.config.block
                if len(keys_list) == 1
                else min(self.config.block, 0.2)
            )
            # SIGTERM interrupts this wait (see on_sigterm), however long it
            # is: a task moved meanwhile is in the processing list, which
            # _unregister hands back.
            self._waiting = True
            try:
                if self.stopping:
                    return None
                moved = self.io.call(
                    lambda: self.r.blmove(
                        keys.queue, keys.proc(self.wid), wait, "LEFT", "RIGHT"
                    ),
                    "waiting for tasks",
                )
            finally:
                self._waiting = False
            if moved is None:
                self.io.call(self._check_queues, "queue check")
                return None
            reply = self.io.call(
                lambda: self._take(
                    keys=flat, args=self._take_args("mark", self._turn + 1)
                ),
                "take",
            )
            if not reply:
                return None
        index, message, attempt = reply
        return keys_list[int(index) - 1], message, int(attempt)

    def _step(self) -> None:
        try:
            taken = self._next_message()
        except redis.ResponseError as exc:
            self._refused(exc)
            return
        if taken is None:
            return
        if self.stopping:
            # SIGTERM came while waiting for this task: it stays in the
            # processing list, and _unregister hands it back uncounted.
            return
        keys, message, attempt = taken
        if attempt == 0:
            logger.debug("worker %s: dropped a task of a removed job", self.wid)
            return
        try:
            # The payload is checked before the task counts as started, and
            # before anything of it is unpickled.
            try:
                if attempt < 0:  # the scripts could not read its header
                    parse_task(message)
                    raise PayloadError("the header does not match the scripts' pattern")
                header, payload = check_task(
                    message, keys, self.config.secret, self._read
                )
            except PayloadError as exc:
                self._reject(keys, message, exc)
                return
            self._begin(keys, header)
            try:
                self._run(keys, header, payload, attempt)
            finally:
                self._end()
        except redis.ResponseError as exc:
            # Not a lost connection: a key holds the wrong type (Q.out.J a
            # string, say) or a command is not allowed. Only this task suffers.
            logger.warning(
                "worker %s: Redis refused a command while serving a task of queue %s "
                "(%s); skipping the task",
                self.wid,
                keys.queue,
                exc,
            )
            self.io.call(lambda: self.r.delete(keys.proc(self.wid)), "clean-up")

    def _read(self, key: str) -> bytes | None:
        """GET through reconnects; a key of the wrong type reads as a bad payload."""
        try:
            value: bytes | None = self.io.call(
                lambda: self.r.get(key), f"reading {key}"
            )
        except redis.ResponseError as exc:
            raise PayloadError(f"{key}: {exc}") from None
        return value

    def _reject(self, keys: Keys, message: bytes, exc: PayloadError) -> None:
        """Drops a task that failed its checks, unread, and tells its master if it can."""
        try:
            header, _ = parse_task(message)
        except PayloadError:
            logger.warning(
                "worker %s: dropping a malformed message from queue %s: %s",
                self.wid,
                keys.queue,
                exc,
            )
            self.io.call(lambda: self.r.delete(keys.proc(self.wid)), "clean-up")
            return
        logger.warning(
            "worker %s: rejected task %d of job %s from queue %s: %s",
            self.wid,
            header.task_id,
            header.job_id,
            keys.queue,
            exc,
        )
        self._notice(keys, header, str(exc))

    def _refused(self, exc: redis.ResponseError) -> None:
        """Taking a task failed with an error from Redis, not a lost connection.

        Either a key holds the wrong type or the ACL forbids a command. The
        worker's own processing list, if that is the culprit, is removed (it
        belongs to this worker alone and holds no task between tasks); the
        pause keeps a lasting fault from spinning.
        """
        logger.warning("worker %s: Redis refused to hand out a task: %s", self.wid, exc)
        for keys in self.config.keys:
            proc = keys.proc(self.wid)
            try:
                kind = self.io.call(functools.partial(self.r.type, proc), "clean-up")
                if kind not in (b"list", b"none", "list", "none"):
                    logger.warning(
                        "worker %s: %s holds a %s, not a list; removing it",
                        self.wid,
                        proc,
                        kind.decode() if isinstance(kind, bytes) else kind,
                    )
                    self.io.call(functools.partial(self.r.delete, proc), "clean-up")
            except redis.ResponseError as error:
                logger.warning(
                    "worker %s: cannot inspect %s: %s", self.wid, proc, error
                )
        time.sleep(min(self.config.block, 1.0))

    def _begin(self, keys: Keys, header: TaskHeader) -> None:
        self.current = _Current(
            keys.queue,
            header.job_id,
            header.task_id,
            time.time(),
            header.timeout,
            self.current.tasks_done,
        )
        if self.report is not None:
            timeout = "-" if header.timeout is None else repr(header.timeout)
            self.report(f"R {keys.queue} {header.job_id} {header.task_id} {timeout}")
        logger.debug(
            "worker %s: job %s task %d started", self.wid, header.job_id, header.task_id
        )

    def _end(self) -> None:
        self.current = _Current(tasks_done=self.current.tasks_done + 1)
        if self.report is not None:
            self.report("I")

    def _run(
        self, keys: Keys, header: TaskHeader, payload: memoryview, attempt: int
    ) -> None:
        job_id, task_id = header.job_id, header.task_id
        if attempt > header.max_attempts:
            logger.warning(
                "worker %s: job %s task %d was taken %d times, each time by a worker "
                "that died; failing it",
                self.wid,
                job_id,
                task_id,
                attempt - 1,
            )
            error = WorkerLostError(
                f"job {job_id}: task {task_id} was tried {attempt - 1} times and its "
                "worker died each time"
            )
            self._push(keys, header, "fail", error)
            return
        env = self._environment(keys, header)
        if env is None:
            self._push(keys, header, "noenv", None)
            return
        try:
            task = load_task(header, payload)
        except SerializationError as exc:
            self._push(keys, header, "fail", exc)
            return
        except PayloadError as exc:
            logger.warning(
                "worker %s: rejected task %d of job %s from queue %s: %s",
                self.wid,
                task_id,
                job_id,
                keys.queue,
                exc,
            )
            self._notice(keys, header, str(exc))
            return
        seeds = SeedPlan(header.seed, header.np_seed)
        started = time.monotonic()
        result = self._execute(env, task, seeds, header)
        logger.debug(
            "worker %s: job %s task %d done in %.3fs",
            self.wid,
            job_id,
            task_id,
            time.monotonic() - started,
        )
        _log_failures(self.wid, job_id, result)
        self._push(keys, header, "ok", result)

    def _execute(
        self, env: LoadedEnv, task: Any, seeds: SeedPlan, header: TaskHeader
    ) -> TaskResult:
        # Alone in its main thread, a worker enforces the time limit itself;
        # under a supervisor, the supervisor does (it can stop any body).
        alarm = (
            header.timeout is not None
            and self.report is None
            and threading.current_thread() is threading.main_thread()
        )
        if alarm:
            previous = signal.signal(signal.SIGALRM, _raise_timeout)
            signal.setitimer(signal.ITIMER_REAL, float(header.timeout or 0))
        self._running = True
        try:
            return env.run(task, seeds)
        except _Timeout:
            return TaskResult.failed(task, _timeout_error(header))
        finally:
            self._running = False
            if alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)

    def _environment(self, keys: Keys, header: TaskHeader) -> LoadedEnv | None:
        """The job's environment: from the cache, else downloaded once."""
        loaded = self._loaded.get(header.job_id)
        if loaded is not None:
            self._loaded.move_to_end(header.job_id)
            return loaded
        env = self._envs.get(header.env_hash)
        if env is not None:
            self._envs.move_to_end(header.env_hash)
            loaded = LoadedEnv(env, header.job_id)
        else:
            key = keys.env(header.env_hash)
            started = time.monotonic()
            try:
                blob = self._read(key)
            except PayloadError as exc:
                logger.warning(
                    "worker %s: job %s: rejected environment %s: %s",
                    self.wid,
                    header.job_id,
                    key,
                    str(exc).removeprefix(key + ": "),
                )
                return None
            if blob is None:
                logger.warning(
                    "worker %s: job %s: environment %s is not in Redis",
                    self.wid,
                    header.job_id,
                    header.env_hash,
                )
                return None
            loaded = self._load_env(keys, header, blob)
            if loaded is None:
                return None
            logger.info(
                "worker %s: job %s: loaded environment %s (%d bytes, %.3fs)",
                self.wid,
                header.job_id,
                header.env_hash,
                len(blob),
                time.monotonic() - started,
            )
        self._loaded[header.job_id] = loaded
        while len(self._loaded) > self.config.env_cache:
            self._loaded.popitem(last=False)
        return loaded

    def _load_env(
        self, keys: Keys, header: TaskHeader, blob: bytes
    ) -> LoadedEnv | None:
        """The environment at ``blob``; None if it fails its checks (it is
        not unpickled then, and the master is asked to upload it again)."""
        key = keys.env(header.env_hash)
        identity = keys.identity("env", header.env_hash)
        try:
            sealed = read_value(_PartReader(self._read), key, blob)
            payload = serialize.unseal(sealed, identity, self.config.secret)
            if serialize.digest(bytes(payload)) != header.env_hash:
                raise PayloadError("content does not match its hash")
        except PayloadError as exc:
            reason = str(exc).removeprefix(identity + ": ").removeprefix(key + ": ")
            logger.warning(
                "worker %s: job %s: rejected environment %s: %s",
                self.wid,
                header.job_id,
                key,
                reason,
            )
            return None
        loaded = LoadedEnv.load(payload, header.job_id)
        if not loaded.broken:
            self._envs[header.env_hash] = loaded.env
            while len(self._envs) > self.config.env_cache:
                self._envs.popitem(last=False)
        return loaded

    # -- answering -----------------------------------------------------------------

    def _push(self, keys: Keys, header: TaskHeader, kind: str, value: Any) -> None:
        self.answers.push(keys, self.wid, header.job_id, header.task_id, kind, value)

    def _notice(self, keys: Keys, header: TaskHeader, text: str) -> None:
        """Tells the master its task was unreadable (unsigned: it may not share our key)."""
        message = result_message(
            NOTICE_TAG, header.job_id, header.task_id, self.wid, text.encode()
        )
        self.answers.finish(keys, self.wid, header.job_id, header.task_id, message)

    # -- signals ---------------------------------------------------------------------

    def on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        if self._running or self._waiting:
            raise _Stop()


class _PartReader:
    """Gives :func:`read_value` a ``get`` backed by any read function."""

    def __init__(self, read: Callable[[str], bytes | None]) -> None:
        self.get = read


def check_task(
    message: bytes,
    keys: Keys,
    secret: bytes | None,
    read_part: Callable[[str], bytes | None],
) -> tuple[TaskHeader, memoryview]:
    """Parses a task message and checks its payload, unpickling nothing.

    This and :func:`load_task` are all a worker does to a message it takes;
    neither needs a Redis, so both can be tried on any bytes.

    Args:
        message: the message as taken from the queue.
        keys: the queue's keys.
        secret: the shared HMAC key, or None.
        read_part: returns the bytes stored at a key, or None; used for the
            parts of a payload too large for the message.

    Returns:
        The header and the checked (still serialized) task.

    Raises:
        PayloadError: the message is malformed, a part is missing, or the
            payload fails its envelope or signature check.
    """
    header, blob = parse_task(message)
    # Bound to the header line exactly as it came (the master signs the bytes
    # it sends), so that no rewrite of it, however equivalent, passes.
    line = message[: len(message) - len(blob)].decode("ascii")
    identity = keys.identity("task", header.job_id, header.task_id, line)
    where = keys.task_value(header.job_id, header.task_id)
    sealed = read_value(_PartReader(read_part), where, blob)
    try:
        return header, serialize.unseal(sealed, identity, secret)
    except PayloadError as exc:
        # The identity holds the whole header line, which the caller names
        # better (job, task and queue): keep the reason only.
        raise PayloadError(str(exc).removeprefix(identity + ": ")) from None


def load_task(header: TaskHeader, payload: bytes | memoryview) -> Task:
    """Unpickles a payload that :func:`check_task` let through.

    Raises:
        SerializationError: it does not unpickle here (a missing module, say).
        PayloadError: it is not the task its header names.
    """
    task = serialize.loads(payload)
    # Without a secret nothing vouches for the bytes: check the shape the
    # worker relies on, so that a malformed task fails here, not mid-run.
    items = getattr(task, "items", None)
    if not (
        isinstance(task, Task)
        and getattr(task, "task_id", None) == header.task_id
        and isinstance(items, list)
        and all(
            isinstance(item, tuple)
            and len(item) == 2
            and isinstance(item[0], int)
            and isinstance(item[1], dict)
            and all(isinstance(k, str) for k in item[1])
            for item in items
        )
    ):
        raise PayloadError(
            f"job {header.job_id}: the payload of task {header.task_id} is not "
            f"that task (a {type(task).__name__})"
        )
    return task


def decode_task(
    message: bytes,
    keys: Keys,
    secret: bytes | None,
    read_part: Callable[[str], bytes | None],
) -> tuple[TaskHeader, Task]:
    """:func:`check_task` then :func:`load_task`: a message to a runnable task.

    Raises:
        PayloadError, SerializationError: as those two do; nothing else.
    """
    header, payload = check_task(message, keys, secret, read_part)
    return header, load_task(header, payload)


class Answers:
    """How a worker (or its supervisor, for a task it stopped) answers a task:
    the result is sealed, stored in parts if large, and pushed by FINISH."""

    def __init__(self, r: Any, config: WorkerConfig, io: Reconnecting) -> None:
        self.r = r
        self.config = config
        self.io = io
        self._finish = r.register_script(FINISH)

    def push(
        self, keys: Keys, wid: str, job_id: str, task_id: int, kind: str, value: Any
    ) -> None:
        """Answers with an outcome (``ok`` with a TaskResult, ``fail``, ``noenv``)."""
        config = self.config
        sealed = serialize.seal(
            encode_outcome(kind, value),
            keys.identity("result", job_id, task_id),
            config.secret,
        )
        pipe = self.r.pipeline(transaction=False)
        blob = write_value(
            pipe,
            keys.result_value(job_id, task_id, wid),
            sealed,
            config.part_size,
            config.key_ttl,
        )
        if len(pipe):
            self.io.call(pipe.execute, "result upload")
        message = result_message(RESULT_TAG, job_id, task_id, wid, blob)
        self.finish(keys, wid, job_id, task_id, message)
        logger.debug("worker %s: job %s task %d: pushed %s", wid, job_id, task_id, kind)

    def finish(
        self, keys: Keys, wid: str, job_id: str, task_id: int, message: bytes
    ) -> None:
        """Pushes ``message`` to the job's results and clears the task's keys."""
        self.io.call(
            lambda: self._finish(
                keys=[
                    keys.out(job_id),
                    keys.start(job_id, task_id),
                    keys.alive(job_id, task_id),
                    keys.proc(wid),
                    keys.job(job_id),
                ],
                args=[message, int(self.config.key_ttl), wid],
                client=self.r,
            ),
            "result push",
        )


def _log_failures(wid: str, job_id: str, result: TaskResult) -> None:
    """One warning per task whose body raised, naming the first failure."""
    failed = [(i, v) for i, v in result.items if isinstance(v, Failure)]
    if failed:
        index, first = failed[0]
        logger.warning(
            "worker %s: job %s task %d: %d of %d iteration(s) failed; "
            "first: iteration %d: %s: %s",
            wid,
            job_id,
            result.task_id,
            len(failed),
            result.size,
            index,
            type(first.error).__name__,
            first.error,
        )


def _raise_timeout(signum: int, frame: FrameType | None) -> None:
    raise _Timeout()


def _timeout_error(header: TaskHeader) -> TaskTimeoutError:
    return TaskTimeoutError(
        f"job {header.job_id}: task {header.task_id} ran longer than the "
        f"{header.timeout:g}s timeout"
    )


# -- heartbeats --------------------------------------------------------------------


def beat(r: Any, config: WorkerConfig, wid: str, current: _Current) -> None:
    """Refreshes one worker's key and, if it runs a task, the task's alive key."""
    ttl = int(config.alive_ttl)
    pipe = r.pipeline(transaction=False)
    for keys in config.keys:
        pipe.sadd(keys.workers, wid)
        pipe.hset(
            keys.worker(wid),
            mapping={
                # Who the worker is, again: a record removed meanwhile (the
                # queue was removed and came back) is rewritten whole.
                "host": socket.gethostname(),
                "pid": _pid_of(wid),
                "queues": " ".join(config.queues),
                "job": current.job_id,
                "task": "" if current.task_id < 0 else current.task_id,
                "since": current.since or "",
                "tasks_done": current.tasks_done,
                "beat": f"{time.time():.3f}",  # for job control's reports
            },
        )
        pipe.hsetnx(keys.worker(wid), "started", f"{time.time():.3f}")
        pipe.expire(keys.worker(wid), ttl)
        if current.job_id and keys.queue == current.queue:
            # Only refresh: TAKE creates the key and FINISH deletes it, and a
            # beat that lags behind a finished task must not bring it back.
            pipe.expire(keys.alive(current.job_id, current.task_id), ttl)
            # The start key lasts key_ttl; a task may run for longer.
            pipe.expire(
                keys.start(current.job_id, current.task_id), int(config.key_ttl)
            )
    if _execute_logged(pipe, f"worker {wid}: heartbeat"):
        # The worker's own record may hold the wrong type; it is this
        # worker's alone, so it is removed and the next beat writes it anew.
        for keys in config.keys:
            kind = r.type(keys.worker(wid))
            if kind not in (b"hash", b"none", "hash", "none"):
                logger.warning(
                    "worker %s: %s holds a %s, not a hash; removing it",
                    wid,
                    keys.worker(wid),
                    kind.decode() if isinstance(kind, bytes) else kind,
                )
                r.delete(keys.worker(wid))


def _pid_of(wid: str) -> str:
    """The process id in a worker id (``host-pid-random``)."""
    parts = wid.rsplit("-", 2)
    return parts[1] if len(parts) == 3 else ""


def _execute_logged(pipe: Any, what: str) -> bool:
    """Runs a pipeline whose commands stand alone: one that Redis refuses (a
    key of the wrong type, say) is logged instead of failing the others and
    the process (a lost connection still raises). Returns whether any was."""
    refused = False
    for reply in pipe.execute(raise_on_error=False):
        if isinstance(reply, CONNECTION_ERRORS):
            raise reply
        if isinstance(reply, redis.ResponseError):
            logger.warning("%s: Redis refused a command: %s", what, reply)
            refused = True
    return refused


class _OwnHeartbeat:
    """The heartbeat thread of a worker that runs without a supervisor."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._stop = threading.Event()
        self._client = worker.config.spec.connect()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        w = self.worker
        while not self._stop.wait(w.config.alive_ttl / 3):
            try:
                beat(self._client, w.config, w.wid, w.current)
            except (redis.RedisError, OSError):
                continue  # lost (the next beat retries) or refused (beat logged it)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._client.close()


# -- running workers -----------------------------------------------------------------


def run_worker(
    queues: str | Sequence[str],
    url: str | None = None,
    *,
    secret: bytes | str | None = None,
    **options: Any,
) -> int:
    """Serves one or more queues in this process until they are removed.

    The analog of doRedis's ``redisWorker``. Without a supervisor, the
    heartbeat is a thread, so a body that holds the GIL for longer than
    ``alive_ttl`` may be taken for dead and run again elsewhere; prefer
    ``pforeach-worker start`` for such bodies.

    Args:
        queues: a queue name or several.
        url: the Redis URL (default ``PFOREACH_REDIS_URL``).
        secret: the shared HMAC key (default ``PFOREACH_SECRET``).
        **options: further :class:`WorkerConfig` fields (alive_ttl, linger,
            block, key_ttl, part_size, env_cache, reconnect_timeout).

    Returns:
        0 once the queues are gone or SIGTERM asked the worker to stop.
    """
    config = make_config(queues, url, secret=secret, **options)
    worker = Worker(config)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, worker.on_sigterm) if in_main else None
    try:
        return worker.serve()
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def make_config(
    queues: str | Sequence[str],
    url: str | None = None,
    *,
    secret: bytes | str | None = None,
    spec: ConnectionSpec | None = None,
    **options: Any,
) -> WorkerConfig:
    names = [queues] if isinstance(queues, str) else list(queues)
    spec = (spec or ConnectionSpec(url)).check()
    config = WorkerConfig(names, spec, load_secret(secret), **options)
    warn_if_exposed(spec, config.secret)
    return config


@dataclass
class _Child:
    proc: subprocess.Popen[bytes]
    status: int  # read end of the status pipe
    buffer: bytes = b""
    wid: str = ""
    current: _Current = field(default_factory=_Current)
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    """Starts ``n`` worker processes and keeps them alive, beating for them."""

    def __init__(self, n: int, config: WorkerConfig, grace: float = 10.0) -> None:
        if n < 1:
            raise OptionError(f"need at least one worker process, not {n!r}")
        self.n = n
        self.config = config
        self.grace = grace
        self.children: list[_Child] = []
        self.stopping = False
        self.r: Any = config.spec.connect()
        self.io = Reconnecting(config.spec, config.reconnect_timeout)
        self.answers = Answers(self.r, config, self.io)
        self._reclaim = self.r.register_script(RECLAIM)
        self._restart_delay = 0.0
        self._restarts: list[float] = []  # when to start replacements

    def _spawn(self) -> _Child:
        read_fd, write_fd = os.pipe()
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD_MAIN, str(write_fd)],
            stdin=subprocess.PIPE,
            pass_fds=(write_fd,),
        )
        os.close(write_fd)
        assert proc.stdin is not None
        proc.stdin.write(pickle.dumps(self.config))
        proc.stdin.close()
        return _Child(proc, read_fd)

    def run(self) -> int:
        """Supervises until stopped (SIGTERM, Ctrl+C) or the queues are removed."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            # Workers may start before Redis does and wait for it, but refused
            # credentials or a certificate that does not verify are final.
            self.io.call(self.r.ping, "start")
        except BackendUnavailableError as exc:
            logger.error("supervisor %d: %s", os.getpid(), exc)
            raise
        self.children = [self._spawn() for _ in range(self.n)]
        logger.info(
            "supervisor %d: %d worker(s) serving %s at %s",
            os.getpid(),
            self.n,
            ", ".join(self.config.queues),
            self.config.spec.describe(),
        )
        interval = self.config.alive_ttl / 3
        next_beat = 0.0
        try:
            while not self.stopping and (self.children or self._restarts):
                timeout = max(0.0, min(next_beat - time.monotonic(), 0.5))
                self._read_status(timeout)
                self._check_children()
                self._check_timeouts()
                self._start_due()
                if time.monotonic() >= next_beat:
                    self._beat()
                    next_beat = time.monotonic() + interval
        finally:
            self._shutdown()
        return EXIT_DONE

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def _read_status(self, timeout: float) -> None:
        fds = [c.status for c in self.children]
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            return
        for child in self.children:
            if child.status not in ready:
                continue
            try:
                data = os.read(child.status, 65536)
            except OSError:
                data = b""
            child.buffer += data
            *lines, child.buffer = child.buffer.split(b"\n")
            for line in lines:
                self._status_line(child, line.decode())

    def _status_line(self, child: _Child, line: str) -> None:
        kind, _, rest = line.partition(" ")
        if kind == "W":
            child.wid = rest
        elif kind == "R":
            queue, job_id, task_id, timeout = rest.split(" ")
            child.current = _Current(
                queue,
                job_id,
                int(task_id),
                time.time(),
                None if timeout == "-" else float(timeout),
                child.current.tasks_done,
            )
        elif kind == "I":
            child.current = _Current(tasks_done=child.current.tasks_done + 1)

    def _beat_one(self, child: _Child) -> None:
        if child.wid:
            # Lost (the next beat retries) or refused (beat logged it).
            with contextlib.suppress(redis.RedisError, OSError):
                beat(self.r, self.config, child.wid, child.current)

    def _beat(self) -> None:
        for child in self.children:
            if child.proc.poll() is None:
                self._beat_one(child)

    def _check_children(self) -> None:
        for child in list(self.children):
            code = child.proc.poll()
            if code is None:
                continue
            self._read_rest(child)
            self.children.remove(child)
            os.close(child.status)
            if code == EXIT_DONE:
                # It stopped on purpose (queues removed, SIGTERM, supervisor
                # gone) and handed back its task itself: no replacement.
                logger.info("worker %s exited", child.wid or child.proc.pid)
                # A beat sent between its own unregistering and its exit may
                # have registered it again; no beat follows this one.
                self._release(child, uncount=True)
                continue
            logger.warning(
                "worker %s (pid %d) died with exit code %s%s",
                child.wid or "?",
                child.proc.pid,
                code,
                f" running job {child.current.job_id} task {child.current.task_id}; "
                "its task goes back to the queue"
                if child.current.job_id
                else "",
            )
            self._release(child, uncount=False)
            if not self.stopping:
                self._restart(child)

    def _read_rest(self, child: _Child) -> None:
        try:
            while data := os.read(child.status, 65536):
                child.buffer += data
        except OSError:
            pass
        for line in child.buffer.split(b"\n"):
            if line:
                self._status_line(child, line.decode())
        child.buffer = b""

    def _restart(self, dead: _Child) -> None:
        """Schedules a replacement for a worker that died.

        Workers that die young again and again (a broken install, a body that
        kills its process) are replaced ever more slowly instead of in a
        tight loop: up to 10 s apart if they die before registering, 1 s if
        they die while serving. The wait is scheduled, never slept, so that
        heartbeats for the other workers go on meanwhile.
        """
        now = time.monotonic()
        if now - dead.started >= 10.0:
            self._restart_delay = 0.0
        self._restarts.append(now + self._restart_delay)
        if now - dead.started < 10.0:
            cap = 1.0 if dead.wid else 10.0
            self._restart_delay = min(max(self._restart_delay * 2, 0.1), cap)

    def _start_due(self) -> None:
        now = time.monotonic()
        due = [t for t in self._restarts if t <= now]
        if due and not self.stopping:
            self._restarts = [t for t in self._restarts if t > now]
            self.children.extend(self._spawn() for _ in due)

    def _release(self, child: _Child, uncount: bool) -> None:
        """Puts a gone worker's task back on its queue and unregisters it."""
        if not child.wid:
            return
        for keys in self.config.keys:
            try:
                self.io.call(
                    functools.partial(
                        self._reclaim,
                        keys=keys.reclaim_keys(child.wid),
                        args=[child.wid, "1", "1" if uncount else "0"],
                    ),
                    "reclaim",
                )
            except Exception as exc:
                logger.warning("could not release worker %s: %s", child.wid, exc)

    def _check_timeouts(self) -> None:
        now = time.time()
        for child in list(self.children):
            cur = child.current
            if not cur.job_id or cur.timeout is None or now - cur.since <= cur.timeout:
                continue
            logger.warning(
                "worker %s: job %s task %d ran past its %gs limit; stopping it",
                child.wid,
                cur.job_id,
                cur.task_id,
                cur.timeout,
            )
            child.proc.kill()
            child.proc.wait()
            self.children.remove(child)
            os.close(child.status)
            keys = Keys(cur.queue)
            header = TaskHeader(cur.job_id, cur.task_id, "", 0, cur.timeout, 0, None)
            try:
                self.answers.push(
                    keys,
                    child.wid,
                    cur.job_id,
                    cur.task_id,
                    "fail",
                    _timeout_error(header),
                )
            except Exception as exc:
                logger.warning(
                    "worker %s: job %s task %d: could not report its timeout: %s",
                    child.wid,
                    cur.job_id,
                    cur.task_id,
                    exc,
                )
            self._release(child, uncount=False)
            if not self.stopping:
                self.children.append(self._spawn())

    def _shutdown(self) -> None:
        for child in self.children:
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for child in self.children:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
                self._read_rest(child)
                self._release(child, uncount=True)
        for child in self.children:
            os.close(child.status)
        self.children.clear()
        self.r.close()
        logger.info("supervisor %d: stopped", os.getpid())


_CHILD_MAIN = "from pforeach.backends.redis.worker import child_main; child_main()"
_DIE_WITH_PARENT = "PFOREACH_DIE_WITH_PARENT"
_SUPERVISOR_MAIN = (
    "from pforeach.backends.redis.worker import supervisor_main; supervisor_main()"
)


def configure_logging(log_file: str | None, level: str) -> None:
    """Sends pforeach's log to a file (or standard error) for worker processes."""
    handler: logging.Handler = (
        logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    )
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s %(levelname)s pforeach-worker[%(process)d] %(message)s"
        )
    )
    root = logging.getLogger("pforeach")
    root.addHandler(handler)
    root.setLevel(level.upper())


def child_main() -> None:
    """Entry point of a worker process started by a supervisor."""
    config: WorkerConfig = pickle.loads(sys.stdin.buffer.read())
    sys.path[:0] = [p for p in config.import_path if p not in sys.path]
    configure_logging(config.log_file, config.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides
    status = os.fdopen(int(sys.argv[1]), "w", buffering=1)

    def report(line: str) -> None:
        # A supervisor that is gone cannot be told; SIGTERM (below) or
        # _serving stops this worker.
        with contextlib.suppress(OSError):
            status.write(line + "\n")

    worker = Worker(config, report)
    signal.signal(signal.SIGTERM, worker.on_sigterm)
    # Nobody beats for a worker whose supervisor died, so its task would be
    # taken for lost: have the kernel send SIGTERM at once, which hands the
    # task back and exits, rather than finish a run that counts for nothing.
    _term_when_parent_dies(worker._parent)
    sys.exit(worker.serve())


def _term_when_parent_dies(parent: int) -> None:
    """Asks Linux for SIGTERM when this process's parent dies (elsewhere: no-op)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def supervisor_main() -> None:
    """Entry point of a supervisor started by :func:`start_local_workers`."""
    n, config = pickle.loads(sys.stdin.buffer.read())
    configure_logging(config.log_file, config.log_level)
    if os.environ.get(_DIE_WITH_PARENT) == "1":
        # The program that started these workers was killed (SIGKILL, or a
        # SIGTERM it did not handle): stop them instead of leaving them behind.
        _term_when_parent_dies(os.getppid())
    sys.exit(Supervisor(n, config).run())


class LocalWorkers:
    """Worker processes started on this machine by :func:`start_local_workers`.

    They stop when :meth:`stop` is called, when the program ends, or (after
    the linger time) when their queue is removed.
    """

    def __init__(self, n: int, config: WorkerConfig) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise OptionError(f"need at least one worker process, not {n!r}")
        self.n = n
        self.config = config
        # The kernel's parent-death signal follows the starting thread, so
        # only workers started from the main thread rely on it.
        main = threading.current_thread() is threading.main_thread()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SUPERVISOR_MAIN],
            stdin=subprocess.PIPE,
            env={**os.environ, _DIE_WITH_PARENT: "1" if main else "0"},
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(pickle.dumps((n, config)))
        self.proc.stdin.close()
        self._finalizer = weakref.finalize(self, _terminate, self.proc, 10.0)

    @property
    def pid(self) -> int:
        """The supervisor's process id."""
        return self.proc.pid

    def child_pids(self) -> list[int]:
        """The worker processes' ids (read from /proc; Linux only)."""
        path = f"/proc/{self.proc.pid}/task/{self.proc.pid}/children"
        try:
            with open(path) as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            return []

    def wait_ready(self, timeout: float = 30.0) -> LocalWorkers:
        """Waits until all ``n`` workers are registered on the first queue."""
        from .control import live_worker_ids

        keys = self.config.keys[0]
        client = self.config.spec.connect()
        deadline = time.monotonic() + timeout
        try:
            reach(client, self.config.spec)  # a clear error for refused credentials
            while (
                len(set(live_worker_ids(client, keys)) & self._wids(client, keys))
                < self.n
            ):
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"the workers exited with code {self.proc.returncode}"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.n} workers not ready after {timeout:g}s")
                time.sleep(0.05)
        finally:
            client.close()
        return self

    def _wids(self, client: Any, keys: Keys) -> set[str]:
        pids = {str(p) for p in self.child_pids()}
        found = set()
        for wid in client.smembers(keys.workers):
            text = wid.decode(errors="replace")
            # host-pid-random; other processes may register ids of any shape
            parts = text.rsplit("-", 2)
            if len(parts) == 3 and parts[1] in pids:
                found.add(text)
        return found

    def stop(self, timeout: float = 10.0) -> int:
        """Stops the workers (running tasks are handed back); returns the exit code."""
        self._finalizer.detach()
        return _terminate(self.proc, timeout)

    def kill(self) -> None:
        """Kills the supervisor at once (its workers notice and exit)."""
        self._finalizer.detach()
        self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> LocalWorkers:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def start_local_workers(
    n: int,
    queue: str | Sequence[str] = "jobs",
    url: str | None = None,
    *,
    secret: bytes | str | None = None,
    spec: ConnectionSpec | None = None,
    **options: Any,
) -> LocalWorkers:
    """Starts ``n`` worker processes on this machine (doRedis's startLocalWorkers).

    Args:
        n: how many worker processes.
        queue: the queue (or queues) they serve.
        url: the Redis URL (default ``PFOREACH_REDIS_URL``).
        secret: the shared HMAC key (default ``PFOREACH_SECRET``).
        spec: a full connection spec instead of ``url``.
        **options: further :class:`WorkerConfig` fields (alive_ttl, linger,
            block, key_ttl, part_size, env_cache, log_file, log_level,
            import_path: by default this process's ``sys.path``).

    Returns:
        A :class:`LocalWorkers` handle; they also stop when the program ends.

    Example:
        >>> workers = start_local_workers(2, "jobs")  # doctest: +SKIP
    """
    options.setdefault("import_path", [p for p in sys.path if p])
    config = make_config(queue, url, secret=secret, spec=spec, **options)
    return LocalWorkers(n, config)
