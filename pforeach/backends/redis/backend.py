"""RedisBackend: the master's handle on a Redis work queue."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import warnings
from collections.abc import Generator
from typing import Any
from urllib.parse import urlparse

import redis

from ...errors import OptionError
from ...job import Job, TaskResult
from ..base import Backend
from .client import ConnectionSpec
from .keys import Keys
from .values import DEFAULT_PART_SIZE

logger = logging.getLogger(__name__)

ENV_SECRET = "PFOREACH_SECRET"
MIN_FTINTERVAL = 3.0
_warned_insecure: set[str] = set()


def load_secret(secret: bytes | str | None) -> bytes | None:
    """The shared HMAC secret: the argument, else ``PFOREACH_SECRET``, else None."""
    if secret is None:
        secret = os.environ.get(ENV_SECRET) or None
    if secret is None:
        return None
    value = secret.encode() if isinstance(secret, str) else bytes(secret)
    if not value:
        raise OptionError("the secret must not be empty")
    return value


def warn_if_exposed(spec: ConnectionSpec, secret: bytes | None) -> None:
    """Warns once per address when unsigned payloads cross a network."""
    if secret is not None:
        return
    url = spec.resolved_url()
    host = spec.host or urlparse(url).hostname or ""
    if url.startswith("unix://") or _is_loopback(host) or url in _warned_insecure:
        return
    _warned_insecure.add(url)
    warnings.warn(
        f"Redis at {spec.describe()} is not on this machine and no secret is set: "
        "anyone who can write to it can run code on the workers. Set "
        f"{ENV_SECRET} (or secret=) on the master and the workers.",
        RuntimeWarning,
        stacklevel=3,
    )


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RedisBackend(Backend):
    """Runs loops on workers that serve a Redis work queue.

    Workers may start before or after the loop, on any machine that reaches
    the Redis server, and may come and go while it runs (``pforeach-worker
    start -n 4 --queue jobs``, or :func:`start_local_workers`).

    Args:
        queue: the work queue's name; the root of all its keys.
        url: ``redis://``, ``rediss://`` or ``unix://`` URL; default
            ``PFOREACH_REDIS_URL``, else ``redis://127.0.0.1:6379/0``.
        host: overrides the URL's host.
        port: overrides the URL's port.
        db: overrides the URL's database number.
        username: overrides the URL's user name.
        password: overrides the URL's password.
        ssl_ca_certs: CA file to verify the server with, for ``rediss://``.
        ssl_certfile: client certificate file, for ``rediss://``.
        ssl_keyfile: client key file, for ``rediss://``.
        secret: shared HMAC key that signs every payload; default
            ``PFOREACH_SECRET``. Workers must use the same.
        ftinterval: seconds between fault checks (at least 3).
        key_ttl: seconds a job's keys outlive a master that stopped
            refreshing them.
        env_ttl: seconds a job environment stays in Redis after its last
            job, so that running the same loop again does not upload it.
        max_inflight: the most tasks of one job in Redis at once; a longer
            loop is submitted as results come back.
        max_inflight_iterations: the most iterations of one job in Redis at
            once (what bounds the master's memory when tasks are large).
        part_size: values larger than this many bytes are stored in parts.
        reconnect_timeout: seconds to keep trying a lost Redis before the
            loop fails with BackendUnavailableError.
        connect_timeout: seconds to wait for one connection attempt.
        **redis_options: further keyword arguments for :class:`redis.Redis`.
    """

    name = "redis"

    def __init__(
        self,
        queue: str = "jobs",
        url: str | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        db: int | None = None,
        username: str | None = None,
        password: str | None = None,
        ssl_ca_certs: str | None = None,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        secret: bytes | str | None = None,
        ftinterval: float = 30.0,
        key_ttl: float = 120.0,
        env_ttl: float = 600.0,
        max_inflight: int = 10_000,
        max_inflight_iterations: int = 1_000_000,
        part_size: int = DEFAULT_PART_SIZE,
        reconnect_timeout: float = 60.0,
        connect_timeout: float = 10.0,
        **redis_options: Any,
    ) -> None:
        self.keys = Keys(queue)
        if ftinterval < MIN_FTINTERVAL:
            raise OptionError(
                f"ftinterval must be at least {MIN_FTINTERVAL:g} seconds, not {ftinterval!r}"
            )
        if key_ttl < 2 * ftinterval:
            raise OptionError(
                f"key_ttl ({key_ttl:g}s) must be at least twice ftinterval ({ftinterval:g}s)"
            )
        for name, value in (
            ("max_inflight", max_inflight),
            ("max_inflight_iterations", max_inflight_iterations),
            ("part_size", part_size),
        ):
            if value < 1:
                raise OptionError(f"{name} must be >= 1, not {value!r}")
        self.spec = ConnectionSpec(
            url,
            host,
            port,
            db,
            username,
            password,
            ssl_ca_certs,
            ssl_certfile,
            ssl_keyfile,
            connect_timeout,
            redis_options,
        )
        self.spec.check()
        self.secret = load_secret(secret)
        self.ftinterval = float(ftinterval)
        self.key_ttl = float(key_ttl)
        self.env_ttl = float(env_ttl)
        self.max_inflight = max_inflight
        self.max_inflight_iterations = max_inflight_iterations
        self.part_size = part_size
        self.reconnect_timeout = float(reconnect_timeout)
        self._client: redis.Redis | None = None
        self._aux: redis.Redis | None = None
        self._address: str | None = None
        warn_if_exposed(self.spec, self.secret)

    @property
    def queue(self) -> str:
        return self.keys.queue

    @property
    def client(self) -> redis.Redis:
        """The backend's Redis client (connections are made on first use)."""
        if self._client is None:
            self._client = self.spec.connect()
        return self._client

    def aux_client(self) -> redis.Redis:
        """A client with short timeouts for housekeeping (TTL refreshes, clean-up)
        that must never hang; made once and shared by the backend's loops."""
        if self._aux is None:
            spec = dataclasses.replace(self.spec, connect_timeout=1.0)
            spec.extra = {**spec.extra, "socket_timeout": 5.0}
            self._aux = spec.connect()
        return self._aux

    def own_address(self) -> str:
        """This master's address as the Redis server sees it (asked once)."""
        if self._address is None:
            self._address = str(self.client.client_info().get("addr", "")).rpartition(
                ":"
            )[0]
        return self._address

    def run(self, job: Job) -> Generator[TaskResult, None, None]:
        from .master import Master

        yield from Master(self, job).run()

    def workers(self) -> int:
        """Live workers on the queue (workers whose heartbeat has not expired)."""
        from .control import live_worker_ids

        return len(live_worker_ids(self.client, self.keys))

    def close(self) -> None:
        for client in (self._client, self._aux):
            if client is not None:
                client.close()
        self._client = self._aux = None

    def __repr__(self) -> str:
        return f"RedisBackend({self.queue!r}, {self.spec.describe()!r})"
