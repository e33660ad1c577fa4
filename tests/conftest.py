"""Shared fixtures: private redis-server processes for the test suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pforeach.backends.redis.server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server shared by the whole session (empty persistence)."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """URL of the shared server; every database is flushed after the test."""
    if not redis_server.running:
        # A previous test took it down; bring it back on the same port.
        redis_server.restart()
    yield redis_server.url
    if redis_server.running:
        with redis_server.client() as conn:
            conn.flushall()


@pytest.fixture
def fresh_redis() -> Iterator[RedisServer]:
    """A dedicated redis-server for one test, free to be killed or restarted."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()
