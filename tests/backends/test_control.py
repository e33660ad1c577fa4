"""Job control on the Redis backend: jobs, tasks, workers, remove_job, remove_queue.

Every test runs real workers against a private redis-server and checks that
the reports match what the test itself launched. Loop bodies wait on a gate
file, so the test decides when tasks finish; nothing depends on timing.
"""

# Tests take the imported `server` fixture as a parameter of that name.
# ruff: noqa: F811

from __future__ import annotations

import getpass
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redis_support import (  # noqa: F401  (server: fixture)
    DEADLINE,
    Background,
    registered,
    server,
    wait_until,
    worker_pool,
)

from pforeach import (
    BackendUnavailableError,
    JobCancelledError,
    OptionError,
    foreach,
)
from pforeach.backends.redis import (
    LocalWorkers,
    RedisBackend,
    jobs,
    queue_status,
    queues,
    remove_job,
    remove_queue,
    start_local_workers,
    tasks,
    workers,
)
from pforeach.backends.redis.server import RedisServer, free_port

pytestmark = pytest.mark.timeout(90)

QUEUE = "ctl"


class Gate:
    """A file that says how many iterations may finish (iterations 0..n-1)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.open_to(0)

    def open_to(self, n: int) -> None:
        tmp = self.path + ".tmp"
        Path(tmp).write_text(str(n))
        os.replace(tmp, self.path)  # atomic: a reader never sees an empty file

    def body(self) -> Callable[[int], int]:
        path = self.path

        def body(i: int) -> int:
            import time
            from pathlib import Path

            deadline = time.monotonic() + 60
            while int(Path(path).read_text()) <= i:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"iteration {i}: the gate never opened")
                time.sleep(0.02)
            return i * i

        return body


@pytest.fixture(scope="module")
def pool(server: RedisServer) -> Iterator[LocalWorkers]:
    """Two workers on QUEUE for the whole module."""
    with worker_pool(2, QUEUE, server.url, alive_ttl=2) as started:
        yield started


@pytest.fixture
def backend(server: RedisServer, pool: LocalWorkers) -> Iterator[RedisBackend]:
    with registered(
        RedisBackend(QUEUE, server.url, ftinterval=3, key_ttl=10)
    ) as instance:
        yield instance


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Gate]:
    opened = Gate(tmp_path / "gate")
    yield opened
    opened.open_to(10**9)  # never leave a worker stuck in a body


def test_reports_match_a_running_job(
    server: RedisServer, pool: LocalWorkers, backend: RedisBackend, gate: Gate
) -> None:
    url = server.url
    # A worker's count of finished tasks travels with its heartbeat, as does
    # its "idle": once both say idle, the counts are current.
    idle = wait_until(
        lambda: workers(QUEUE, url),
        "2 idle workers",
        ok=lambda found: len(found) == 2 and all(w.job_id is None for w in found),
    )
    done_before = sum(w.tasks_done for w in idle)
    submitted_after = time.time()
    loop = Background(
        lambda: foreach(i=range(10), combine=sum).chunksize(2).dopar(gate.body())
    )

    # 5 tasks of 2 iterations; 2 workers each take one and wait at the gate.
    (job,) = wait_until(
        lambda: jobs(QUEUE, url),
        "2 running and 3 queued tasks",
        ok=lambda found: (
            len(found) == 1
            and (found[0].tasks_running, found[0].tasks_queued, found[0].tasks_total)
            == (2, 3, 5)
        ),
    )
    assert job.queue == QUEUE
    assert job.user == getpass.getuser()
    assert job.host == socket.gethostname()
    assert job.address == "127.0.0.1"
    assert job.pid == os.getpid()
    assert submitted_after <= job.submitted <= time.time()
    assert job.iterations_total == 10
    assert (job.tasks_submitted, job.tasks_done, job.iterations_done) == (5, 0, 0)

    running = tasks(QUEUE, url)
    child_pids = set(pool.child_pids())
    assert [(t.task_id, t.iterations) for t in running] == [(0, "0-1"), (1, "2-3")]
    for task in running:
        assert task.job_id == job.job_id
        assert (task.user, task.master_host) == (job.user, job.host)
        assert task.worker_host == socket.gethostname()
        assert task.attempt == 1
        assert task.started is not None and task.started >= submitted_after - 1
        assert task.heartbeat is not None
        assert task.expires_in is not None and 0 < task.expires_in <= 2
    assert {t.worker_pid for t in running} == child_pids
    assert len({t.worker_id for t in running}) == 2

    # Heartbeats carry what a worker runs, so wait for both to report it.
    live = wait_until(
        lambda: workers(QUEUE, url),
        "both workers to report their task",
        ok=lambda found: (
            sorted(w.task_id for w in found if w.job_id == job.job_id) == [0, 1]
        ),
    )
    assert {w.pid for w in live} == child_pids
    for worker in live:
        assert worker.queues == (QUEUE,)
        assert worker.host == socket.gethostname()
        assert worker.iterations == ("0-1" if worker.task_id == 0 else "2-3")
        assert worker.since is not None and worker.heartbeat is not None
    assert {(w.worker_id, w.task_id) for w in live} == {
        (t.worker_id, t.task_id) for t in running
    }

    # Let the first two tasks finish: the next two start, one stays queued.
    gate.open_to(4)
    (job,) = wait_until(
        lambda: jobs(QUEUE, url),
        "2 done, 2 running, 1 queued",
        ok=lambda found: (
            len(found) == 1
            and (found[0].tasks_done, found[0].tasks_running, found[0].tasks_queued)
            == (2, 2, 1)
        ),
    )
    assert job.iterations_done == 4
    assert sorted(t.task_id for t in tasks(QUEUE, url)) == [2, 3]

    gate.open_to(10)
    assert loop.value() == sum(i * i for i in range(10))
    status = wait_until(
        lambda: queue_status(QUEUE, url),
        "the job to end and both workers to count its tasks",
        ok=lambda s: (
            not s.jobs
            and not s.tasks
            and sum(w.tasks_done for w in s.workers) == done_before + 5
        ),
    )
    assert status.length == 0
    assert all(w.job_id is None for w in status.workers)


def test_remove_job_cancels_it(
    server: RedisServer, backend: RedisBackend, gate: Gate
) -> None:
    url = server.url
    loop = Background(lambda: foreach(i=range(6)).dopar(gate.body()))
    (job,) = wait_until(
        lambda: jobs(QUEUE, url),
        "2 running tasks",
        ok=lambda found: len(found) == 1 and found[0].tasks_running == 2,
    )
    assert job.tasks_queued == 4

    assert remove_job(QUEUE, job.job_id, url) == 4
    with pytest.raises(JobCancelledError, match=job.job_id):
        loop.value()
    assert jobs(QUEUE, url) == []

    # The two running bodies finish; their results go nowhere.
    gate.open_to(10)
    wait_until(
        lambda: tasks(QUEUE, url), "no running task", ok=lambda found: found == []
    )
    with pytest.raises(OptionError) as caught:
        remove_job(QUEUE, job.job_id, url)
    assert job.job_id in str(caught.value) and repr(QUEUE) in str(caught.value)


def test_unknown_names_and_unreachable_server(
    server: RedisServer, pool: LocalWorkers
) -> None:
    url = server.url
    for call in (jobs, tasks, workers, remove_queue):
        with pytest.raises(
            OptionError, match=r"no queue 'nosuch'.*queues there: .*ctl"
        ):
            call("nosuch", url)
    with pytest.raises(OptionError, match="no queue 'nosuch'"):
        remove_job("nosuch", "abc", url)
    with pytest.raises(OptionError, match="no job 'abc' on queue 'ctl'"):
        remove_job(QUEUE, "abc", url)
    with pytest.raises(OptionError, match="invalid queue name"):
        jobs("bad.name", url)

    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(
        BackendUnavailableError, match=re.escape(f"cannot reach Redis at {nowhere}")
    ):
        workers(QUEUE, nowhere)
    assert QUEUE in queues(url)


def test_job_ids_of_dead_masters_are_dropped(
    server: RedisServer, pool: LocalWorkers
) -> None:
    # A master that died leaves its id in the set of jobs after its record
    # expired; reports skip it and prune it.
    client = server.client()
    client.sadd(f"{QUEUE}.jobs", "0123abcd")
    assert jobs(QUEUE, server.url) == []
    assert not client.sismember(f"{QUEUE}.jobs", "0123abcd")
    client.close()


def test_dead_worker_leaves_the_list(server: RedisServer, pool: LocalWorkers) -> None:
    # A worker without a supervisor, killed: nobody unregisters it, so only
    # the expiry of its heartbeat can take it off the list.
    code = (
        "from pforeach.backends.redis import run_worker; "
        f"run_worker({QUEUE!r}, {server.url!r}, alive_ttl=1, linger=1)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        wait_until(
            lambda: {w.pid for w in workers(QUEUE, server.url)},
            "the new worker to register",
            ok=lambda pids: proc.pid in pids,
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    remaining = wait_until(
        lambda: {w.pid for w in workers(QUEUE, server.url)},
        "the killed worker to drop out",
        ok=lambda pids: proc.pid not in pids,
    )
    assert remaining == set(pool.child_pids())


def test_remove_queue_deletes_it_and_its_workers_leave(server: RedisServer) -> None:
    name = "ctl-gone"
    pool = start_local_workers(1, name, server.url, alive_ttl=1, linger=0.5, block=0.5)
    try:
        pool.wait_ready(DEADLINE)
        assert len(workers(name, server.url)) == 1
        assert remove_queue(name, server.url) > 0
        # The worker notices, lingers, unregisters and exits with its supervisor.
        wait_until(lambda: pool.proc.poll(), "exit", ok=lambda code: code is not None)
        assert pool.proc.returncode == 0
        with pytest.raises(OptionError, match="no queue 'ctl-gone'"):
            queue_status(name, server.url)
        assert name not in queues(server.url)
        client = server.client()
        assert client.keys(f"{name}*") == []
        client.close()
    finally:
        pool.stop()
