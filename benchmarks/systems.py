"""The systems under test, behind one small interface.

Every system runs each workload the way its documentation suggests, with two
worker processes of one thread each, started and warmed up by :meth:`start`
before any clock runs. The pforeach systems run ``foreach`` loops; the peers
run the same bodies (from :mod:`benchmarks.bodies`) through their own APIs.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice, repeat
from pathlib import Path
from typing import Any

from . import bodies
from .measure import children, kill, parent, wait_for

logger = logging.getLogger(__name__)

#: Worker processes per system.
WORKERS = 2

#: The pforeach Redis backend's fault-check interval and heartbeat TTL, which
#: bound how soon it notices a worker that vanished (the W5 target).
FTINTERVAL = 3.0
ALIVE_TTL = 2

#: How long any single wait on a peer may take before it counts as a failure.
PEER_TIMEOUT = 300.0

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Context:
    """What every system may use: the shared Redis server and a scratch directory."""

    server: Any  # pforeach.backends.redis.server.RedisServer, or None
    scratch: Path
    smoke: bool = False

    def url(self, db: int) -> str:
        if self.server is None:
            raise RuntimeError("no redis-server available")
        base = self.server.url
        return base[: base.rfind("/") + 1] + str(db)


def chunks(iterable: Iterable[int], size: int) -> Iterator[list[int]]:
    """Cuts an iterable into lists of ``size`` items, lazily."""
    it = iter(iterable)
    while batch := list(islice(it, size)):
        yield batch


class FaultRun:
    """What a fault run needs from its system: a loop to run and who to kill."""

    def __init__(self, run: Any, kill_holder: Any) -> None:
        self.run = run  # () -> result
        self.kill_holder = kill_holder  # (pid) -> None


class System:
    """A system under test. Subclasses implement the workloads they support."""

    key = ""
    label = ""
    requires: tuple[str, ...] = ()
    uses_redis = False
    is_pforeach = False
    #: Workloads this system does not take part in, with the reason shown.
    not_applicable: dict[str, str] = {}

    def unavailable(self, ctx: Context) -> str | None:
        """Why the system cannot run here (None if it can)."""
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            return "not installed"
        if self.uses_redis and ctx.server is None:
            return "no redis-server"
        return None

    def start(self, ctx: Context) -> None:
        self.ctx = ctx

    def warm(self) -> None:
        """Runs a little of every kind of body, so that no clock pays for
        starting processes or importing NumPy in them."""
        self.trivial(4 * WORKERS)
        # Tasks the size of W2's, two per worker: a fresh process's first large
        # NumPy arrays cost page faults that no timed run should pay.
        self.pi(2 * WORKERS, 1000 if self.ctx.smoke else 2_000_000)

    def stop(self) -> None:
        pass

    def worker_pids(self) -> list[int]:
        return []

    # -- workloads ------------------------------------------------------------
    def trivial(self, n: int) -> list[int]:
        raise NotImplementedError

    def chunked(self, n: int, chunk: int) -> list[int]:
        raise NotImplementedError

    def pi(self, tasks: int, samples: int) -> float:
        raise NotImplementedError

    def env_loop(self, data: Any, tasks: int, key: str) -> list[float]:
        raise NotImplementedError

    def one(self) -> int:
        raise NotImplementedError

    def memory(self, n: int, chunk: int) -> int:
        raise NotImplementedError

    def fault(
        self, marker: str, seconds: float, tasks: int, deadline: float
    ) -> FaultRun:
        raise NotImplementedError

    def after_fault(self) -> None:
        """Restores the system's workers after a fault run (outside the clock)."""


# -- pforeach -----------------------------------------------------------------------


