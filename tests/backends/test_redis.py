"""The Redis backend against real redis-server and real worker processes.

Every test talks to a redis-server started for this module (or for the test)
and to worker processes started with ``start_local_workers`` or the
``pforeach-worker`` command. What the protocol promises about traffic (an
environment fetched once per worker, not uploaded again) is measured on the
server with MONITOR, not taken from counters in the package.
"""

# Tests take the imported `server` and `r` fixtures as parameters of those names.
# ruff: noqa: F811

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from backend_fixtures import append_line, read_lines, wait_for  # noqa: E402
from redis_support import (  # noqa: E402, F401  (r, server: fixtures)
    BACKEND_OPTIONS,
    DEADLINE,
    WORKER_OPTIONS,
    Background,
    Monitor,
    importable_tests,
    job_keys,
    r,
    registered,
    server,
    start_workers,
    worker_pool,
)

import pforeach  # noqa: E402
from pforeach import (  # noqa: E402
    BackendUnavailableError,
    IterationError,
    OptionError,
    foreach,
    register_backend,
)
from pforeach.backends.redis import (  # noqa: E402
    LocalWorkers,
    RedisBackend,
    remove_queue,
    run_worker,
    start_local_workers,
)
from pforeach.backends.redis.client import ENV_URL, ConnectionSpec  # noqa: E402
from pforeach.backends.redis.server import RedisServer, make_test_certs  # noqa: E402

pytestmark = pytest.mark.timeout(120)

QUEUE = "main"


# -- helpers ----------------------------------------------------------------------------


def worker_environ() -> dict[str, str]:
    """The environment for a worker command started with subprocess."""
    with importable_tests():
        return dict(os.environ)


def no_job_keys_left(r: redis.Redis, queue: str) -> list[str]:
    """Waits for a job's keys to go; returns what is left at the deadline."""
    wait_for(lambda: not job_keys(r, queue))
    return job_keys(r, queue)


def draws(x: int) -> tuple[int, float, float, int]:
    """Random numbers from both global generators, for reproducibility tests."""
    return (x, random.random(), float(np.random.random()), random.getrandbits(32))


def meet_then_pid(x: int, directory: str) -> int:
    """The first two iterations wait for each other, so two workers take part."""
    if x < 2:
        Path(directory, f"{x}.here").touch()
        wait_for(lambda: Path(directory, f"{1 - x}.here").exists())
    return os.getpid()


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool(server: RedisServer) -> Iterator[LocalWorkers]:
    """Two workers serving the main queue for the whole module."""
    with worker_pool(2, QUEUE, server.url) as workers:
        yield workers


@pytest.fixture(scope="module")
def solo(server: RedisServer) -> Iterator[LocalWorkers]:
    """One worker serving the queue ``solo``."""
    with worker_pool(1, "solo", server.url) as workers:
        yield workers


@pytest.fixture
def main(server: RedisServer, pool: LocalWorkers) -> Iterator[RedisBackend]:
    """A RedisBackend on the main queue, registered for the test."""
    with registered(RedisBackend(QUEUE, server.url, **BACKEND_OPTIONS)) as backend:
        yield backend


# -- loops ----------------------------------------------------------------------------------


def test_loops_run_on_the_workers_and_leave_no_job_keys(main, pool, r):
    assert foreach(i=range(10), combine=sum).dopar(lambda i: i * i) == 285
    assert foreach(x=range(7)).dopar(lambda x: -x) == [-x for x in range(7)]
    assert foreach(x=range(10), chunksize=3).dopar(lambda x: x * 2) == [
        x * 2 for x in range(10)
    ]
    assert foreach(a=[1, 2, 3], b="xyz").dopar(lambda a, b: b * a) == ["x", "yy", "zzz"]
    pids = set(foreach(x=range(20)).dopar(lambda x: os.getpid()))
    assert pids <= set(pool.child_pids())
    assert os.getpid() not in pids
    assert no_job_keys_left(r, QUEUE) == []
    # The queue stays open and registered for the next loop.
    assert r.exists(f"{QUEUE}.live")
    assert main.workers() == 2


