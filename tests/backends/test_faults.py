"""Fault tolerance of the Redis backend, with real processes and real servers.

Workers are killed, frozen and stopped; tasks are moved by hand the way a
dying worker would leave them; redis-server is killed and restarted empty.
Each test checks that the loop still returns every iteration exactly once,
or fails the way the failure model says (docs/failures.md).
"""

from __future__ import annotations

import functools
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fault_bodies import (
    die_in_first_seconds,
    first_run_waits,
    hold_gil,
    late_body,
    logged_square,
    long_or_poison,
    long_task,
    poison,
    sleeps_past_limit,
    stress_body,
    waits_for,
)
from fault_support import (
    ALIVE_TTL,
    DEADLINE,
    FTINTERVAL,
    events,
    gone,
    in_thread,
    job_ids,
    make_backend,
    make_lab,
    pool,
    queued_of,
    registered,
    start_pool,
    stop_pool,
    wait_until,
)

from pforeach import (
    BackendUnavailableError,
    IterationError,
    JobCancelledError,
    OptionError,
    TaskTimeoutError,
    WorkerLostError,
    foreach,
)
from pforeach.backends.redis import RedisBackend, remove_job
from pforeach.backends.redis.client import ConnectionSpec

pytestmark = pytest.mark.timeout(120)

MASTER_LOG = "pforeach.backends.redis.master"


@pytest.fixture
def lab(fresh_redis, tmp_path, request, monkeypatch):
    yield from make_lab(fresh_redis, tmp_path, request, monkeypatch)


def squares(n: int) -> list[int]:
    return [i * i for i in range(n)]


def pid_of(line: str) -> int:
    return int(line.split()[2])


# -- options ------------------------------------------------------------------------


def test_ftinterval_below_three_seconds_is_refused():
    with pytest.raises(OptionError, match="ftinterval"):
        RedisBackend("jobs", "redis://127.0.0.1:1/0", ftinterval=2.9)
    backend = RedisBackend("jobs", "redis://127.0.0.1:1/0", ftinterval=3)
    assert backend.ftinterval == 3.0


def test_connections_detect_a_silent_peer(fresh_redis):
    """Keepalive and the unacknowledged-data limit are set on every connection."""
    client = ConnectionSpec(fresh_redis.url).connect()
    try:
        client.ping()
        conn = client.connection_pool.get_connection()
        try:
            sock = conn._sock
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 5
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
            assert (
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 30_000
            )
            # and no read timeout, so blocking waits are never cut short
            assert sock.gettimeout() is None
        finally:
            client.connection_pool.release(conn)
    finally:
        client.close()


# -- workers that die ---------------------------------------------------------------


def test_vignette_workers_that_take_a_task_first_exit(lab):
    """doRedis vignette, section 3.2: the first takers die; the loop returns 10.

    Supervisors put a dead worker's task back at once and start a new
    worker, so within the five seconds a task is taken (and its worker
    killed) several times: the attempt limit is raised accordingly.
    """
    deaths = lab.file("deaths")
    with (
        pool(4, lab.url, lab.queue, lab.dir),
        registered(make_backend(lab.url, lab.queue)),
    ):
        start = time.time()
        body = functools.partial(die_in_first_seconds, start=start, log=str(deaths))
        result = foreach(
            j=range(1, 5), combine=sum, chunksize=2, max_attempts=100
        ).dopar(body)
    assert result == 10
    assert time.time() - start >= 5
    died = events(deaths, "died")
    assert len(died) >= 2, died
    assert {line.split()[1] for line in died} == {"1", "3"}  # the tasks' first j


def test_worker_killed_in_the_middle_of_a_long_task(lab):
    runs = lab.file("runs")
    with (
        pool(2, lab.url, lab.queue, lab.dir) as workers,
        registered(make_backend(lab.url, lab.queue)),
    ):
        body = functools.partial(
            logged_square, log=str(runs), sleep=0.05, slow=3, slow_sleep=3.0
        )
        future = in_thread(lambda: foreach(i=range(8)).dopar(body))
        victim = pid_of(
            wait_until(lambda: events(runs, "start", 3), what="task 3 runs")[0]
        )
        assert victim in workers.child_pids()
        os.kill(victim, signal.SIGKILL)
        result = future.result(timeout=DEADLINE)
    assert result == squares(8)
    starts = events(runs, "start", 3)
    assert len(starts) == 2 and pid_of(starts[1]) != victim
    assert len(events(runs, "done", 3)) == 1


