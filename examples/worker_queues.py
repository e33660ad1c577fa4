"""One pool of workers, two work queues: each loop goes to the queue it names.

Workers may serve several queues, taking tasks first come, first served. A
master chooses its queue with the RedisBackend it registers; here two
backends submit to the queues ``reports`` and ``simulations``, and the same
worker processes run both loops. On a cluster the workers would be started
with::

    pforeach-worker start -n 4 --queue reports --queue simulations --url redis://host:6379/0

This example starts them locally (and a private redis-server when neither
``--url`` nor ``PFOREACH_REDIS_URL`` is given):

    python examples/worker_queues.py --backend redis --workers 2
"""

from __future__ import annotations

import argparse
import os
import time

from _backend import add_backend_options, redis_url

from pforeach import foreach, register_backend
from pforeach.backends.redis import RedisBackend
from pforeach.backends.redis import workers as queue_workers

QUEUES = ("reports", "simulations")


def report(month: int) -> tuple[str, int]:
    """A task of the first queue."""
    return f"report {month:02d}", os.getpid()


def simulate(run: int) -> tuple[float, int]:
    """A task of the second queue: a small random walk."""
    import random

    position = 0.0
    for _ in range(10_000):
        position += random.gauss(0.0, 1.0)
    return position, os.getpid()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_backend_options(parser, backends=["redis"], queue=False)
    args = parser.parse_args()
    if args.workers < 0:
        parser.error("--workers must be >= 0")

    with redis_url(args, QUEUES) as url:
        for queue in QUEUES:
            serving = queue_workers(queue, url)
            print(
                f"queue {queue}: {len(serving)} worker(s): {sorted(w.pid for w in serving)}"
            )

        reports = RedisBackend(QUEUES[0], url)
        simulations = RedisBackend(QUEUES[1], url)
        started = time.perf_counter()
        try:
            register_backend(reports)
            titles = foreach(month=range(1, 13)).dopar(report)
            register_backend(simulations)
            walks = foreach(run=range(20), seed=5).dopar(simulate)
        finally:
            register_backend(None)
            reports.close()
            simulations.close()
        elapsed = time.perf_counter() - started

    # The same loops, sequentially in this process, for comparison.
    expected_titles = [title for title, _ in foreach(month=range(1, 13)).do(report)]
    expected_walks = [walk for walk, _ in foreach(run=range(20), seed=5).do(simulate)]
    correct = [title for title, _ in titles] == expected_titles
    same = [walk for walk, _ in walks] == expected_walks
    both = {pid for _, pid in titles} & {pid for _, pid in walks}

    print(f"{QUEUES[0]}: {len(titles)} results, correct: {'yes' if correct else 'NO'}")
    print(
        f"{QUEUES[1]}: {len(walks)} results, same as sequential: {'yes' if same else 'NO'}"
    )
    print(f"worker processes that ran tasks of both queues: {len(both)}")
    print(f"time: {elapsed:.2f} s")
    if not (correct and same):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
