"""Estimate pi by Monte Carlo: the first parallel loop most people write.

Each task throws ``--points`` random points into the unit square and counts
those that land inside the quarter circle of radius 1; ``4 * inside / points``
estimates pi. The loop sums the tasks' estimates and divides by their number.

    python examples/pi.py                              # on a private Redis
    python examples/pi.py --backend local --workers 4  # on local processes
    python examples/pi.py --backend seq --seed 1       # the same numbers, in order

With ``--backend redis`` and no ``--url`` (nor ``PFOREACH_REDIS_URL``), the
example starts its own redis-server and ``--workers`` local workers. With a
URL, it starts ``--workers`` local workers on that server too; pass
``--workers 0`` to use only workers already serving ``--queue`` there (started
with ``pforeach-worker start -n 4 --queue jobs --url ...``).
"""

from __future__ import annotations

import argparse
import math
import time

from _backend import add_backend_options, make_backend

from pforeach import foreach, register_backend

try:
    # Imported here, in the master, so that loops seed NumPy's generator too:
    # the same --seed then gives the same estimate on every backend.
    import numpy as np
except ImportError:  # pure Python instead
    np = None


def estimate(points: int) -> float:
    """One task: pi from ``points`` random points in the unit square."""
    if np is None:
        import random

        inside = 0
        for _ in range(points):
            x, y = random.random(), random.random()
            inside += x * x + y * y <= 1.0
    else:
        inside = 0
        for start in range(0, points, 250_000):  # bounded memory per task
            xy = np.random.random((min(250_000, points - start), 2))
            inside += int(np.count_nonzero((xy * xy).sum(axis=1) <= 1.0))
    return 4.0 * inside / points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_backend_options(parser)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--points", type=int, default=1_000_000, help="points per task")
    parser.add_argument("--seed", type=int, default=None, help="for reproducible runs")
    args = parser.parse_args()
    if args.tasks < 1 or args.points < 1 or args.workers < 0:
        parser.error("--tasks and --points must be >= 1, --workers >= 0")

    points, tasks = args.points, args.tasks
    with make_backend(args) as backend:
        register_backend(backend)
        started = time.perf_counter()
        pi = foreach(
            task=range(tasks),
            combine=sum,
            final=lambda total: total / tasks,
            seed=args.seed,
        ).dopar(lambda task: estimate(points))
        elapsed = time.perf_counter() - started
        workers = backend.workers()
        register_backend(None)

    print(f"estimate: {pi:.8f}")
    print(f"error:    {abs(pi - math.pi):.8f}")
    print(f"time:     {elapsed:.2f} s ({tasks} tasks of {points:,} points)")
    print(f"workers:  {workers} ({args.backend})")


if __name__ == "__main__":
    main()