def test_whole_machine_lost_master_resubmits(lab):
    """Workers and their supervisor die at once: only the master can notice."""
    runs = lab.file("runs")
    first = start_pool(2, lab.url, lab.queue, lab.dir)
    try:
        with registered(make_backend(lab.url, lab.queue)):
            body = functools.partial(logged_square, log=str(runs), sleep=2.0)
            future = in_thread(lambda: foreach(i=range(4)).dopar(body))
            wait_until(lambda: len(events(runs, "start")) >= 2, what="two tasks run")
            # Freeze the whole "machine" first so that nothing of it can react,
            # then kill it.
            children = first.child_pids()
            for pid in [first.pid, *children]:
                os.kill(pid, signal.SIGSTOP)
            for pid in [first.pid, *children]:
                os.kill(pid, signal.SIGKILL)
            first.proc.wait()
            lost = {line.split()[1] for line in events(runs, "start")}
            with pool(2, lab.url, lab.queue, lab.dir):
                result = future.result(timeout=DEADLINE)
    finally:
        stop_pool(first)
    assert result == squares(4)
    for i in lost:  # each task that was running when the machine died ran again
        assert len(events(runs, "start", int(i))) == 2


def test_task_held_by_a_dead_worker_is_reclaimed(lab):
    """Raw Redis: a task sits in a dead worker's processing list; nothing is lost.

    Worker ``dead`` took a task (LMOVE into its list) and died before any
    bookkeeping: it is registered but has no worker key. Worker ``stuck``
    still has a worker key, and a start key for its task, but the task's
    alive key expired.
    """
    q, r = lab.queue, lab.r
    runs = lab.file("runs")
    with registered(make_backend(lab.url, q)):
        body = functools.partial(logged_square, log=str(runs))
        future = in_thread(lambda: foreach(i=range(6)).dopar(body))
        job = wait_until(lambda: job_ids(r, q), what="job registered")[0]
        wait_until(lambda: queued_of(r, q, job) == 6, what="tasks queued")
        second = r.lindex(q, 1)
        stuck_task = int(second.split(b" ")[2])
        r.hset(f"{q}.worker.stuck", mapping={"host": "elsewhere", "pid": 1})
        r.expire(f"{q}.worker.stuck", 300)
        r.set(f"{q}.start.{job}.{stuck_task}", f"stuck {time.time():.3f}", ex=300)
        first = r.lmove(q, f"{q}.proc.dead", "LEFT", "RIGHT")
        assert r.lmove(q, f"{q}.proc.stuck", "LEFT", "RIGHT") == second
        r.sadd(f"{q}.workers", "dead", "stuck")
        dead_task = int(first.split(b" ")[2])
        with pool(2, lab.url, q, lab.dir):
            result = future.result(timeout=DEADLINE)
    assert result == squares(6)
    for i in range(6):
        assert len(events(runs, "done", i)) == 1, i
    assert {dead_task, stuck_task} == {0, 1}
    assert r.llen(f"{q}.proc.dead") == 0
    assert r.llen(f"{q}.proc.stuck") == 0
    assert not r.sismember(f"{q}.workers", "dead")


def test_late_result_of_a_worker_taken_for_dead_is_combined_once(lab, caplog):
    """A worker whose heartbeats stop is taken for dead; its result comes later.

    The supervisor of the first pool is frozen (SIGSTOP), so nobody beats for
    its worker, which still runs task 0. The master puts the task back; a
    second pool runs it. Then the first worker finishes and pushes its result
    too, while task 2 keeps the loop open: the master drops the repeat.
    """
    caplog.set_level(logging.DEBUG, logger=MASTER_LOG)
    runs, release = lab.file("runs"), lab.file("release")
    first = start_pool(1, lab.url, lab.queue, lab.dir)
    try:
        with registered(make_backend(lab.url, lab.queue)):
            body = functools.partial(
                late_body, log=str(runs), release=str(release), timeout=DEADLINE
            )
            future = in_thread(lambda: foreach(i=range(3)).dopar(body))
            wait_until(lambda: events(runs, "start", 0), what="task 0 runs")
            os.kill(first.pid, signal.SIGSTOP)
            with pool(2, lab.url, lab.queue, lab.dir):
                wait_until(lambda: events(runs, "done", 0), what="task 0 ran again")
                wait_until(lambda: events(runs, "start", 2), what="task 2 runs")
                release.with_suffix(
                    ".first"
                ).touch()  # the frozen pool's worker finishes
                wait_until(
                    lambda: len(events(runs, "done", 0)) == 2, what="late finish"
                )
                wait_until(
                    lambda: "repeated result of task 0" in caplog.text,
                    what="the master sees the late result",
                )
                assert not future.done()
                release.with_suffix(".last").touch()
                result = future.result(timeout=DEADLINE)
    finally:
        stop_pool(first)
    assert result == squares(3)
    assert len(events(runs, "start", 0)) == 2


