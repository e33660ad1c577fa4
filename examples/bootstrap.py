"""A parallel bootstrap: how uncertain are the mean and the median of a sample?

Each iteration resamples the data with replacement and returns the mean and
the median of the resample. Iterations run in chunks (one task holds
``--chunksize`` of them), results are combined as they arrive
(``inorder=False``) by a combine function that takes many at once
(``multicombine``) into an accumulator that starts from ``init``. The final
step turns the replicates into standard errors and 95% percentile intervals.

Random numbers depend only on the seed and the iteration, never on the
worker or the chunk, so the parallel answer equals a sequential run's.

    python examples/bootstrap.py --backend redis --workers 2
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass, field

from _backend import add_backend_options, make_backend

from pforeach import foreach, register_backend


@dataclass
class Replicates:
    """The bootstrap replicates gathered so far."""

    means: list[float] = field(default_factory=list)
    medians: list[float] = field(default_factory=list)


def gather(acc: Replicates, *results: tuple[float, float]) -> Replicates:
    """The combine function: adds any number of (mean, median) pairs.

    It returns a new accumulator rather than changing ``acc``, which may be
    the loop's ``init`` value: the next run of the loop starts from it again.
    """
    return Replicates(
        acc.means + [mean for mean, _ in results],
        acc.medians + [median for _, median in results],
    )


def summarize(acc: Replicates) -> dict[str, tuple[float, float, float, float]]:
    """The final step: per statistic, (mean, std. error, 2.5%, 97.5%).

    Replicates are sorted first, so the order they arrived in does not matter.
    """
    summary = {}
    for name, values in (("mean", acc.means), ("median", acc.medians)):
        values = sorted(values)
        n = len(values)
        low, high = values[int(0.025 * (n - 1))], values[int(0.975 * (n - 1))]
        summary[name] = (statistics.fmean(values), statistics.stdev(values), low, high)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_backend_options(parser)
    parser.add_argument("--replicates", type=int, default=4000)
    parser.add_argument(
        "--size", type=int, default=500, help="observations in the sample"
    )
    parser.add_argument("--chunksize", type=int, default=100)
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()
    if args.replicates < 2 or args.size < 1 or args.chunksize < 1 or args.workers < 0:
        parser.error(
            "need --replicates >= 2, --size >= 1, --chunksize >= 1, --workers >= 0"
        )

    # A skewed sample, so that the mean and the median differ.
    rng = random.Random(7)
    sample = [rng.lognormvariate(0.0, 1.0) for _ in range(args.size)]

    def replicate(b: int) -> tuple[float, float]:
        resample = random.choices(sample, k=len(sample))
        return statistics.fmean(resample), statistics.median(resample)

    loop = foreach(
        b=range(args.replicates),
        chunksize=args.chunksize,
        combine=gather,
        init=Replicates(),
        inorder=False,
        multicombine=True,
        maxcombine=200,
        final=summarize,
        seed=args.seed,
    )
    with make_backend(args) as backend:
        register_backend(backend)
        started = time.perf_counter()
        parallel = loop.dopar(replicate)
        elapsed = time.perf_counter() - started
        workers = backend.workers()
        register_backend(None)
    sequential = loop.do(replicate)

    print(
        f"sample of {args.size}: mean {statistics.fmean(sample):.4f}, "
        f"median {statistics.median(sample):.4f}"
    )
    print(f"{'statistic':<10}{'estimate':>10}{'std.err':>10}   95% interval")
    for name, (estimate, stderr, low, high) in parallel.items():
        print(f"{name:<10}{estimate:>10.4f}{stderr:>10.4f}   [{low:.4f}, {high:.4f}]")
    print(
        f"{args.replicates} replicates in chunks of {args.chunksize} on "
        f"{workers} worker(s) ({args.backend}) in {elapsed:.2f} s"
    )
    print(f"same as a sequential run: {'yes' if parallel == sequential else 'NO'}")
    if not (parallel == sequential):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