class PforeachSystem(System):
    is_pforeach = True
    requires = ("pforeach",)

    def _backend(self) -> Any:
        raise NotImplementedError

    def start(self, ctx: Context) -> None:
        from pforeach import register_backend, registered_backend

        super().start(ctx)
        self._previous = registered_backend()
        self.backend = self._backend()
        register_backend(self.backend)
        self.warm()

    def stop(self) -> None:
        from pforeach import register_backend

        register_backend(self._previous)
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()

    _previous: Any = None

    def trivial(self, n: int) -> list[int]:
        from pforeach import foreach

        return foreach(i=range(n), chunksize=1).dopar(bodies.noop)

    def chunked(self, n: int, chunk: int) -> list[int]:
        from pforeach import foreach

        return foreach(i=range(n), chunksize=chunk).dopar(bodies.noop)

    def pi(self, tasks: int, samples: int) -> float:
        from pforeach import foreach

        loop = foreach(j=range(tasks), samples=[samples] * tasks, combine=sum)
        return loop.dopar(bodies.pi_task) / tasks

    def env_loop(self, data: Any, tasks: int, key: str) -> list[float]:
        from pforeach import foreach

        if self._env_body[0] != key:
            # One closure per array, so that the repeated loop is the same loop.
            self._env_body = (key, bodies.make_env_body(data, tasks))
        return foreach(i=range(tasks)).dopar(self._env_body[1])

    _env_body: tuple[str, Any] = ("", None)

    def one(self) -> int:
        from pforeach import foreach

        return foreach(i=range(1)).dopar(bodies.noop)[0]

    def memory(self, n: int, chunk: int) -> int:
        from pforeach import foreach

        numbers = (i for i in range(n))
        loop = foreach(i=numbers, combine=sum, inorder=False, chunksize=chunk)
        return loop.dopar(bodies.noop)

    def fault(
        self, marker: str, seconds: float, tasks: int, deadline: float
    ) -> FaultRun:
        from pforeach import foreach

        def run() -> list[int]:
            loop = foreach(
                i=range(tasks), marker_dir=[marker] * tasks, seconds=[seconds] * tasks
            )
            return loop.dopar(bodies.slow_task)

        return FaultRun(run, kill)


class PfSequential(PforeachSystem):
    key = "pf-seq"
    label = "pforeach sequential"
    not_applicable = {"W5": "no worker process to kill", "W5b": "no worker process"}

    def _backend(self) -> Any:
        from pforeach import SequentialBackend

        return SequentialBackend()


class PfLocal(PforeachSystem):
    key = "pf-local"
    label = "pforeach local"
    not_applicable = {"W5b": "Redis backend only"}

    def _backend(self) -> Any:
        from pforeach import LocalBackend

        return LocalBackend(WORKERS)

    def worker_pids(self) -> list[int]:
        return children(os.getpid())


class PfRedis(PforeachSystem):
    key = "pf-redis"
    label = "pforeach redis"
    uses_redis = True
    queue = "pfbench"

    def _backend(self) -> Any:
        from pforeach.backends.redis import RedisBackend

        return RedisBackend(
            self.queue, self.ctx.url(0), ftinterval=FTINTERVAL, key_ttl=10 * FTINTERVAL
        )

    def _start_groups(self, sizes: list[int]) -> list[Any]:
        """Starts supervisors with these numbers of workers; waits until all serve."""
        from pforeach.backends.redis import start_local_workers

        groups = [
            start_local_workers(
                n,
                self.queue,
                self.ctx.url(0),
                alive_ttl=ALIVE_TTL,
                linger=5,
                log_level="WARNING",
            )
            for n in sizes
        ]
        return [group.wait_ready(120) for group in groups]

    def start(self, ctx: Context) -> None:
        self.ctx = ctx
        self.groups = self._start_groups([WORKERS])
        super().start(ctx)

    def stop(self) -> None:
        for group in getattr(self, "groups", []):
            group.stop()
        self.groups = []
        super().stop()

    def worker_pids(self) -> list[int]:
        return [pid for group in self.groups for pid in group.child_pids()]

    # W5b: a whole host lost. Each worker gets its own supervisor, so that one
    # can vanish with its worker while the other goes on serving the queue.
    def host_lost_setup(self) -> None:
        for group in self.groups:
            group.stop()
        self.groups = self._start_groups([1] * WORKERS)
        self.warm()

    def host_lost(self, marker: str, seconds: float, tasks: int) -> FaultRun:
        run = self.fault(marker, seconds, tasks, 0.0).run

        def kill_host(pid: int) -> None:
            supervisor = parent(pid)
            hosts = [group for group in self.groups if group.pid == supervisor]
            if not hosts:
                raise RuntimeError(f"process {pid} is not one of this system's workers")
            # Freeze the supervisor first: it must not see its worker die (it
            # would requeue the task at once, which is W5), and its workers
            # must not see it die (they would hand their tasks back).
            os.kill(supervisor, signal.SIGSTOP)
            kill(pid)
            hosts[0].kill()

        return FaultRun(run, kill_host)

    def after_host_lost(self) -> None:
        alive = [g for g in self.groups if g.proc.poll() is None]
        self.groups = alive + self._start_groups([1] * (WORKERS - len(alive)))
        self.warm()


