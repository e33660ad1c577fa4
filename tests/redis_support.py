"""Shared set-up of the tests that run a private redis-server and real workers.

Import what a test module needs (test modules below ``tests/backends`` first
put this folder on ``sys.path``)::

    from redis_support import r, server  # noqa: F401  (fixtures)
    from redis_support import registered, start_workers, wait_until

The ``server`` fixture starts a redis-server per test module rather than
using the session's ``redis_url``, which is flushed after every test: a
module-long worker pool would lose its registration.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from backend_fixtures import DEADLINE, registered  # noqa: F401  (shared with tests)

from pforeach.backends.redis import LocalWorkers, start_local_workers
from pforeach.backends.redis.server import RedisServer

#: This folder: worker processes need it on their path to import test bodies.
TESTS = Path(__file__).resolve().parent
#: The folders of the test modules, which workers import bodies from.
TEST_FOLDERS = (TESTS, TESTS / "backends")

#: Worker settings for tests: quick to stop (short blocking waits), quiet.
WORKER_OPTIONS: dict[str, Any] = {
    "alive_ttl": 5,
    "linger": 1,
    "block": 0.5,
    "log_level": "WARNING",
}

#: Master settings for tests: the shortest fault-check interval allowed.
BACKEND_OPTIONS: dict[str, Any] = {"ftinterval": 3, "key_ttl": 30, "env_ttl": 60}


# -- waiting ------------------------------------------------------------------------------


def wait_until(
    probe: Callable[[], Any],
    what: str = "condition",
    *,
    ok: Callable[[Any], Any] = bool,
    timeout: float = DEADLINE,
) -> Any:
    """Polls ``probe()`` until ``ok`` accepts its value, and returns that value.

    Fails the test, naming ``what`` and the last value seen, once ``timeout``
    seconds have passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            pytest.fail(
                f"{what}: not reached within {timeout:g}s; last seen: {value!r}"
            )
        time.sleep(0.02)


class Background(threading.Thread):
    """Runs ``func`` in a thread; :meth:`value` returns or raises what it did."""

    def __init__(self, func: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.func = func
        self.result: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.func()
        except BaseException as exc:
            self.error = exc

    def value(self, timeout: float = 2 * DEADLINE) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "the loop did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def text_of(path: Path) -> str:
    """The text of ``path`` (a worker log, say), or "" if it does not exist yet."""
    return path.read_text() if path.exists() else ""


# -- backends and workers ------------------------------------------------------------------


@contextmanager
def importable_tests() -> Iterator[None]:
    """Lets processes started in the block import the test modules.

    Bodies defined at module level travel by reference (``test_redis.draws``),
    as a user's own modules would, so workers need the test folders on their
    path.
    """
    old = os.environ.get("PYTHONPATH")
    folders = [str(folder) for folder in TEST_FOLDERS]
    os.environ["PYTHONPATH"] = os.pathsep.join(folders + ([old] if old else []))
    try:
        yield
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


def start_workers(
    n: int,
    queue: str | list[str],
    url: str | None = None,
    *,
    ready_timeout: float = DEADLINE,
    **options: Any,
) -> LocalWorkers:
    """Starts ``n`` supervised local workers and waits until they are registered.

    ``options`` go to ``start_local_workers`` over :data:`WORKER_OPTIONS`; the
    workers can import the test modules. A pool that is not ready within
    ``ready_timeout`` seconds is killed before the error goes on.
    """
    with importable_tests():
        pool = start_local_workers(n, queue, url, **{**WORKER_OPTIONS, **options})
    try:
        return pool.wait_ready(ready_timeout)
    except BaseException:
        pool.kill()
        raise


@contextmanager
def worker_pool(
    n: int, queue: str | list[str], url: str | None = None, **options: Any
) -> Iterator[LocalWorkers]:
    """:func:`start_workers` for the block; the pool is stopped at its end."""
    pool = start_workers(n, queue, url, **options)
    try:
        yield pool
    finally:
        pool.stop()


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    """The module's own redis-server: long-lived worker pools stay registered."""
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def r(server: RedisServer) -> Iterator[redis.Redis]:
    """A client of the module's server."""
    with server.client() as client:
        yield client


# -- what the server sees ------------------------------------------------------------------


class Monitor:
    """Records the commands a server runs while the ``with`` block lasts.

    Each command is kept as (client address, arguments); commands run by Lua
    scripts have the client ``lua``.
    """

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.commands: list[tuple[str, list[str]]] = []
        self._token = f"end-of-monitor-{os.getpid()}-{id(self)}"

    def __enter__(self) -> Monitor:
        self._client = self.server.client()
        self._monitor = self._client.monitor()
        self._monitor.__enter__()  # MONITOR is on once this returns
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        while True:
            command = self._monitor.next_command()
            if self._token in command["command"]:
                return
            client = f"{command['client_address']}:{command['client_port']}"
            self.commands.append((client, command["command"].split(" ")))

    def __exit__(self, *exc: object) -> None:
        with self.server.client() as conn:
            conn.echo(self._token)
        self._thread.join(DEADLINE)
        self._monitor.__exit__()
        self._client.close()
        assert not self._thread.is_alive(), "MONITOR reader did not stop"

    def calls(
        self, name: str, key: str | None = None, prefix: str = ""
    ) -> list[tuple[str, list[str]]]:
        """The calls of command ``name`` on ``key`` (or on keys starting with ``prefix``)."""
        found = []
        for client, args in self.commands:
            if args[0].upper() != name or len(args) < 2:
                continue
            if (key is not None and args[1] != key) or not args[1].startswith(prefix):
                continue
            found.append((client, args))
        return found

    def keys(self, name: str, prefix: str) -> list[str]:
        """The keys that command ``name`` was called on, among those under ``prefix``."""
        return [args[1] for _, args in self.calls(name, prefix=prefix)]


def job_keys(client: redis.Redis, queue: str) -> list[str]:
    """Keys of ``queue`` that belong to jobs.

    What may outlive a job: the queue's own keys, its workers' registrations
    and the shared environments (with their parts), which expire on their own.
    """
    found = []
    for raw in client.scan_iter(match=f"{queue}.*", count=1000):
        rest = raw.decode()[len(queue) :]
        if rest in (".live", ".count", ".workers"):
            continue
        if rest.startswith((".worker.", ".env.")):
            continue
        found.append(raw.decode())
    if client.exists(queue):
        found.append(queue)
    return sorted(found)
