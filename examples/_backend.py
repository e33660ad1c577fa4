"""The backend set-up the examples share, so that each shows only its own loop.

Every example takes the same options to choose where its loop runs:

* ``--backend``: ``seq`` (in this process), ``local`` (local processes) or
  ``redis``;
* ``--workers``: how many local workers to start (0: none, use those that
  already serve the queue);
* ``--url``: the Redis server (default: ``PFOREACH_REDIS_URL``; without
  either, a private redis-server is started for the run);
* ``--queue``: the Redis work queue, for examples that use a single one.

Usage in an example::

    parser = argparse.ArgumentParser()
    add_backend_options(parser)
    args = parser.parse_args()
    with make_backend(args) as backend:
        register_backend(backend)
        ...
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator, Sequence

from pforeach import Backend, LocalBackend, SequentialBackend

#: How long to wait for local workers to register, in seconds.
READY_TIMEOUT = 60


def add_backend_options(
    parser: argparse.ArgumentParser,
    backends: Sequence[str] = ("seq", "local", "redis"),
    queue: bool = True,
) -> None:
    """Adds ``--backend`` (one of ``backends``), ``--workers``, ``--url`` and,
    if ``queue``, ``--queue`` to ``parser``."""
    parser.add_argument("--backend", choices=list(backends), default="redis")
    parser.add_argument("--workers", type=int, default=2, help="local workers to start")
    parser.add_argument(
        "--url",
        default=os.environ.get("PFOREACH_REDIS_URL"),
        help="Redis URL (default: PFOREACH_REDIS_URL, else a private server)",
    )
    if queue:
        parser.add_argument("--queue", default="jobs", help="Redis work queue")


@contextlib.contextmanager
def redis_url(args: argparse.Namespace, queues: Sequence[str]) -> Iterator[str]:
    """The Redis URL of ``--url``, or of a private redis-server started for the
    block; ``--workers`` local workers serve ``queues`` there meanwhile."""
    from pforeach.backends.redis import start_local_workers
    from pforeach.backends.redis.server import RedisServer

    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(RedisServer()).url
        if args.workers > 0:
            pool = start_local_workers(
                args.workers, list(queues), url, linger=1, log_level="WARNING"
            )
            stack.callback(pool.stop)
            pool.wait_ready(READY_TIMEOUT)
        yield url


@contextlib.contextmanager
def make_backend(args: argparse.Namespace) -> Iterator[Backend]:
    """The backend ``--backend`` names, with whatever it needs started."""
    if args.backend == "seq":
        yield SequentialBackend()
    elif args.backend == "local":
        with LocalBackend(args.workers) as backend:
            yield backend
    else:
        from pforeach.backends.redis import RedisBackend

        with (
            redis_url(args, [args.queue]) as url,
            RedisBackend(args.queue, url) as backend,
        ):
            yield backend