def test_custom_combine_with_init_multicombine_and_final(main):
    def combine(acc, *values):
        return [*acc, len(values), *sorted(values)]

    loop = foreach(
        x=range(7),
        combine=combine,
        init=[],
        multicombine=True,
        maxcombine=4,
        final=tuple,
    )
    assert loop.dopar(lambda x: x) == loop.do(lambda x: x)
    assert foreach(x=range(5), combine="product", init=1).dopar(lambda x: x + 1) == 120


def test_inorder_false_combines_as_results_arrive(main, tmp_path):
    marker = str(tmp_path / "three-combined")

    def combine(acc, value):
        if value == 3:
            Path(marker).touch()
        return [*acc, value]

    def body(x):
        if x == 0 and not wait_for(Path(marker).exists):
            return "timed out"
        return x

    result = foreach(x=range(6), combine=combine, init=[], inorder=False).dopar(body)
    assert sorted(result) == list(range(6))
    assert result.index(3) < result.index(0)


def fail_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"three is bad ({x})")
    return x * 10


def test_errorhandling_stop_raises_and_cleans_up(main, r):
    with pytest.raises(IterationError, match="three is bad") as info:
        foreach(x=range(8)).dopar(fail_on_three)
    assert info.value.index == 3
    assert isinstance(info.value.__cause__, ValueError)
    assert no_job_keys_left(r, QUEUE) == []
    assert foreach(x=range(3)).dopar(lambda x: x) == [0, 1, 2]


def test_errorhandling_remove_and_pass(main):
    removed = foreach(x=range(6), errorhandling="remove").dopar(fail_on_three)
    assert removed == [0, 10, 20, 40, 50]
    passed = foreach(x=range(6), errorhandling="pass").dopar(fail_on_three)
    assert passed[:3] == [0, 10, 20] and passed[4:] == [40, 50]
    assert isinstance(passed[3], ValueError)
    assert "three is bad" in str(passed[3])


def test_reduce_runs_per_task(main):
    loop = foreach(x=range(10), chunksize=3, reduce=sum)
    assert loop.dopar(lambda x: x) == [0 + 1 + 2, 3 + 4 + 5, 6 + 7 + 8, 9]
    pids = foreach(x=range(10), chunksize=5, reduce=set).dopar(lambda x: os.getpid())
    assert all(len(p) == 1 for p in pids)  # one task, one worker


def test_worker_init_runs_once_per_job_on_each_worker(main, tmp_path):
    log = str(tmp_path / "init.log")
    directory = str(tmp_path)

    def init():
        append_line(log, str(os.getpid()))

    loop = foreach(x=range(24), worker_init=init)
    first = {str(p) for p in loop.dopar(lambda x: meet_then_pid(x, directory))}
    assert len(first) == 2
    assert sorted(read_lines(log)) == sorted(first)

    second = {str(p) for p in loop.dopar(lambda x: meet_then_pid(x, directory))}
    assert sorted(read_lines(log)) == sorted([*first, *second])


@pytest.mark.parametrize("chunksize", [1, 3, 7])
@pytest.mark.parametrize("pool_name", ["one worker", "two workers"])
def test_random_numbers_match_the_sequential_backend(
    server, request, chunksize, pool_name
):
    queue = QUEUE if pool_name == "two workers" else "solo"
    request.getfixturevalue("pool" if queue == QUEUE else "solo")
    loop = foreach(x=range(15), chunksize=chunksize)
    with registered(RedisBackend(queue, server.url, **BACKEND_OPTIONS)):
        assert loop.seed(2024).dopar(draws) == loop.seed(2024).do(draws)
        # Without seed=, both draw their base seeds from the global generators.
        random.seed(99)
        np.random.seed(99)
        expected = loop.do(draws)
        random.seed(99)
        np.random.seed(99)
        assert loop.dopar(draws) == expected
    assert len({value for _, value, _, _ in expected}) == 15