def test_duplicate_result_while_another_is_missing(lab, caplog):
    """Task 0 runs twice; the loop still waits for task 2's one result."""
    caplog.set_level(logging.DEBUG, logger=MASTER_LOG)
    q, r = lab.queue, lab.r
    runs, release = lab.file("runs"), lab.file("release")
    with registered(make_backend(lab.url, q)):
        body = functools.partial(
            waits_for, log=str(runs), hold=2, release=str(release), timeout=DEADLINE
        )
        future = in_thread(lambda: foreach(i=range(3)).dopar(body))
        job = wait_until(lambda: job_ids(r, q), what="job registered")[0]
        wait_until(lambda: queued_of(r, q, job) == 3, what="tasks queued")
        r.rpush(q, r.lindex(q, 0))  # a second copy of task 0
        with pool(2, lab.url, q, lab.dir):
            wait_until(
                lambda: len(events(runs, "done", 0)) == 2, what="task 0 ran twice"
            )
            wait_until(lambda: events(runs, "start", 2), what="task 2 runs")
            wait_until(
                lambda: "repeated result of task 0" in caplog.text,
                what="the repeat reached the master",
            )
            assert not future.done()  # two results arrived, one of them a repeat
            release.touch()
            result = future.result(timeout=DEADLINE)
    assert result == squares(3)
    assert len(events(runs, "done", 1)) == 1
    assert len(events(runs, "done", 2)) == 1


@pytest.mark.parametrize("how", ["stop", "pass"])
def test_task_that_kills_its_worker_fails_after_the_attempt_limit(lab, how):
    deaths = lab.file("deaths")
    body = functools.partial(poison, bad=2, log=str(deaths))
    with (
        pool(2, lab.url, lab.queue, lab.dir),
        registered(make_backend(lab.url, lab.queue)),
    ):
        if how == "stop":
            attempts = 3  # the default
            with pytest.raises(IterationError) as info:
                foreach(i=range(5)).dopar(body)
            assert isinstance(info.value.__cause__, WorkerLostError)
            assert info.value.index == 2
            assert "(i=2)" in str(info.value)
        else:
            attempts = 2
            result = foreach(i=range(5), max_attempts=2, errorhandling="pass").dopar(
                body
            )
            assert [v for k, v in enumerate(result) if k != 2] == [0, 10, 30, 40]
            assert isinstance(result[2], WorkerLostError)
            assert f"tried {attempts} times" in str(result[2])
    assert len(events(deaths, "died", 2)) == attempts


def test_task_past_its_time_limit_is_stopped_and_the_pool_serves_on(lab):
    backend = make_backend(lab.url, lab.queue)
    with pool(2, lab.url, lab.queue, lab.dir) as workers, registered(backend):
        before = set(workers.child_pids())
        body = functools.partial(sleeps_past_limit, slow=1, seconds=DEADLINE)
        started = time.monotonic()
        result = foreach(i=range(4), timeout=2, errorhandling="pass").dopar(body)
        assert time.monotonic() - started < DEADLINE / 2
        assert result[0] == 100 and result[2:] == [102, 103]
        assert isinstance(result[1], TaskTimeoutError)
        assert "2s timeout" in str(result[1])
        # The stopped worker was replaced; both serve the next loop.
        wait_until(
            lambda: len(set(workers.child_pids()) - before) == 1, what="replacement"
        )
        wait_until(lambda: backend.workers() == 2, what="two live workers")
        quick = functools.partial(sleeps_past_limit, slow=-1, seconds=0)
        assert foreach(i=range(6), combine=sum).dopar(quick) == sum(range(100, 106))


