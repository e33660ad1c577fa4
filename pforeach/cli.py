"""Command-line tools: ``pforeach-worker`` runs workers, ``pforeach`` manages queues."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from .backends.redis.client import ENV_URL, ConnectionSpec
from .backends.redis.worker import Supervisor, configure_logging, make_config

_LEVELS = click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)


def _connection_options(func: Any) -> Any:
    func = click.option(
        "--url", envvar=ENV_URL, default=None, show_envvar=True,
        help="Redis URL: redis://, rediss:// or unix://.",
    )(func)
    func = click.option("--ssl-ca-certs", default=None, help="CA file for rediss://.")(func)
    func = click.option("--ssl-certfile", default=None, help="Client certificate.")(func)
    func = click.option("--ssl-keyfile", default=None, help="Client key.")(func)
    return func


def connection_spec(url: str | None, ssl_ca_certs: str | None = None,
                    ssl_certfile: str | None = None, ssl_keyfile: str | None = None) -> ConnectionSpec:
    return ConnectionSpec(url, ssl_ca_certs=ssl_ca_certs, ssl_certfile=ssl_certfile,
                          ssl_keyfile=ssl_keyfile)


@click.group()
def worker_group() -> None:
    """Run pforeach workers that serve Redis work queues."""


@worker_group.command("start")
@click.option("-n", "--workers", "n", default=1, show_default=True, type=click.IntRange(1),
              help="Worker processes to run.")
@click.option("-q", "--queue", "queues", multiple=True, default=["jobs"], show_default=True,
              help="Queue to serve; repeat for several.")
@_connection_options
@click.option("--secret-file", type=click.File("rb"), default=None,
              help="File holding the shared secret (default: $PFOREACH_SECRET).")
@click.option("--linger", default=30.0, show_default=True, type=float,
              help="Seconds to wait after the queue is removed before exiting.")
@click.option("--alive-ttl", default=10.0, show_default=True, type=float,
              help="Seconds a heartbeat lasts (refreshed 3 times as often).")
@click.option("--log", "log_file", default=None, help="Log to this file instead of stderr.")
@click.option("--loglevel", default="INFO", show_default=True, type=_LEVELS)
def start(n: int, queues: tuple[str, ...], url: str | None, ssl_ca_certs: str | None,
          ssl_certfile: str | None, ssl_keyfile: str | None, secret_file: Any,
          linger: float, alive_ttl: float, log_file: str | None, loglevel: str) -> None:
    """Start N worker processes in the foreground; Ctrl+C stops them.

    Example: pforeach-worker start -n 4 --queue jobs --url redis://host:6379/0
    """
    secret = secret_file.read().strip() if secret_file is not None else None
    spec = connection_spec(url, ssl_ca_certs, ssl_certfile, ssl_keyfile)
    config = make_config(
        list(queues), secret=secret, spec=spec, linger=linger, alive_ttl=alive_ttl,
        log_file=log_file, log_level=loglevel,
    )
    configure_logging(log_file, loglevel)
    click.echo(
        f"pforeach-worker: {n} worker(s) serving {', '.join(queues)} at {spec.describe()}",
        err=True,
    )
    sys.exit(Supervisor(n, config).run())


def worker_main() -> None:
    """Entry point of ``pforeach-worker``."""
    worker_group()


@click.group()
def main() -> None:
    """Inspect and manage pforeach work queues."""
    logging.getLogger("pforeach").addHandler(logging.NullHandler())