# -- peers ----------------------------------------------------------------------------


class PeerSystem(System):
    """A peer: the workloads are built on ``map`` (ordered results, one task each)."""

    def map(self, name: str, args: list[tuple[Any, ...]]) -> list[Any]:
        raise NotImplementedError

    def trivial(self, n: int) -> list[int]:
        return self.map("noop", [(i,) for i in range(n)])

    def chunked(self, n: int, chunk: int) -> list[int]:
        parts = self.map(
            "noop_range", [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
        )
        return [x for part in parts for x in part]

    def pi(self, tasks: int, samples: int) -> float:
        return sum(self.map("pi_task", [(j, samples) for j in range(tasks)])) / tasks

    def one(self) -> int:
        return self.map("noop", [(0,)])[0]

    def fault(
        self, marker: str, seconds: float, tasks: int, deadline: float
    ) -> FaultRun:
        self._deadline = deadline
        return FaultRun(
            lambda: self.map("slow_task", [(i, marker, seconds) for i in range(tasks)]),
            kill,
        )

    _deadline = PEER_TIMEOUT


class Joblib(PeerSystem):
    key = "joblib"
    label = "joblib (loky)"
    requires = ("joblib",)
    not_applicable = {"W5b": "Redis backend only"}

    def start(self, ctx: Context) -> None:
        super().start(ctx)
        import joblib

        self.joblib = joblib
        self.warm()

    def _parallel(self, **options: Any) -> Any:
        # batch_size=1: one call per task, so that W1 measures the cost of a task.
        return self.joblib.Parallel(
            n_jobs=WORKERS, backend="loky", batch_size=1, **options
        )

    def map(self, name: str, args: list[tuple[Any, ...]]) -> list[Any]:
        func = self.joblib.delayed(getattr(bodies, name))
        return list(self._parallel()(func(*a) for a in args))

    def env_loop(self, data: Any, tasks: int, key: str) -> list[float]:
        # joblib memory-maps a large array argument and shares the file.
        func = self.joblib.delayed(bodies.env_slice_sum)
        return list(self._parallel()(func(data, i, tasks) for i in range(tasks)))

    def memory(self, n: int, chunk: int) -> int:
        func = self.joblib.delayed(bodies.noop_list)
        numbers = (i for i in range(n))
        results = self._parallel(return_as="generator_unordered")(
            func(c) for c in chunks(numbers, chunk)
        )
        return sum(sum(r) for r in results)

    def worker_pids(self) -> list[int]:
        return children(os.getpid())

    def after_fault(self) -> None:
        self.warm()  # loky replaces a broken pool on the next call

    def stop(self) -> None:
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True, kill_workers=True)