def test_body_holding_the_gil_in_one_c_call_counts_as_alive(lab):
    """Six seconds in one C call that keeps the GIL: three heartbeat TTLs.

    Heartbeats come from the supervisor's process, so the task is not taken
    for lost and runs exactly once (the second worker stays idle).
    """
    runs = lab.file("runs")
    with (
        pool(2, lab.url, lab.queue, lab.dir, alive_ttl=ALIVE_TTL),
        registered(make_backend(lab.url, lab.queue)),
    ):
        body = functools.partial(hold_gil, seconds=6, log=str(runs))
        [(index, spent, ticks_during, ticks)] = foreach(i=range(1)).dopar(body)
    assert spent >= 5.9 and spent >= 3 * ALIVE_TTL - 0.1 and spent > FTINTERVAL
    assert ticks_during == 0  # no other thread ran: the GIL was held all along
    assert ticks >= 4  # ... while the same thread ticked before and after
    assert index == 0
    assert len(events(runs, "start", 0)) == 1


def test_worker_told_to_stop_hands_its_task_back(lab):
    """SIGTERM to a worker: its task goes back at once, without counting as an
    attempt (max_attempts=1 would fail the task otherwise), and it exits; an
    idle worker exits at once too, even in the middle of a long blocking wait.
    Workers stopped so are not replaced; one that crashes later still is."""
    runs = lab.file("runs")
    with (
        pool(3, lab.url, lab.queue, lab.dir, block=30.0) as workers,
        registered(make_backend(lab.url, lab.queue)),
    ):
        body = functools.partial(
            first_run_waits,
            log=str(runs),
            hold=0,
            release=str(lab.file("never")),
            timeout=DEADLINE,
        )
        future = in_thread(lambda: foreach(i=range(4), max_attempts=1).dopar(body))
        victim = pid_of(
            wait_until(lambda: events(runs, "start", 0), what="task 0 runs")[0]
        )
        os.kill(victim, signal.SIGTERM)
        wait_until(lambda: gone(victim), timeout=10, what="the busy worker exits")
        result = future.result(timeout=DEADLINE)
        assert result == squares(4)
        starts = events(runs, "start", 0)
        assert len(starts) == 2 and pid_of(starts[1]) != victim
        assert len(events(runs, "done", 0)) == 1

        # An idle worker sits in a 30 s wait for tasks; SIGTERM ends it now.
        def living() -> list[int]:
            return [p for p in workers.child_pids() if not gone(p)]

        idle = next(p for p in living() if p != victim)
        os.kill(idle, signal.SIGTERM)
        wait_until(lambda: gone(idle), timeout=10, what="the idle worker exits")
        [last] = wait_until(
            lambda: living() if len(living()) == 1 else None, what="one worker left"
        )
        os.kill(last, signal.SIGKILL)
        wait_until(
            lambda: [p for p in living() if p != last],
            what="the crashed worker replaced",
        )
        quick = functools.partial(sleeps_past_limit, slow=-1, seconds=0)
        assert foreach(i=range(3), combine=sum).dopar(quick) == 303


def test_workers_hand_back_and_exit_when_their_supervisor_dies(lab):
    runs = lab.file("runs")
    first = start_pool(2, lab.url, lab.queue, lab.dir)
    children = first.child_pids()
    try:
        with registered(make_backend(lab.url, lab.queue)):
            body = functools.partial(
                first_run_waits,
                log=str(runs),
                hold=0,
                release=str(lab.file("never")),
                timeout=DEADLINE,
            )
            future = in_thread(lambda: foreach(i=range(3), max_attempts=1).dopar(body))
            wait_until(lambda: events(runs, "start", 0), what="task 0 runs")
            first.kill()
            for pid in children:
                wait_until(
                    lambda pid=pid: gone(pid), timeout=10, what=f"worker {pid} exits"
                )
            with pool(1, lab.url, lab.queue, lab.dir):
                result = future.result(timeout=DEADLINE)
    finally:
        stop_pool(first)
    assert result == squares(3)
    assert len(events(runs, "start", 0)) == 2


