"""The local backend: a pool of worker processes on this machine.

The master talks to each worker process over a pair of pipes::

    master --E job env (once per job)--> worker
    master --T task--------------------> worker     (up to `prefetch` queued)
    master <---------------result R---- worker

Workers are fresh interpreters started with ``python -m
pforeach.backends.local`` rather than forks or ``multiprocessing`` spawns:
nothing of the master is copied or re-imported (a script's top level does not
run again), and the body arrives by value, just as on a remote worker.

A worker that dies (a crash, ``os._exit``, the OOM killer) closes its pipe;
the master then tries its running task again on a fresh process, up to
``max_attempts`` times, and fails the task's iterations with
:class:`~pforeach.errors.WorkerLostError` after that. A task that runs past
``timeout`` has its process killed and fails with
:class:`~pforeach.errors.TaskTimeoutError`.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Generator, Iterator
from multiprocessing.connection import Connection, wait

from .. import serialize
from ..errors import (
    OptionError,
    PforeachError,
    SerializationError,
    TaskTimeoutError,
    WorkerLostError,
)
from ..job import Job, LoadedEnv, Task, TaskResult
from .base import Backend

logger = logging.getLogger(__name__)

_ENV, _REUSE, _TASK, _QUIT = b"E", b"R", b"T", b"Q"
# The worker imports this very pforeach, even when the master found it through
# a sys.path entry (a checkout, a test runner) that a fresh interpreter lacks.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_WORKER_MAIN = (
    f"import sys; sys.path.insert(0, {_ROOT!r}); "
    "from pforeach.backends.local import main; main()"
)


class _Worker:
    """One worker process, its pipes, and the tasks sent to it."""

    def __init__(self) -> None:
        task_r, task_w = os.pipe()
        result_r, result_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_MAIN, str(task_r), str(result_w)],
            pass_fds=(task_r, result_w),
            stdin=subprocess.DEVNULL,
        )
        os.close(task_r)
        os.close(result_w)
        self.results = Connection(result_r, writable=False)
        self._out = Connection(task_w, readable=False)
        self._sends: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        # Sends go through a thread: a large task written while the worker is
        # itself blocked writing a large result would otherwise deadlock.
        self._feeder = threading.Thread(target=self._feed, daemon=True)
        self._feeder.start()
        self.job_id = ""
        self.env_hash = ""  # the environment the process holds, by content
        self.outstanding: deque[Task] = deque()
        self.started = 0.0  # when the first outstanding task began running
        self.send(serialize.dumps(sys.path))

    def _feed(self) -> None:
        while (data := self._sends.get()) is not None:
            try:
                self._out.send_bytes(data)
            except OSError:
                return

    def send(self, data: bytes) -> None:
        self._sends.put(data)

    def kill(self) -> None:
        self._sends.put(None)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.results.close()
        self._out.close()

    def stop(self, timeout: float = 2.0) -> None:
        self.send(_QUIT)
        self._sends.put(None)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


class LocalBackend(Backend):
    """Runs loops on ``n`` worker processes on this machine.

    The processes start on the first loop and serve every loop after it
    until :meth:`close` (or the end of the program). Each receives a job's
    environment once, then tasks of ``chunksize`` iterations; results stream
    back as they finish.

    Args:
        n: the number of worker processes (default: the CPU count).
        prefetch: how many tasks each worker may hold at once; 2 hides the
            round trip between tasks.
    """

    name = "local"

    def __init__(self, n: int | None = None, *, prefetch: int = 2) -> None:
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise OptionError(f"LocalBackend needs n >= 1 worker processes, not {n!r}")
        if prefetch < 1:
            raise OptionError(f"prefetch must be >= 1, not {prefetch!r}")
        self.n = n or os.cpu_count() or 1
        self.prefetch = prefetch
        self._pool: list[_Worker] = []
        self._busy = threading.Lock()
        self._finalizer = weakref.finalize(self, _stop_all, self._pool)

    def workers(self) -> int:
        return self.n

    def close(self) -> None:
        _stop_all(self._pool)

    def run(self, job: Job) -> Generator[TaskResult, None, None]:
        if not self._busy.acquire(blocking=False):
            raise PforeachError(
                "this LocalBackend is already running a loop; nested or concurrent "
                "dopar calls need a backend each"
            )
        try:
            yield from _Schedule(self, job).run()
        finally:
            self._busy.release()

    def _start_missing(self) -> None:
        self._pool[:] = [w for w in self._pool if w.proc.poll() is None]
        while len(self._pool) < self.n:
            self._pool.append(_Worker())


def _stop_all(pool: list[_Worker]) -> None:
    for worker in pool:
        worker.stop()
    pool.clear()


class _Schedule:
    """The master's side of one job on the local pool."""

    def __init__(self, backend: LocalBackend, job: Job) -> None:
        self.backend = backend
        self.job = job
        self.tasks: Iterator[Task] = job.tasks
        self.retry: deque[Task] = deque()  # tasks to send before new ones
        self.attempts: dict[int, int] = {}
        self.exhausted = False
        self.inflight = 0

    def _next_task(self) -> Task | None:
        if self.retry:
            return self.retry.popleft()
        if self.exhausted:
            return None
        task = next(self.tasks, None)
        if task is None:
            self.exhausted = True
        return task

    def _assign(self) -> None:
        job = self.job
        # Breadth first: every worker holds one task before any holds a second,
        # so that a loop with fewer tasks than workers * prefetch still spreads.
        for depth in range(1, self.backend.prefetch + 1):
            for worker in self.backend._pool:
                if len(worker.outstanding) >= depth:
                    continue
                task = self._next_task()
                if task is None:
                    return
                if worker.job_id != job.job_id:
                    head = job.job_id.encode() + b" " + job.env_hash.encode()
                    if worker.env_hash == job.env_hash:
                        # The same loop again: the process keeps what it holds.
                        worker.send(_REUSE + head)
                    else:
                        worker.send(_ENV + head + b"\n" + job.env_bytes)
                    worker.job_id, worker.env_hash = job.job_id, job.env_hash
                if not worker.outstanding:
                    worker.started = time.monotonic()
                worker.outstanding.append(task)
                worker.send(_TASK + serialize.dumps((job.job_id, job.seeds, task)))
                self.inflight += 1

    def run(self) -> Iterator[TaskResult]:
        job, pool = self.job, self.backend._pool
        _ = job.env_bytes  # serialize (and fail on unshippable captures) up front
        completed = False
        try:
            self.backend._start_missing()
            while True:
                self._assign()
                if self.inflight == 0:
                    completed = True
                    return
                ready = wait([w.results for w in pool], timeout=self._wait_time())
                for worker in list(pool):
                    if worker.results in ready:
                        yield from self._receive(worker)
                yield from self._check_timeouts()
        finally:
            if not completed:
                self._cancel()

    def _wait_time(self) -> float | None:
        if self.job.timeout is None:
            return None
        now = time.monotonic()
        ends = [
            w.started + self.job.timeout - now
            for w in self.backend._pool
            if w.outstanding
        ]
        return max(0.0, min(ends)) + 0.01 if ends else None

    def _receive(self, worker: _Worker) -> Iterator[TaskResult]:
        try:
            data = worker.results.recv_bytes()
        except (EOFError, OSError):
            yield from self._lost(worker)
            return
        job_id, _, payload = data.partition(b"\n")
        if job_id.decode() != self.job.job_id or not worker.outstanding:
            return  # a late result of a cancelled job
        task = worker.outstanding.popleft()
        worker.started = time.monotonic()
        self.inflight -= 1
        try:
            yield serialize.loads(payload)
        except SerializationError as exc:
            # A value that pickles but does not unpickle here fails its task only.
            yield TaskResult.failed(task, exc)

    def _replace(self, worker: _Worker) -> None:
        """Kills ``worker``, requeues what it held but never ran, starts another."""
        worker.kill()
        pool = self.backend._pool
        pool.remove(worker)
        self.inflight -= len(worker.outstanding)
        # The tasks queued behind the running one never started: send them
        # again first, in their order, without counting an attempt.
        self.retry.extendleft(reversed(list(worker.outstanding)[1:]))
        pool.append(_Worker())

    def _lost(self, worker: _Worker) -> Iterator[TaskResult]:
        code = worker.proc.wait()
        running = worker.outstanding[0] if worker.outstanding else None
        self._replace(worker)
        if running is None:
            return
        tries = self.attempts[running.task_id] = (
            self.attempts.get(running.task_id, 0) + 1
        )
        logger.warning(
            "job %s: worker process %d died (exit code %s) running task %d "
            "(iterations %s); attempt %d of %d",
            self.job.job_id,
            worker.proc.pid,
            code,
            running.task_id,
            _span(running),
            tries,
            self.job.max_attempts,
        )
        if tries < self.job.max_attempts:
            self.retry.appendleft(running)
            return
        yield TaskResult.failed(
            running,
            WorkerLostError(
                f"job {self.job.job_id}: the worker process running task "
                f"{running.task_id} (iterations {_span(running)}) died {tries} "
                f"times (last exit code {code})"
            ),
        )

    def _check_timeouts(self) -> Iterator[TaskResult]:
        limit = self.job.timeout
        if limit is None:
            return
        now = time.monotonic()
        for worker in list(self.backend._pool):
            if worker.outstanding and now - worker.started > limit:
                task = worker.outstanding[0]
                logger.warning(
                    "job %s: task %d (iterations %s) ran past its %gs limit; "
                    "stopping its worker process",
                    self.job.job_id,
                    task.task_id,
                    _span(task),
                    limit,
                )
                self._replace(worker)
                yield TaskResult.failed(
                    task,
                    TaskTimeoutError(
                        f"job {self.job.job_id}: task {task.task_id} (iterations "
                        f"{_span(task)}) ran longer than the {limit:g}s timeout"
                    ),
                )

    def _cancel(self) -> None:
        """Stops work in progress so the next loop starts on idle workers."""
        for worker in list(self.backend._pool):
            if worker.outstanding:
                worker.kill()
                self.backend._pool.remove(worker)


