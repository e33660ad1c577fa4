"""Connecting to Redis: URLs, TLS, timeouts that suit blocking queues, retries.

Blocking pops wait for minutes or hours, so clients have no read timeout;
a connection that dies without a reset is found by TCP keepalive instead
(first probe after 10 s idle, then every 5 s, 3 probes: about 25 s) and by
redis-py's health check before reuse of an idle connection.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ...errors import BackendUnavailableError

logger = logging.getLogger(__name__)

T = TypeVar("T")

ENV_URL = "PFOREACH_REDIS_URL"
DEFAULT_URL = "redis://127.0.0.1:6379/0"

#: What a lost or refused connection looks like in redis-py.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    ConnectionError,
    OSError,
)


def _keepalive_options() -> dict[int, int]:
    options = {}
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            options[getattr(socket, name)] = value
    return options


@dataclass
class ConnectionSpec:
    """Where and how to connect; picklable, so workers can be told the same.

    Attributes:
        url: a ``redis://``, ``rediss://`` or ``unix://`` URL. Default: the
            ``PFOREACH_REDIS_URL`` environment variable, else a local Redis.
        host, port, db, username, password: override parts of the URL.
        ssl_ca_certs, ssl_certfile, ssl_keyfile: TLS files for ``rediss://``.
        connect_timeout: seconds to wait for a connection to be made.
        extra: further keyword arguments for :class:`redis.Redis`.
    """

    url: str | None = None
    host: str | None = None
    port: int | None = None
    db: int | None = None
    username: str | None = None
    password: str | None = None
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    connect_timeout: float = 10.0
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved_url(self) -> str:
        return self.url or os.environ.get(ENV_URL) or DEFAULT_URL

    def describe(self) -> str:
        """The address, without credentials, for messages."""
        url = self.resolved_url()
        if "@" in url:
            scheme, _, rest = url.partition("://")
            url = f"{scheme}://{rest.rpartition('@')[2]}"
        if self.host or self.port:
            url += f" (host {self.host or '-'}, port {self.port or '-'})"
        return url

    def connect(self) -> redis.Redis:
        """A new client; connections are made lazily, on first use."""
        kwargs: dict[str, Any] = {
            "socket_timeout": None,
            "socket_connect_timeout": self.connect_timeout,
            "health_check_interval": 30,
            # Retrying is Reconnecting's job: it knows how long to go on and
            # what to check afterwards.
            "retry": Retry(NoBackoff(), 0),
        }
        url = self.resolved_url()
        if not url.startswith("unix://"):
            kwargs["socket_keepalive"] = True
            kwargs["socket_keepalive_options"] = _keepalive_options()
        for name in ("host", "port", "db", "username", "password"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        if url.startswith("rediss://"):
            for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
                value = getattr(self, name)
                if value is not None:
                    kwargs[name] = value
        kwargs.update(self.extra)
        return redis.Redis.from_url(url, **kwargs)


class Reconnecting:
    """Runs Redis calls, retrying with backoff while the server is away.

    Args:
        spec: where the server is, for error messages.
        give_up_after: seconds without a working connection before
            :class:`BackendUnavailableError` is raised.

    Attributes:
        reconnected: set when a call succeeded after a lost connection;
            the owner clears it once it has checked what the server lost.
    """

    def __init__(self, spec: ConnectionSpec, give_up_after: float) -> None:
        self.spec = spec
        self.give_up_after = give_up_after
        self.reconnected = False

    def call(self, func: Callable[[], T], what: str = "") -> T:
        """Returns ``func()``, retried until it works or time runs out."""
        try:
            return func()
        except CONNECTION_ERRORS as exc:
            first_error: BaseException = exc
        deadline = time.monotonic() + self.give_up_after
        delay = 0.05
        logger.warning(
            "lost the connection to Redis at %s%s (%s); reconnecting",
            self.spec.describe(), f" during {what}" if what else "", first_error,
        )
        while True:
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 2.0)
            try:
                value = func()
            except CONNECTION_ERRORS as exc:
                if time.monotonic() >= deadline:
                    raise unavailable(self.spec, self.give_up_after, exc) from exc
                continue
            logger.warning("reconnected to Redis at %s", self.spec.describe())
            self.reconnected = True
            return value


def unavailable(spec: ConnectionSpec, waited: float, exc: BaseException) -> BackendUnavailableError:
    return BackendUnavailableError(
        f"cannot reach Redis at {spec.describe()} (tried for {waited:g}s): {exc}"
    )
