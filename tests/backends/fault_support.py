"""Shared set-up of the Redis fault and cancel tests: workers, backends, keys.

Every test gets its own redis-server (the ``fresh_redis`` fixture), its own
queue and its own worker pool, with short intervals so that faults are found
in seconds: fault checks every 3 s, heartbeats that expire after 2 s, job
keys that outlive their master by 6 s.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis_support
from redis_support import registered  # noqa: F401  (for the test modules)

from pforeach.backends.redis import LocalWorkers, RedisBackend
from pforeach.backends.redis.server import RedisServer

HERE = Path(__file__).resolve().parent

#: Fault-check interval of the masters (the smallest allowed).
FTINTERVAL = 3.0
#: Heartbeat TTL of the workers (refreshed every third of it).
ALIVE_TTL = 2.0
#: How long a job's keys outlive a master that stopped refreshing them.
KEY_TTL = 6.0
#: How long a job environment stays after its last job.
ENV_TTL = 20.0
#: Seconds a test waits for something another process should do.
DEADLINE = 45.0


#: Polls a probe until it returns something true (fault tests wait longer).
wait_until = functools.partial(redis_support.wait_until, timeout=DEADLINE)


def lines(path: Path) -> list[str]:
    """The lines of ``path``, or none if it does not exist yet."""
    return path.read_text().splitlines() if path.exists() else []


def events(path: Path, kind: str, i: int | None = None) -> list[str]:
    """The log lines ``kind i pid`` of ``path`` (for any i if None)."""
    prefix = f"{kind} " if i is None else f"{kind} {i} "
    return [line for line in lines(path) if line.startswith(prefix)]


@dataclass
class Lab:
    """One test's redis-server, queue and scratch folder."""

    server: RedisServer
    r: redis.Redis
    queue: str
    dir: Path

    @property
    def url(self) -> str:
        return self.server.url

    def file(self, name: str) -> Path:
        return self.dir / name


def make_lab(
    server: RedisServer,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Lab]:
    """The body of the test modules' ``lab`` fixture.

    Gives the test a redis-server of its own, a queue named after the test
    and a scratch folder, and lets worker processes import
    :mod:`fault_bodies` (bodies travel by reference). The workers' logs are
    printed at the end: pytest shows them when the test fails.
    """
    old = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", str(HERE) + (os.pathsep + old if old else ""))
    queue = "q-" + request.node.name.replace("[", "-").replace("]", "")[:60]
    client = server.client()
    yield Lab(server, client, queue, tmp_path)
    show_logs(tmp_path)
    client.close()


def make_backend(url: str, queue: str, **options: Any) -> RedisBackend:
    """A backend with the short test intervals (``options`` override them)."""
    settings: dict[str, Any] = {
        "ftinterval": FTINTERVAL,
        "key_ttl": KEY_TTL,
        "env_ttl": ENV_TTL,
        "reconnect_timeout": 30.0,
    }
    settings.update(options)
    return RedisBackend(queue, url, **settings)


def start_pool(
    n: int, url: str, queue: str, log_dir: Path, **options: Any
) -> LocalWorkers:
    """Starts ``n`` supervised workers with the short test intervals."""
    settings: dict[str, Any] = {
        "alive_ttl": ALIVE_TTL,
        "linger": 30.0,
        "block": 2.0,
        "key_ttl": KEY_TTL,
        "log_file": str(log_dir / f"workers-{queue}.log"),
        "log_level": "INFO",
    }
    settings.update(options)
    return redis_support.start_workers(
        n, queue, url, ready_timeout=DEADLINE, **settings
    )


@contextmanager
def pool(
    n: int, url: str, queue: str, log_dir: Path, **options: Any
) -> Iterator[LocalWorkers]:
    """A worker pool for the block; stopped (or killed) at the end."""
    workers = start_pool(n, url, queue, log_dir, **options)
    try:
        yield workers
    finally:
        stop_pool(workers)


def stop_pool(workers: LocalWorkers) -> None:
    """Stops a pool even if the test left its supervisor stopped (SIGSTOP)."""
    if workers.proc.poll() is None:
        os.kill(workers.pid, signal.SIGCONT)
        workers.stop(timeout=15)
    for pid in workers.child_pids():
        _kill(pid)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def in_thread(func: Callable[[], Any]) -> Future[Any]:
    """Runs ``func`` in a daemon thread; its Future holds the value or error."""
    future: Future[Any] = Future()

    def target() -> None:
        try:
            future.set_result(func())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=target, daemon=True).start()
    return future


def job_ids(client: redis.Redis, queue: str) -> list[str]:
    """Ids of the jobs registered on ``queue``."""
    return sorted(j.decode() for j in client.smembers(f"{queue}.jobs"))


def job_keys(client: redis.Redis, queue: str, job_id: str) -> list[str]:
    """Every key that names the job (record, results, marks, parts ...)."""
    return sorted(k.decode() for k in client.scan_iter(match=f"{queue}.*{job_id}*"))


def queued_of(client: redis.Redis, queue: str, job_id: str) -> int:
    """Tasks of the job waiting in the queue."""
    prefix = f"PFT1 {job_id} ".encode()
    return sum(1 for m in client.lrange(queue, 0, -1) if m.startswith(prefix))


def env_keys(client: redis.Redis, queue: str) -> list[str]:
    """The job environments stored for ``queue`` (not their parts)."""
    return [
        k.decode()
        for k in client.scan_iter(match=f"{queue}.env.*")
        if b".part." not in k
    ]


def master_process(
    url: str, queue: str, log: Path, out: Path, *args: str
) -> subprocess.Popen[bytes]:
    """Starts ``fault_master.py``: a master that runs one loop, in its own process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    with open(out, "wb") as sink:
        return subprocess.Popen(
            [
                sys.executable,
                str(HERE / "fault_master.py"),
                url,
                queue,
                str(log),
                *args,
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )


def show_logs(log_dir: Path) -> None:
    """Prints the workers' logs (pytest shows them when the test fails)."""
    for path in sorted(log_dir.glob("*.log")):
        print(f"--- {path.name} ---")
        print("\n".join(lines(path)[-80:]))
