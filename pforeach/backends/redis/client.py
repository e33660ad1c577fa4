"""Connecting to Redis: URLs, TLS, timeouts that suit blocking queues, retries.

Blocking pops wait for minutes or hours, so clients have no read timeout;
a connection that dies without a reset is found by TCP keepalive instead
(first probe after 10 s idle, then every 5 s) together with
``TCP_USER_TIMEOUT`` (30 s), which also covers a server that vanished while
a command was on its way: the connection fails about 30 s after the last
data from the server (measured across a veth link taken down: 28-31 s).
redis-py's health check also tests an idle connection before reuse.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlparse

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ...errors import BackendUnavailableError, OptionError

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
    for name, value in (
        ("TCP_KEEPIDLE", 10),
        ("TCP_KEEPINTVL", 5),
        ("TCP_KEEPCNT", 3),
        ("TCP_USER_TIMEOUT", 30_000),
    ):
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

    def check(self) -> ConnectionSpec:
        """Returns self if the URL is well formed, else raises OptionError.

        Raises:
            OptionError: an unknown scheme, a missing host or a bad port.
        """
        url = self.resolved_url()
        try:
            parsed = urlparse(url)
            port = parsed.port
        except ValueError as exc:
            raise OptionError(f"malformed Redis URL {url!r}: {exc}") from None
        if parsed.scheme not in ("redis", "rediss", "unix"):
            raise OptionError(
                f"malformed Redis URL {url!r}: the scheme must be redis://, rediss:// "
                "or unix://"
            )
        if parsed.scheme == "unix" and not parsed.path:
            raise OptionError(f"malformed Redis URL {url!r}: no socket path")
        if parsed.scheme != "unix" and not (parsed.hostname or self.host):
            raise OptionError(f"malformed Redis URL {url!r}: no host")
        del port
        return self

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
        self.check()
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
            # The server's name is checked against its certificate whatever
            # the redis-py version's default (older ones did not check).
            kwargs["ssl_check_hostname"] = True
            for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
                value = getattr(self, name)
                if value is not None:
                    kwargs[name] = value
        kwargs.update(self.extra)
        client = redis.Redis.from_url(url, **kwargs)
        # redis-py lets the URL win over keyword arguments, but host, port,
        # db, username and password are meant to override the URL's parts.
        # Connections are made lazily, so setting them on the pool suffices.
        client.connection_pool.connection_kwargs.update(
            {
                n: kwargs[n]
                for n in ("host", "port", "db", "username", "password")
                if n in kwargs
            }
        )
        return client


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
            if lasting(exc):
                raise refused(self.spec, exc) from exc
            first_error: BaseException = exc
        deadline = time.monotonic() + self.give_up_after
        delay = 0.05
        logger.warning(
            "lost the connection to Redis at %s%s (%s); reconnecting",
            self.spec.describe(),
            f" during {what}" if what else "",
            first_error,
        )
        while True:
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 2.0)
            try:
                value = func()
            except CONNECTION_ERRORS as exc:
                if lasting(exc):
                    raise refused(self.spec, exc) from exc
                if time.monotonic() >= deadline:
                    raise unavailable(self.spec, self.give_up_after, exc) from exc
                continue
            logger.warning("reconnected to Redis at %s", self.spec.describe())
            self.reconnected = True
            return value


def lasting(exc: BaseException) -> bool:
    """Whether a connection error is one that waiting does not cure: Redis
    refused the credentials, or its TLS certificate does not verify."""
    seen: BaseException | None = exc
    for _ in range(8):  # the cause chain of a connection error is short
        if seen is None:
            break
        if isinstance(seen, (redis.AuthenticationError, ssl.SSLCertVerificationError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def refused(spec: ConnectionSpec, exc: BaseException) -> BackendUnavailableError:
    what = (
        "refused the credentials (check the password and user name)"
        if isinstance(exc, redis.AuthenticationError)
        else "could not be verified over TLS (check ssl_ca_certs and the address)"
    )
    return BackendUnavailableError(f"Redis at {spec.describe()} {what}: {exc}")


def reach(client: redis.Redis, spec: ConnectionSpec) -> None:
    """Checks that Redis answers, failing at once (within the connect timeout)
    with an error naming its address if it does not.

    Raises:
        BackendUnavailableError: Redis cannot be reached or refused us.
    """
    for attempt in (1, 2):
        try:
            client.ping()
            return
        except redis.exceptions.InvalidResponse as exc:
            raise BackendUnavailableError(
                f"{spec.describe()} does not answer like a Redis server: {exc}"
            ) from exc
        except CONNECTION_ERRORS as exc:
            if lasting(exc):
                raise refused(spec, exc) from exc
            if attempt == 2:
                raise BackendUnavailableError(
                    f"cannot reach Redis at {spec.describe()}: {exc}"
                ) from exc
            # A pooled connection may have died since its last use (a server
            # restarted between two loops); only a fresh one tells.
            client.connection_pool.disconnect()


def unavailable(
    spec: ConnectionSpec, waited: float, exc: BaseException
) -> BackendUnavailableError:
    return BackendUnavailableError(
        f"cannot reach Redis at {spec.describe()} (tried for {waited:g}s): {exc}"
    )