class Futures(PeerSystem):
    key = "futures"
    label = "concurrent.futures"
    requires = ("concurrent.futures",)
    not_applicable = {"W5b": "Redis backend only"}

    def start(self, ctx: Context) -> None:
        super().start(ctx)
        self._new_pool()

    def _new_pool(self) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(max_workers=WORKERS)
        # The pool starts processes on demand: keep both busy at once.
        list(self.pool.map(time.sleep, [0.2] * WORKERS))
        self.warm()

    def map(self, name: str, args: list[tuple[Any, ...]]) -> list[Any]:
        return list(self.pool.map(getattr(bodies, name), *zip(*args)))

    def env_loop(self, data: Any, tasks: int, key: str) -> list[float]:
        # The documented way: the array is an argument, pickled for each task.
        return list(
            self.pool.map(
                bodies.env_slice_sum,
                repeat(data, tasks),
                range(tasks),
                repeat(tasks, tasks),
            )
        )

    def memory(self, n: int, chunk: int) -> int:
        numbers = (i for i in range(n))
        return sum(
            sum(r) for r in self.pool.map(bodies.noop_list, chunks(numbers, chunk))
        )

    def worker_pids(self) -> list[int]:
        return children(os.getpid())

    def after_fault(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self._new_pool()

    def stop(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _RedisPeer(PeerSystem):
    """RQ and Celery: they cannot ship a value once per job, so W3 stores the
    array in Redis once and the body fetches it once per worker process."""

    uses_redis = True
    db = 0

    def env_loop(self, data: Any, tasks: int, key: str) -> list[float]:
        client = self.ctx.server.client(db=self.db)
        try:
            if not client.exists(key):
                client.set(key, pickle.dumps(data, protocol=5), ex=600)
        finally:
            client.close()
        url = self.ctx.url(self.db)
        return self.map("env_read_redis", [(url, key, i, tasks) for i in range(tasks)])

    def memory(self, n: int, chunk: int) -> int:
        numbers = (i for i in range(n))
        return sum(
            sum(r)
            for r in self.map("noop_list", [(c,) for c in chunks(numbers, chunk)])
        )


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    env.update(extra)
    return env


def _worker_process(
    ctx: Context, name: str, *args: str, **env: str
) -> subprocess.Popen[bytes]:
    """Starts ``python *args`` as a peer's worker; its output goes to a log file."""
    log = open(ctx.scratch / f"{name}-workers.log", "ab")  # noqa: SIM115 - the child owns it
    try:
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=_subprocess_env(**env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    finally:
        log.close()


def _terminate(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RQ(_RedisPeer):
    key = "rq"
    label = "RQ (SimpleWorker)"
    requires = ("rq",)
    not_applicable = {"W5b": "pforeach Redis backend only"}
    db = 2
    queue_name = "pfbench-rq"

    def start(self, ctx: Context) -> None:
        super().start(ctx)
        import redis
        from rq import Queue, Worker

        self.conn = redis.Redis.from_url(ctx.url(self.db))
        self.queue = Queue(self.queue_name, connection=self.conn)
        self.Worker = Worker
        self.procs: list[subprocess.Popen[bytes]] = []
        self._spawn(WORKERS)
        self.warm()

    def _spawn(self, n: int) -> None:
        for _ in range(n):
            self.procs.append(
                _worker_process(
                    self.ctx,
                    "rq",
                    "-c",
                    "import sys; from rq.cli import main; sys.exit(main())",
                    "worker",
                    "--worker-class",
                    "rq.worker.SimpleWorker",
                    "--url",
                    self.ctx.url(self.db),
                    "--logging_level",
                    "WARNING",
                    "--name",
                    f"pfbench-{uuid.uuid4().hex[:8]}",
                    self.queue_name,
                )
            )
        wait_for(
            lambda: (
                self.Worker.count(connection=self.conn, queue=self.queue)
                >= len([p for p in self.procs if p.poll() is None])
            ),
            60,
            "RQ workers registering",
        )

    def map(self, name: str, args: list[tuple[Any, ...]]) -> list[Any]:
        from rq import Queue, Retry
        from rq.results import Result

        func = getattr(bodies, name)
        retry = Retry(max=2) if name == "slow_task" else None
        jobs = self.queue.enqueue_many(
            [Queue.prepare_data(func, a, result_ttl=600, retry=retry) for a in args]
        )
        deadline = time.monotonic() + (
            self._deadline if name == "slow_task" else PEER_TIMEOUT
        )
        values = []
        for job in jobs:
            left = max(1, int(deadline - time.monotonic()))
            result = job.latest_result(timeout=left)
            if result is None:
                raise TimeoutError(f"no result within {left}s")
            if result.type != Result.Type.SUCCESSFUL:
                raise RuntimeError(f"RQ job failed: {str(result.exc_string)[-200:]}")
            values.append(result.return_value)
        return values

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def after_fault(self) -> None:
        self.procs = [p for p in self.procs if p.poll() is None]
        # The abandoned job would be retried by RQ's maintenance, minutes later.
        self.queue.empty()
        self._spawn(WORKERS - len(self.procs))

    def stop(self) -> None:
        for proc in self.procs:
            _terminate(proc)
        self.conn.close()


class Celery(_RedisPeer):
    key = "celery"
    label = "Celery (prefork)"
    requires = ("celery",)
    not_applicable = {"W5b": "pforeach Redis backend only"}
    db = 1

    def start(self, ctx: Context) -> None:
        super().start(ctx)
        os.environ["PFBENCH_CELERY_URL"] = ctx.url(self.db)
        module = importlib.import_module("benchmarks.celery_app")
        self.app = importlib.reload(module)  # reads the URL at import
        from celery import group

        self.group = group
        self.proc = _worker_process(
            ctx,
            "celery",
            "-m",
            "celery",
            "-A",
            "benchmarks.celery_app",
            "worker",
            "--pool=prefork",
            "--concurrency",
            str(WORKERS),
            "--queues",
            self.app.QUEUE,
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
            "--hostname",
            f"pfbench-{uuid.uuid4().hex[:8]}@%h",
            PFBENCH_CELERY_URL=ctx.url(self.db),
        )
        wait_for(lambda: len(children(self.proc.pid)) >= WORKERS, 60, "Celery pool")
        self.warm()

    def map(self, name: str, args: list[tuple[Any, ...]]) -> list[Any]:
        task = self.app.TASKS[name]
        timeout = self._deadline if name == "slow_task" else PEER_TIMEOUT
        deadline = time.monotonic() + timeout
        result = self.group(task.s(*a) for a in args).apply_async()
        try:
            # Each result's own get: GroupResult.get waits in 0.5 s polls,
            # which would add up to half a second to every loop here.
            return [
                r.get(timeout=max(0.1, deadline - time.monotonic()))
                for r in result.results
            ]
        finally:
            result.forget()

    def one(self) -> int:
        result = self.app.noop.delay(0)
        try:
            return int(result.get(timeout=PEER_TIMEOUT))
        finally:
            result.forget()

    def worker_pids(self) -> list[int]:
        return children(self.proc.pid)

    def after_fault(self) -> None:
        wait_for(lambda: len(children(self.proc.pid)) >= WORKERS, 60, "Celery pool")
        self.app.app.control.purge()

    def stop(self) -> None:
        _terminate(self.proc, 20)
        self.app.app.close()


class Dask(PeerSystem):
    key = "dask"
    label = "Dask distributed"
    requires = ("distributed",)
    not_applicable = {"W5b": "pforeach Redis backend only"}

    def start(self, ctx: Context) -> None:
        super().start(ctx)
        from distributed import Client, LocalCluster

        self.cluster = LocalCluster(
            n_workers=WORKERS,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            scheduler_kwargs={"dashboard": False},
            silence_logs=logging.ERROR,
        )
        self.client = Client(self.cluster)
        self.client.wait_for_workers(WORKERS, timeout=120)
        self.warm()

    def map(self, name: str, args: list[tuple[Any, ...]]) -> list[Any]:
        timeout = self._deadline if name == "slow_task" else PEER_TIMEOUT
        futures = self.client.map(getattr(bodies, name), *zip(*args), pure=False)
        return [f.result(timeout=timeout) for f in futures]

    def one(self) -> int:
        return int(
            self.client.submit(bodies.noop, 0, pure=False).result(timeout=PEER_TIMEOUT)
        )

    def env_loop(self, data: Any, tasks: int, key: str) -> list[float]:
        # The documented way to share a large value: scatter it to every worker.
        shared = self.client.scatter(data, broadcast=True)
        # Holding the previous loop's future keeps Dask from releasing the
        # data (same content, same key) while this loop's scatter stands in.
        self._scattered = shared
        futures = self.client.map(
            bodies.env_slice_sum,
            [shared] * tasks,
            range(tasks),
            [tasks] * tasks,
            pure=False,
        )
        return [f.result(timeout=PEER_TIMEOUT) for f in futures]

    def memory(self, n: int, chunk: int) -> int:
        from distributed import as_completed

        numbers = (i for i in range(n))
        # Client.map takes no iterators: the chunks are made up front.
        futures = self.client.map(
            bodies.noop_list, list(chunks(numbers, chunk)), pure=False
        )
        total = 0
        for future in as_completed(futures):
            total += sum(future.result())
            future.release()
        return total

    _scattered: Any = None

    def worker_pids(self) -> list[int]:
        info = self.client.run(os.getpid)
        return list(info.values())

    def after_fault(self) -> None:
        self.client.wait_for_workers(WORKERS, timeout=120)

    def stop(self) -> None:
        self.client.close()
        self.cluster.close()


ALL: tuple[type[System], ...] = (
    PfSequential,
    PfLocal,
    PfRedis,
    Joblib,
    Futures,
    RQ,
    Celery,
    Dask,
)


def make_systems(keys: list[str] | None = None) -> list[System]:
    """The systems to run, in table order; ``keys`` selects some of them."""
    systems = [cls() for cls in ALL]
    if keys:
        unknown = set(keys) - {s.key for s in systems}
        if unknown:
            raise SystemExit(
                f"unknown system(s) {sorted(unknown)}; choose from "
                f"{', '.join(s.key for s in systems)}"
            )
        systems = [s for s in systems if s.key in keys]
    return systems