def test_crash_looping_worker_does_not_starve_the_heartbeats_of_the_others(lab):
    """A task kills its worker again and again while another task runs long.

    Replacements for the dying worker come ever more slowly, but the
    supervisor never stops beating for the healthy worker meanwhile: the long
    task's alive key never lapses, and it runs once.
    """
    runs, deaths = lab.file("runs"), lab.file("deaths")
    q, r = lab.queue, lab.r
    with pool(2, lab.url, q, lab.dir), registered(make_backend(lab.url, q)):
        body = functools.partial(long_or_poison, runs=str(runs), deaths=str(deaths))
        future = in_thread(
            lambda: foreach(i=range(2), max_attempts=8, errorhandling="pass").dopar(
                body
            )
        )
        job = wait_until(lambda: job_ids(r, q), what="job registered")[0]
        wait_until(lambda: events(runs, "start", 0), what="the long task runs")
        lapses = 0
        while not events(runs, "done", 0):
            if not r.exists(f"{q}.alive.{job}.0") and not events(runs, "done", 0):
                lapses += 1
            time.sleep(0.02)
        result = future.result(timeout=DEADLINE)
    assert lapses == 0
    assert len(events(deaths, "died", 1)) == 8
    assert result[0] == 1000 and isinstance(result[1], WorkerLostError)
    assert len(events(runs, "start", 0)) == 1


def test_lost_task_is_found_while_another_job_keeps_the_queue_busy(lab):
    """A task taken by a live worker that never marked it (its TAKE reply was
    lost, say) is resubmitted once none of its job's tasks is queued, even
    though another job keeps the queue itself from ever being empty."""
    q, r = lab.queue, lab.r
    runs, other_runs = lab.file("runs"), lab.file("other")
    with registered(make_backend(lab.url, q)):
        body = functools.partial(logged_square, log=str(runs))
        future = in_thread(lambda: foreach(i=range(4)).dopar(body))
        job = wait_until(lambda: job_ids(r, q), what="job registered")[0]
        wait_until(lambda: queued_of(r, q, job) == 4, what="tasks queued")
        r.hset(f"{q}.worker.silent", mapping={"host": "elsewhere", "pid": 1})
        r.expire(f"{q}.worker.silent", 300)
        r.sadd(f"{q}.workers", "silent")
        assert r.lmove(q, f"{q}.proc.silent", "LEFT", "RIGHT")
        slow = functools.partial(logged_square, log=str(other_runs), sleep=0.5)
        other = in_thread(lambda: foreach(i=range(40)).dopar(slow))
        other_job = wait_until(
            lambda: [j for j in job_ids(r, q) if j != job], what="second job registered"
        )[0]
        wait_until(lambda: queued_of(r, q, other_job) == 40, what="its tasks queued")
        with pool(1, lab.url, q, lab.dir):
            result = future.result(timeout=DEADLINE)
            assert queued_of(r, q, other_job) > 0  # the queue was never empty
            remove_job(q, other_job, lab.url)
            with pytest.raises(JobCancelledError):
                other.result(timeout=DEADLINE)
    assert result == squares(4)
    assert len(events(runs, "done", 0)) == 1


# -- Redis that goes away -----------------------------------------------------------


def test_redis_restarts_empty_in_the_middle_of_a_job(lab):
    runs = lab.file("runs")
    before = lab.r.info("server")["run_id"]
    with (
        pool(2, lab.url, lab.queue, lab.dir),
        registered(make_backend(lab.url, lab.queue, reconnect_timeout=60)),
    ):
        body = functools.partial(logged_square, log=str(runs), sleep=0.3)
        future = in_thread(lambda: foreach(i=range(16)).dopar(body))
        wait_until(lambda: len(events(runs, "done")) >= 4, what="some results")
        lab.server.kill()
        time.sleep(0.5)  # the outage
        lab.server.restart()
        result = future.result(timeout=DEADLINE)
        assert lab.r.info("server")["run_id"] != before
        assert lab.r.exists(f"{lab.queue}.live")  # rewritten
    assert result == squares(16)