def _span(task: Task) -> str:
    first, last = task.items[0][0], task.items[-1][0]
    return str(first) if first == last else f"{first}-{last}"


# -- the worker process ------------------------------------------------------------


def _serve(inbox: Connection, outbox: Connection) -> None:
    sys.path[:] = serialize.loads(inbox.recv_bytes())
    envs: dict[str, LoadedEnv] = {}
    kept: LoadedEnv | None = None  # the last environment received
    while True:
        try:
            data = inbox.recv_bytes()
        except EOFError:
            return
        kind = data[:1]
        if kind in (_ENV, _REUSE):
            head, _, env = data[1:].partition(b"\n")
            job_id = head.split(b" ")[0].decode()
            envs.clear()  # one job at a time: the previous one is over
            if kind == _ENV:
                loaded = kept = LoadedEnv.load(env, job_id)
            elif kept is None:  # never sent by the master: it tracks what we hold
                loaded = LoadedEnv.failing(
                    job_id, RuntimeError("no environment to reuse")
                )
            else:
                # A fresh LoadedEnv, so that worker_init runs again for this
                # job; one that failed to load fails the same way again.
                loaded = kept if kept.broken else LoadedEnv(kept.env, job_id)
            envs[job_id] = loaded
        elif kind == _TASK:
            job_id, seeds, task = serialize.loads(data[1:])
            result = envs[job_id].run(task, seeds)
            outbox.send_bytes(job_id.encode() + b"\n" + result.dumps())
        elif kind == _QUIT:
            return


def main() -> None:
    """Entry point of a worker process; its pipes' descriptors are in argv."""
    # Ctrl+C in a terminal reaches the whole process group; the master
    # decides what happens to running work.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inbox = Connection(int(sys.argv[1]), writable=False)
    _serve(inbox, Connection(int(sys.argv[2]), readable=False))
