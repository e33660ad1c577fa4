"""Large values and long loops on the Redis backend, measured on the server.

Values above the part size (a job environment, a task's arguments, a result)
travel as numbered part keys; a loop over a huge generator is submitted as it
is consumed. Both are checked against a real redis-server: MONITOR shows the
part keys being written and read, ``INFO memory`` and ``LLEN`` show what the
server holds while a million-item loop runs, and ``/proc/self/status`` shows
what the master holds.
"""

# Tests take the imported `server` and `r` fixtures as parameters of those names.
# ruff: noqa: F811

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from redis_support import (  # noqa: E402, F401  (r, server: fixtures)
    BACKEND_OPTIONS,
    DEADLINE,
    Monitor,
    job_keys,
    r,
    registered,
    server,
    start_workers,
    worker_pool,
)

from pforeach import (  # noqa: E402
    foreach,
    serialize,
)
from pforeach.backends.redis import (  # noqa: E402
    LocalWorkers,
    RedisBackend,
)
from pforeach.backends.redis.server import RedisServer  # noqa: E402
from pforeach.backends.redis.values import read_value, write_value  # noqa: E402
from pforeach.job import Task  # noqa: E402

pytestmark = pytest.mark.timeout(120)

PART_SIZE = 1000
QUEUE = "big"


# -- helpers ----------------------------------------------------------------------------


def parts(keys: list[str]) -> set[str]:
    return {k for k in keys if ".part." in k}