def test_workers_stay_when_redis_restarts_empty_between_jobs(lab):
    """The restarted server forgot the queue: the workers register again
    instead of taking it for removed and exiting after their linger time,
    and the next loop runs each task once."""
    q = lab.queue
    runs = lab.file("runs")
    with (
        pool(2, lab.url, q, lab.dir, linger=0.5, block=1.0) as workers,
        registered(make_backend(lab.url, q)),
    ):
        quick = functools.partial(sleeps_past_limit, slow=-1, seconds=0)
        assert foreach(i=range(4), combine=sum).dopar(quick) == 406
        pids = set(workers.child_pids())
        lab.server.kill()
        lab.server.restart()
        restarted = time.monotonic()
        wait_until(lambda: lab.r.exists(f"{q}.live"), what="the queue registered again")
        # Two rounds of 2 s tasks: past a fault check, which must not take
        # the job for one written before the restart and submit it again.
        body = functools.partial(logged_square, log=str(runs), sleep=2.0)
        assert foreach(i=range(4)).dopar(body) == squares(4)
        for i in range(4):
            assert len(events(runs, "start", i)) == 1, i
        # Longer than the linger time plus one wait for tasks: workers that
        # took their queue for removed would have exited by now.
        assert time.monotonic() - restarted > 0.5 + 1.0 + 2.0
        assert set(workers.child_pids()) == pids


def test_redis_gone_for_longer_than_reconnect_timeout(lab):
    runs = lab.file("runs")
    with (
        pool(1, lab.url, lab.queue, lab.dir),
        registered(make_backend(lab.url, lab.queue, reconnect_timeout=3)),
    ):
        body = functools.partial(logged_square, log=str(runs), sleep=0.5)
        future = in_thread(lambda: foreach(i=range(20)).dopar(body))
        wait_until(lambda: events(runs, "done"), what="a result")
        lab.server.kill()
        lost_at = time.monotonic()
        with pytest.raises(BackendUnavailableError) as info:
            future.result(timeout=DEADLINE)
        waited = time.monotonic() - lost_at
        lab.server.restart()  # so that the workers stop cleanly
    assert f"127.0.0.1:{lab.server.port}" in str(info.value)
    assert 3 <= waited < 20


# -- everything at once -------------------------------------------------------------


@pytest.mark.timeout(180)
def test_stress_masters_and_workers_killed_at_random(lab):
    """Three masters share four workers, which are killed at random meanwhile."""
    runs = lab.file("runs")
    masters, per_master = 3, 100
    kills: list[int] = []
    with (
        pool(4, lab.url, lab.queue, lab.dir) as workers,
        registered(make_backend(lab.url, lab.queue)),
    ):
        stop = threading.Event()

        def killer() -> None:
            # A kill every 20 finished tasks, at a random moment and of a
            # random worker among those that have run tasks (killing ones
            # still starting up tests nothing but patience).
            rng = random.Random(20)
            while len(kills) < 12 and not stop.wait(rng.uniform(0.05, 0.3)):
                done = events(runs, "done")
                if len(done) < 20 * (len(kills) + 1):
                    continue
                working = {int(line.split()[3]) for line in done}
                pids = sorted(working & set(workers.child_pids()))
                if pids:
                    victim = rng.choice(pids)
                    try:
                        os.kill(victim, signal.SIGKILL)
                        kills.append(victim)
                    except ProcessLookupError:
                        pass

        def master(k: int) -> list[int]:
            body = functools.partial(stress_body, k=k, log=str(runs))
            return foreach(i=range(per_master), max_attempts=20).dopar(body)

        threading.Thread(target=killer, daemon=True).start()
        try:
            futures = [in_thread(functools.partial(master, k)) for k in range(masters)]
            results = [f.result(timeout=150) for f in futures]
        finally:
            stop.set()
    for k, result in enumerate(results):
        assert result == [k * 1000 + i for i in range(per_master)]
    assert len(kills) >= 10
    done = {tuple(line.split()[1:3]) for line in events(runs, "done")}
    assert len(done) == masters * per_master


# -- waiting for a long time ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_idle_worker_then_a_task_of_over_a_minute(lab):
    """Workers idle in one 10 s blocking wait, then a 61 s task: both sides
    wait it out, the start key outlives its TTL, and the task runs once (the
    second worker would run it again if the master took it for lost)."""
    runs = lab.file("runs")
    with (
        pool(2, lab.url, lab.queue, lab.dir, block=60.0),
        registered(make_backend(lab.url, lab.queue)),
    ):
        time.sleep(10)  # idle: the workers sit in one blocking wait
        body = functools.partial(long_task, seconds=61, log=str(runs))
        started = time.monotonic()
        result = foreach(i=range(1)).dopar(body)
        assert time.monotonic() - started >= 61
    assert result == [1000]
    assert len(events(runs, "start", 0)) == 1