def test_a_malformed_message_does_not_stop_a_worker(main, pool, r):
    before = sorted(pool.child_pids())
    r.rpush(QUEUE, b"this is not a task", b"PFT1 nojob x\n")
    assert foreach(x=range(6), combine=sum).dopar(lambda x: x) == 15
    assert wait_for(lambda: r.llen(QUEUE) == 0)
    assert sorted(pool.child_pids()) == before
    assert main.workers() == 2


# -- what crosses the wire -------------------------------------------------------------------


def test_environment_is_fetched_once_per_worker_and_not_for_a_rerun(
    main, server, tmp_path
):
    directory = str(tmp_path)
    loop = foreach(x=range(12))

    def body(x):
        return meet_then_pid(x, directory)

    with Monitor(server) as first:
        pids = loop.dopar(body)
    assert len(set(pids)) == 2
    uploads = first.calls("SET", prefix=f"{QUEUE}.env.")
    assert len(uploads) == 1
    env_key = uploads[0][1][1]
    fetches = Counter(client for client, _ in first.calls("GET", key=env_key))
    # Both workers took part, and each fetched the environment exactly once.
    assert sorted(fetches.values()) == [1, 1]

    with Monitor(server) as rerun:
        assert len(loop.dopar(body)) == 12
    # The same loop again: same key, kept alive by the master, never sent again.
    assert rerun.calls("EXPIRE", key=env_key)
    assert rerun.calls("SET", prefix=f"{QUEUE}.env.") == []
    assert rerun.calls("GET", key=env_key) == []

    with Monitor(server) as other:
        assert foreach(x=range(4)).dopar(lambda x: x + 1) == [1, 2, 3, 4]
    new_uploads = other.calls("SET", prefix=f"{QUEUE}.env.")
    assert len(new_uploads) == 1 and new_uploads[0][1][1] != env_key
    new_fetches = Counter(c for c, _ in other.calls("GET", key=new_uploads[0][1][1]))
    assert 1 <= len(new_fetches) <= 2 and set(new_fetches.values()) == {1}


def test_a_worker_keeps_a_bounded_number_of_environments(server):
    workers = start_workers(1, "cache", server.url, env_cache=1)
    loop = foreach(x=range(3))

    def plus_one(x):
        return x + 1

    def times_five(x):
        return x * 5

    backend = RedisBackend("cache", server.url, **BACKEND_OPTIONS)
    try:
        with registered(backend), Monitor(server) as seen:
            assert loop.dopar(plus_one) == [1, 2, 3]
            assert loop.dopar(times_five) == [0, 5, 10]
            # The first environment was evicted to make room for the second.
            assert loop.dopar(plus_one) == [1, 2, 3]
    finally:
        workers.stop()
    uploads = [args[1] for _, args in seen.calls("SET", prefix="cache.env.")]
    fetches = [args[1] for _, args in seen.calls("GET", prefix="cache.env.")]
    assert len(uploads) == 2
    assert fetches == [uploads[0], uploads[1], uploads[0]]


def test_submission_is_pipelined_and_results_are_popped_in_batches(main, server, r):
    with Monitor(server) as seen:
        assert foreach(x=range(300), combine=sum).dopar(lambda x: x) == sum(range(300))
    pushes = seen.calls("RPUSH", key=QUEUE)
    assert 1 <= len(pushes) <= 300 // 10
    pops = [args for _, args in seen.calls("LPOP", prefix=f"{QUEUE}.out.")]
    assert pops and all(len(args) == 3 and int(args[2]) > 1 for args in pops)
    # Only the shared environment outlives the job, and it expires.
    ((_, (_, env_key, *_)),) = seen.calls("SET", prefix=f"{QUEUE}.env.")
    assert 0 < r.ttl(env_key) <= BACKEND_OPTIONS["env_ttl"]


