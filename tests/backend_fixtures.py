"""The ``backend`` fixture: runs a test once per backend, with that backend registered.

Import it into a test module with::

    from backend_fixtures import backend  # noqa: F401

Backends that start processes are built once and shared by every test of the
session (they are closed when the session ends), so a test pays for a loop,
not for starting workers. To cover another backend, add its name to
``BACKENDS`` and a branch to :func:`_start`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pforeach import (
    Backend,
    LocalBackend,
    SequentialBackend,
    register_backend,
    registered_backend,
)

BACKENDS = ["sequential", "local", "redis"]

#: Worker processes of the shared LocalBackend.
LOCAL_WORKERS = 2

#: How long a test waits for something another process should do.
DEADLINE = 30.0

_shared: dict[str, Backend] = {}


def _start(name: str, request: pytest.FixtureRequest) -> Backend:
    """Builds the backend called ``name``; ``request`` can reach other fixtures."""
    if name == "sequential":
        return SequentialBackend()
    if name == "local":
        return LocalBackend(LOCAL_WORKERS)
    if name == "redis":
        return _start_redis(request)
    raise ValueError(f"no test setup for backend {name!r}")


def _start_redis(request: pytest.FixtureRequest) -> Backend:
    """A private redis-server, two supervised workers, and a backend on them.

    The server is the suite's own (not the shared ``redis_server``, which is
    flushed after each test) so the workers' registrations survive.
    """
    from pforeach.backends.redis import RedisBackend, start_local_workers
    from pforeach.backends.redis.server import RedisServer

    server = RedisServer().start()
    request.config.add_cleanup(server.stop)
    workers = start_local_workers(
        LOCAL_WORKERS,
        "semantics",
        server.url,
        alive_ttl=2,
        linger=1,
        log_level="WARNING",
    )
    request.config.add_cleanup(workers.stop)
    workers.wait_ready(DEADLINE)
    return RedisBackend("semantics", server.url, ftinterval=3, key_ttl=30)


def shared_backend(name: str, request: pytest.FixtureRequest) -> Backend:
    """The session's instance of backend ``name``, started on first use."""
    found = _shared.get(name)
    if found is None:
        found = _shared[name] = _start(name, request)

        def close() -> None:
            _shared.pop(name, None)
            found.close()

        request.config.add_cleanup(close)
    return found


@contextmanager
def registered(backend: Any, close: bool = True) -> Iterator[Any]:
    """Registers ``backend`` for the block, then restores the previous one.

    ``backend`` is closed at the end too, unless ``close`` is False (for the
    session's shared backends).
    """
    previous = registered_backend()
    register_backend(backend)
    try:
        yield backend
    finally:
        register_backend(previous)
        if close:
            backend.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The backend under test, registered for the test and unregistered after."""
    with registered(shared_backend(request.param, request), close=False) as instance:
        yield instance


def wait_for(predicate: Callable[[], bool], timeout: float = DEADLINE) -> bool:
    """Polls ``predicate`` until it is true; False once ``timeout`` has passed.

    Loop bodies use it to wait for each other through the filesystem, so it
    returns instead of failing: the body reports, the test asserts.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def append_line(path: str | os.PathLike[str], text: str) -> None:
    """Appends one line to ``path`` in a single write (safe across processes)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


def read_lines(path: str | os.PathLike[str]) -> list[str]:
    """The lines of ``path``, or none if it does not exist."""
    p = Path(path)
    return p.read_text().splitlines() if p.exists() else []
