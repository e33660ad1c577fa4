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
import time
import uuid

import numpy as np
import redis
from _backend import add_backend_options, redis_url

from pforeach import foreach, register_backend
from pforeach.backends.redis import RedisBackend


def slice_sum(key: str, url: str) -> int:
    """The loop body: reads one slice from Redis and sums it."""
    with redis.Redis.from_url(url) as r:
        data = r.get(key)
    if data is None:
        raise KeyError(f"no data at {key!r} (expired, or another server?)")
    return int(np.frombuffer(data, dtype=np.int64).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_backend_options(parser, backends=["redis"])
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

    with (
        redis_url(args, [args.queue]) as url,
        RedisBackend(args.queue, url) as backend,
        redis.Redis.from_url(url) as r,
    ):
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