def test_workers_reports_the_live_workers(main, pool, solo, server):
    assert main.workers() == 2
    assert pforeach.workers() == 2
    assert RedisBackend("solo", server.url).workers() == 1
    assert RedisBackend("nobody", server.url).workers() == 0

    counts: list[int] = []
    done = threading.Event()
    watcher = RedisBackend(QUEUE, server.url)

    def sample():
        while not done.is_set():
            counts.append(watcher.workers())
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        total = foreach(x=range(60), combine=sum).dopar(lambda x: time.sleep(0.02) or x)
    finally:
        done.set()
        sampler.join(DEADLINE)
        watcher.close()
    assert total == sum(range(60))
    assert counts and min(counts) == 2


# -- workers and masters coming and going ------------------------------------------------------


def test_a_worker_started_mid_job_takes_part(server, r, tmp_path):
    log = str(tmp_path / "started.log")
    go = tmp_path / "go"

    def body(x):
        append_line(log, f"{x} {os.getpid()}")
        wait_for(go.exists)
        return os.getpid()

    first = start_workers(1, "join", server.url)
    second = None
    try:
        with registered(RedisBackend("join", server.url, **BACKEND_OPTIONS)):
            loop = Background(lambda: foreach(x=range(12)).dopar(body))
            # The only worker is busy with the first task: the job is running.
            assert wait_for(lambda: read_lines(log))
            assert read_lines(log)[0].split()[1] == str(first.child_pids()[0])
            second = start_workers(1, "join", server.url)
            late = {str(p) for p in second.child_pids()}
            assert late
            assert wait_for(
                lambda: any(line.split()[1] in late for line in read_lines(log))
            )
            go.touch()
            pids = loop.value()
        assert {str(p) for p in pids} & late
        assert set(pids) <= set(first.child_pids()) | {int(p) for p in late}
        assert no_job_keys_left(r, "join") == []
    finally:
        go.touch()
        first.stop()
        if second is not None:
            second.stop()


def test_a_master_can_submit_before_any_worker_exists(server, r):
    backend = RedisBackend("early", server.url, **BACKEND_OPTIONS)
    workers = None
    with registered(backend):
        assert backend.workers() == 0
        loop = Background(
            lambda: foreach(x=range(20), combine=sum).dopar(lambda x: x * 3)
        )
        try:
            assert wait_for(lambda: r.llen("early") == 20)
            assert loop.is_alive()
            workers = start_workers(2, "early", server.url)
            assert loop.value() == 3 * sum(range(20))
        finally:
            if workers is not None:
                workers.stop()
    assert no_job_keys_left(r, "early") == []


MASTER_SCRIPT = """
import json, os, sys
from pforeach import foreach, register_backend
from pforeach.backends.redis import RedisBackend

queue, url, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
register_backend(RedisBackend(queue, url, ftinterval=3, key_ttl=30))
result = foreach(x=range(30)).dopar(lambda x: (k, x * k, os.getpid()))
print(json.dumps(result))
"""


