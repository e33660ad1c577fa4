"""Loop bodies shared by every system under test.

They live in an importable module, not in ``__main__``, so that every system
ships them the same way: by reference, to workers that import this package.
Only the W3 body is a closure (it captures the array), because capturing a
variable is what that workload measures.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable
from typing import Any

#: Per-process cache of values fetched from Redis by :func:`env_read_redis`.
_FETCHED: dict[str, Any] = {}
_CLIENTS: dict[str, Any] = {}

#: Points drawn per NumPy call in :func:`pi_task`, to bound memory.
_PI_BATCH = 1_000_000


def noop(i: int) -> int:
    """The trivial body: returns its loop variable."""
    return i


def noop_range(lo: int, hi: int) -> list[int]:
    """The trivial body over ``range(lo, hi)``: one chunked task of a peer."""
    return [noop(i) for i in range(lo, hi)]


def noop_list(items: list[int]) -> list[int]:
    """The trivial body over a list of values (the memory workload's chunks)."""
    return [noop(i) for i in items]


def pi_task(j: int, samples: int) -> float:
    """One task of the Monte Carlo estimate of pi (the doRedis vignette's loop).

    Draws ``samples`` points in the unit square from a generator seeded by
    ``j`` and returns 4 * (points inside the quarter circle) / samples; the
    mean over tasks estimates pi.
    """
    import numpy as np

    rng = np.random.default_rng(j)
    inside = 0
    left = samples
    while left > 0:
        n = min(left, _PI_BATCH)
        x = rng.random(n)
        y = rng.random(n)
        inside += int(np.count_nonzero(x * x + y * y < 1.0))
        left -= n
    return 4.0 * inside / samples


def env_slice_sum(data: Any, i: int, tasks: int) -> float:
    """What the W3 body computes: the sum of the ``i``-th of ``tasks`` slices."""
    step = max(1, len(data) // tasks)
    return float(data[i * step : (i + 1) * step].sum())


def make_env_body(data: Any, tasks: int) -> Callable[[int], float]:
    """The W3 body for pforeach: a closure that captures ``data``."""

    def body(i: int) -> float:
        return env_slice_sum(data, i, tasks)

    return body


def env_read_redis(url: str, key: str, i: int, tasks: int) -> float:
    """The W3 body for RQ and Celery, which cannot ship a value once per job.

    The benchmark stores the pickled array under ``key`` before the loop;
    each worker process fetches it on first use and keeps it, which is the
    caching a user of those systems writes by hand.
    """
    data = _FETCHED.get(key)
    if data is None:
        import redis

        client = _CLIENTS.get(url)
        if client is None:
            client = _CLIENTS[url] = redis.Redis.from_url(url)
        raw = client.get(key)
        if not isinstance(raw, bytes):
            raise KeyError(f"{key} is not in Redis at {url}")
        data = _FETCHED[key] = pickle.loads(raw)
    return env_slice_sum(data, i, tasks)


def slow_task(i: int, marker_dir: str, seconds: float) -> int:
    """A task that announces its process and then works for ``seconds``.

    It writes ``<marker_dir>/<i>.<pid>.<time>`` first, so the fault workload
    knows which process to kill, and returns ``i * i``.
    """
    name = f"{i}.{os.getpid()}.{time.time():.6f}"
    with open(os.path.join(marker_dir, name), "w"):
        pass
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)
    return i * i