def vmrss_kib() -> int:
    """This process's resident set size, from /proc."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool(server: RedisServer) -> Iterator[LocalWorkers]:
    """Two workers that store results above PART_SIZE bytes in parts."""
    with worker_pool(2, QUEUE, server.url, part_size=PART_SIZE) as workers:
        yield workers


# -- the split itself ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "count"),
    [(0, 0), (1, 0), (999, 0), (1000, 0), (1001, 2), (2000, 2), (2001, 3), (9999, 10)],
)
def test_values_round_trip_through_redis_at_the_part_boundary(r, size, count):
    data = os.urandom(size)
    pipe = r.pipeline(transaction=False)
    blob = write_value(pipe, "unit.value", data, PART_SIZE, ttl=30)
    pipe.execute()
    stored = sorted(k.decode() for k in r.keys("unit.value.part.*"))
    try:
        assert len(stored) == count
        assert (blob[:1] == b"=") == (count == 0)
        if count:
            assert blob == b"#%d" % count
            assert all(len(r.get(k)) <= PART_SIZE for k in stored)
            assert 0 < r.ttl(stored[0]) <= 30
        assert read_value(r, "unit.value", blob) == data
    finally:
        if stored:
            r.delete(*stored)


# -- values over the part size in real loops --------------------------------------------------


def test_environment_arguments_and_results_over_the_part_size(server, pool, r):
    captured = os.urandom(5 * PART_SIZE)  # goes with the body, in the environment
    arguments = [bytes([i]) * (3 * PART_SIZE) for i in range(6)]

    def body(arg):
        return captured[:100] + arg + arg  # 6100 bytes: a result in parts

    backend = RedisBackend(QUEUE, server.url, part_size=PART_SIZE, **BACKEND_OPTIONS)
    with registered(backend), Monitor(server) as seen:
        result = foreach(arg=arguments).dopar(body)
    assert result == [captured[:100] + a + a for a in arguments]

    env_parts = parts(seen.keys("SET", f"{QUEUE}.env."))
    task_parts = parts(seen.keys("SET", f"{QUEUE}.task."))
    result_parts = parts(seen.keys("SET", f"{QUEUE}.result."))
    assert len(env_parts) >= 5
    assert len(task_parts) >= 6 * 3
    assert len(result_parts) >= 6 * 6
    # ... and each was read back: the environment and tasks by the workers,
    # the results by the master.
    assert env_parts == parts(seen.keys("GET", f"{QUEUE}.env."))
    assert task_parts == parts(seen.keys("GET", f"{QUEUE}.task."))
    assert result_parts == parts(seen.keys("GET", f"{QUEUE}.result."))
    # Once the loop has returned, only the shared environment's parts remain
    # (the job's keys are deleted at its end, not left to expire).
    assert job_keys(r, QUEUE) == []
    assert {k.decode() for k in r.keys(f"{QUEUE}.env.*.part.*")} == env_parts


def test_the_workers_part_size_applies_to_results(server, pool):
    backend = RedisBackend(QUEUE, server.url, **BACKEND_OPTIONS)  # default part size
    with registered(backend), Monitor(server) as seen:
        result = foreach(n=[10, 2500]).dopar(lambda n: b"r" * n)
    assert result == [b"r" * 10, b"r" * 2500]
    assert parts(seen.keys("SET", f"{QUEUE}.env.")) == set()
    assert parts(seen.keys("SET", f"{QUEUE}.task.")) == set()
    # Only the large result was cut: 2500 bytes and a small envelope, in 3 parts.
    result_parts = parts(seen.keys("SET", f"{QUEUE}.result."))
    assert len(result_parts) == 3
    assert len({k.rsplit(".part.", 1)[0] for k in result_parts}) == 1


def test_an_environment_whose_parts_expired_is_uploaded_again(server, r):
    queue = "heal"
    captured = os.urandom(4 * PART_SIZE)
    loop = foreach(i=range(4))

    def body(i):
        return captured[i]

    backend = RedisBackend(queue, server.url, part_size=PART_SIZE, **BACKEND_OPTIONS)
    with registered(backend):
        workers = start_workers(1, queue, server.url)
        try:
            assert loop.dopar(body) == list(captured[:4])
        finally:
            workers.stop()
        env_parts = r.keys(f"{queue}.env.*.part.*")
        assert len(env_parts) >= 4
        # The parts are gone while the key that names them is still there, as
        # when they outlive their TTL; a worker that has not cached it yet
        # cannot read it, and the master sends it again.
        r.delete(*env_parts)
        workers = start_workers(1, queue, server.url)
        try:
            with Monitor(server) as seen:
                assert loop.dopar(body) == list(captured[:4])
        finally:
            workers.stop()
    assert len(parts(seen.keys("SET", f"{queue}.env."))) >= 4
    assert len(r.keys(f"{queue}.env.*.part.*")) == len(env_parts)


# -- a long loop over a generator -------------------------------------------------------------


@pytest.mark.timeout(300)  # a million iterations, on a shared machine
def test_a_million_item_generator_runs_lazily_in_bounded_memory(server, r):
    queue, n, chunksize, max_inflight = "million", 1_000_000, 1000, 50
    tasks = n // chunksize
    workers = start_workers(2, queue, server.url)
    backend = RedisBackend(
        queue, server.url, max_inflight=max_inflight, **BACKEND_OPTIONS
    )
    watch = server.client()
    peak = {"llen": 0, "memory": 0, "rss": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            llen, info = watch.pipeline().llen(queue).info("memory").execute()
            peak["llen"] = max(peak["llen"], llen)
            peak["memory"] = max(peak["memory"], info["used_memory"])
            peak["rss"] = max(peak["rss"], vmrss_kib())
            stop.wait(0.02)

    ahead: list[int] = []  # tasks made by the master but not yet taken
    taken_at_end: list[int] = []

    def taken() -> int:
        (job_id,) = r.smembers(f"{queue}.jobs")
        return r.hlen(f"{queue}.attempts.{job_id.decode()}")

    def items() -> Iterator[int]:
        for i in range(n):
            if i % chunksize == 0:
                ahead.append(i // chunksize - taken())
            yield i
        taken_at_end.append(taken())

    memory_before = r.info("memory")["used_memory"]
    rss_before = vmrss_kib()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with registered(backend):
            loop = foreach(x=items(), combine=sum, inorder=False, chunksize=chunksize)
            total = loop.dopar(lambda x: x)
    finally:
        stop.set()
        sampler.join(DEADLINE)
        watch.close()
        workers.stop()

    assert total == n * (n - 1) // 2
    assert len(ahead) == tasks
    # The generator was consumed as tasks were taken, never far ahead of them...
    assert max(ahead) <= max_inflight
    # ... so workers were running it long before it was exhausted.
    assert taken_at_end[0] >= tasks - max_inflight
    assert 0 < peak["llen"] <= max_inflight
    # All the tasks at once would take ~15 MB in Redis; 50 of them take < 1 MB.
    all_tasks = tasks * len(
        serialize.dumps(Task(0, [(i, {"x": i}) for i in range(chunksize)]))
    )
    assert all_tasks > 10 * 2**20
    assert peak["memory"] - memory_before < 6 * 2**20, peak
    # A million iterations held at once would take hundreds of MB in the master.
    assert (peak["rss"] - rss_before) * 1024 < 64 * 2**20, peak
    assert job_keys(r, queue) == []