def test_two_masters_on_one_queue_get_their_own_results(server, r):
    masters = [
        subprocess.Popen(
            [sys.executable, "-c", MASTER_SCRIPT, "duo", server.url, str(k)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in (3, 7)
    ]
    workers = None
    try:
        # Both jobs are queued before any worker exists, so their tasks are
        # served side by side.
        assert wait_for(lambda: r.scard("duo.jobs") == 2 and r.llen("duo") == 60)
        queued = {m.split(b" ")[1] for m in r.lrange("duo", 0, -1)}
        assert len(queued) == 2
        workers = start_workers(2, "duo", server.url)
        outputs = [m.communicate(timeout=2 * DEADLINE) for m in masters]
    finally:
        for m in masters:
            if m.poll() is None:
                m.kill()
                m.wait()
        if workers is not None:
            pids = set(workers.child_pids())
            workers.stop()
    for (out, err), master, k in zip(outputs, masters, (3, 7)):
        assert master.returncode == 0, err
        result = json.loads(out)
        assert [(a, b) for a, b, _ in result] == [(k, x * k) for x in range(30)]
        assert {pid for _, _, pid in result} <= pids
    assert no_job_keys_left(r, "duo") == []


def test_one_worker_serves_two_queues(server, r):
    workers = start_workers(1, ["qa", "qb"], server.url)
    try:
        (pid,) = workers.child_pids()
        for queue, k in (("qa", 2), ("qb", 5)):
            with registered(RedisBackend(queue, server.url, **BACKEND_OPTIONS)) as b:
                assert b.workers() == 1
                result = foreach(x=range(6)).dopar(lambda x, k=k: (x * k, os.getpid()))
            assert result == [(x * k, pid) for x in range(6)]
            assert no_job_keys_left(r, queue) == []
    finally:
        workers.stop()


def test_run_worker_serves_two_queues_in_process_until_they_are_removed(server, r):
    worker = Background(
        lambda: run_worker(["ra", "rb"], server.url, linger=0.5, block=0.2, alive_ttl=5)
    )
    assert wait_for(lambda: RedisBackend("rb", server.url).workers() == 1)
    for queue, k in (("ra", 2), ("rb", 5)):
        with registered(RedisBackend(queue, server.url, **BACKEND_OPTIONS)):
            result = foreach(x=range(5)).dopar(lambda x, k=k: (x * k, os.getpid()))
        assert result == [(x * k, os.getpid()) for x in range(5)]
    remove_queue("ra", server.url)
    remove_queue("rb", server.url)
    assert worker.value(DEADLINE) == 0
    assert wait_for(lambda: not r.keys("ra*") and not r.keys("rb*")), r.keys("r[ab]*")


def test_remove_queue_stops_its_workers_after_the_linger_time(server, r):
    linger = 2.0
    workers = start_workers(2, "gone", server.url, linger=linger)
    try:
        with registered(RedisBackend("gone", server.url, **BACKEND_OPTIONS)):
            assert foreach(x=range(6), combine=sum).dopar(lambda x: x) == 15
        assert r.keys("gone*")
        started = time.monotonic()
        assert remove_queue("gone", server.url) > 0
        assert workers.proc.wait(DEADLINE) == 0
        assert time.monotonic() - started >= linger
        assert wait_for(lambda: not r.keys("gone*")), r.keys("gone*")
    finally:
        workers.stop()


def worker_command() -> list[str]:
    script = Path(sys.executable).with_name("pforeach-worker")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from pforeach.cli import worker_main; worker_main()"]


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_the_worker_command_serves_loops_and_stops_cleanly(server, r, stop_signal):
    queue = f"cli{int(stop_signal)}"
    proc = subprocess.Popen(
        [
            *worker_command(),
            "start",
            "-n",
            "2",
            "--queue",
            queue,
            "--url",
            server.url,
            "--linger",
            "1",
            "--loglevel",
            "WARNING",
        ],
        env=worker_environ(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        backend = RedisBackend(queue, server.url, **BACKEND_OPTIONS)
        assert wait_for(lambda: backend.workers() == 2 or proc.poll() is not None)
        assert proc.poll() is None
        with registered(backend):
            assert foreach(x=range(10), combine=sum).dopar(lambda x: x * x) == 285
        proc.send_signal(stop_signal)
        _, err = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert f"2 worker(s) serving {queue}" in err
    assert r.keys(f"{queue}.worker.*") == []
    assert r.keys(f"{queue}.proc.*") == []
    assert r.scard(f"{queue}.workers") == 0
    assert RedisBackend(queue, server.url).workers() == 0


# -- connecting ------------------------------------------------------------------------------


def roundtrip(
    backend: RedisBackend,
    workers: LocalWorkers,
    check: Callable[[], None] | None = None,
) -> None:
    """A loop through ``backend`` runs on ``workers``; ``check`` runs before they stop."""
    try:
        with registered(backend):
            assert backend.workers() == 1
            result = foreach(x=range(8)).dopar(lambda x: (x * x, os.getpid()))
            if check is not None:
                check()
        assert result == [(x * x, workers.child_pids()[0]) for x in range(8)]
    finally:
        workers.stop()


def test_connection_from_the_environment_variable(server, monkeypatch):
    monkeypatch.setenv(ENV_URL, server.url)
    workers = start_workers(1, "fromenv")  # no URL either
    backend = RedisBackend("fromenv")
    assert backend.spec.describe() == server.url
    roundtrip(backend, workers)


def test_connection_by_host_port_and_db(server, monkeypatch):
    monkeypatch.delenv(ENV_URL, raising=False)
    workers = start_workers(1, "hostport", f"redis://127.0.0.1:{server.port}/3")
    backend = RedisBackend("hostport", host="127.0.0.1", port=server.port, db=3)
    with server.client(db=3) as db3:
        assert db3.exists("hostport.live")
        roundtrip(backend, workers)


def test_connection_by_unix_socket(tmp_path):
    sock = tmp_path / "redis.sock"
    extra = ("--unixsocket", str(sock), "--unixsocketperm", "700")
    with RedisServer(extra_args=extra) as srv:
        url = f"unix://{sock}?db=0"
        backend = RedisBackend("sock", url)

        def over_the_socket():
            assert "U" in backend.client.client_info()["flags"]
            with srv.client() as conn:
                on_socket = [c for c in conn.client_list() if "U" in c["flags"]]
            # the master, the worker and its supervisor
            assert len(on_socket) >= 3

        roundtrip(backend, start_workers(1, "sock", url), over_the_socket)


def test_connection_with_username_and_password():
    with RedisServer(password="top-secret") as srv:
        with srv.client() as conn:
            conn.execute_command(
                "ACL", "SETUSER", "alice", "on", ">alice-pw", "~*", "&*", "+@all"
            )
        plain = f"redis://127.0.0.1:{srv.port}/0"
        workers = start_workers(1, "auth", srv.url)  # the default user, in the URL
        roundtrip(
            RedisBackend("auth", plain, username="alice", password="alice-pw"), workers
        )

        wrong = RedisBackend("auth", plain, password="wrong", reconnect_timeout=0.5)
        with registered(wrong), pytest.raises(BackendUnavailableError) as info:
            foreach(x=range(2)).dopar(lambda x: x)
        assert f"127.0.0.1:{srv.port}" in str(info.value)
        assert "wrong" not in str(info.value)


def test_connection_over_tls(tmp_path):
    certs = make_test_certs(tmp_path / "certs")
    with RedisServer(tls=certs) as srv:
        assert srv.url.startswith("rediss://")
        spec = ConnectionSpec(srv.url, ssl_ca_certs=certs.ca_file)
        with importable_tests():
            pool = start_local_workers(1, "tls", spec=spec, **WORKER_OPTIONS)
        pool.wait_ready(DEADLINE)
        roundtrip(RedisBackend("tls", srv.url, ssl_ca_certs=certs.ca_file), pool)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("two words",), {}, "invalid queue name"),
        (("a.b",), {}, "invalid queue name"),
        (("q",), {"ftinterval": 1}, "ftinterval"),
        (("q",), {"ftinterval": 10, "key_ttl": 15}, "key_ttl"),
        (("q",), {"max_inflight": 0}, "max_inflight"),
        (("q",), {"part_size": 0}, "part_size"),
    ],
)
def test_bad_backend_arguments_are_named(args, kwargs, message):
    with pytest.raises(OptionError, match=message):
        RedisBackend(*args, **kwargs)


def test_register_backend_by_name(server):
    backend = register_backend("redis", "byname", server.url)
    try:
        assert isinstance(backend, RedisBackend)
        assert backend.queue == "byname"
        assert backend.workers() == 0
    finally:
        register_backend(None)
        backend.close()
