"""Large data: store it in Redis once, in parts, and let each task fetch its own.

Shipping a big array with every loop (as a captured variable or an export)
sends all of it to every worker. When each task needs only a slice, it is
cheaper to put the slices in Redis under keys of your own and have each task
read just its slice inside the loop body. Here an integer array is cut into
``--parts`` slices, each stored with a redis-py SET of the array's bytes; the
task for slice ``k`` reads key ``k``, rebuilds the array with
``numpy.frombuffer`` and sums it. The loop's sum is checked against the sum
computed directly.

    python examples/large_data.py --backend redis --workers 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
import uuid
from collections.abc import Iterator

import numpy as np
import redis

from pforeach import foreach, register_backend
from pforeach.backends.redis import RedisBackend, start_local_workers
from pforeach.backends.redis.server import RedisServer


@contextlib.contextmanager
def redis_setup(args: argparse.Namespace) -> Iterator[tuple[RedisBackend, str]]:
    """A RedisBackend and its URL, with a private server and workers if asked."""
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(RedisServer()).url
        backend = stack.enter_context(RedisBackend(args.queue, url))
        if args.workers > 0:
            workers = start_local_workers(
                args.workers, args.queue, url, linger=1, log_level="WARNING"
            )
            stack.callback(workers.stop)
            workers.wait_ready(60)
        yield backend, url


def slice_sum(key: str, url: str) -> int:
    """The loop body: reads one slice from Redis and sums it."""
    with redis.Redis.from_url(url) as r:
        data = r.get(key)
    if data is None:
        raise KeyError(f"no data at {key!r} (expired, or another server?)")
    return int(np.frombuffer(data, dtype=np.int64).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["redis"], default="redis")
    parser.add_argument("--workers", type=int, default=2, help="local workers to start")
    parser.add_argument(
        "--url",
        default=os.environ.get("PFOREACH_REDIS_URL"),
        help="Redis URL (default: PFOREACH_REDIS_URL, else a private server)",
    )
    parser.add_argument("--queue", default="jobs", help="Redis work queue")
    parser.add_argument("--parts", type=int, default=8, help="slices of the array")
    parser.add_argument("--length", type=int, default=4_000_000, help="array length")
    args = parser.parse_args()
    if args.parts < 1 or args.length < args.parts or args.workers < 0:
        parser.error("need --parts >= 1, --length >= --parts, --workers >= 0")

    data = np.random.default_rng(11).integers(
        0, 1_000_000, size=args.length, dtype=np.int64
    )
    slices = np.array_split(data, args.parts)
    prefix = f"example:data:{uuid.uuid4().hex[:8]}"
    keys = [f"{prefix}:{k}" for k in range(args.parts)]

    with redis_setup(args) as (backend, url), redis.Redis.from_url(url) as r:
        # Stored once, by us, outside the loop; they expire in an hour
        # should we not get to delete them.
        pipe = r.pipeline(transaction=False)
        for key, part in zip(keys, slices):
            pipe.set(key, part.tobytes(), ex=3600)
        pipe.execute()
        try:
            register_backend(backend)
            started = time.perf_counter()
            total = foreach(key=keys, combine=sum).dopar(
                lambda key: slice_sum(key, url)
            )
            elapsed = time.perf_counter() - started
            workers = backend.workers()
            register_backend(None)
        finally:
            r.delete(*keys)

    direct = int(data.sum())
    print(
        f"data: {args.length:,} integers ({data.nbytes / 2**20:.1f} MiB) in "
        f"{args.parts} parts of about {slices[0].nbytes / 2**20:.1f} MiB"
    )
    print(f"sum in the loop: {total}")
    print(f"sum directly:    {direct}")
    print(f"match: {'yes' if total == direct else 'NO'}")
    print(f"time: {elapsed:.2f} s on {workers} worker(s) ({args.backend})")
    if not (total == direct):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
