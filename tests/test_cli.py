"""The command-line tools against a real redis-server and real workers.

``pforeach`` commands run in-process through click's CliRunner; one test
starts ``pforeach-worker start`` as a real process.
"""

# Tests take the imported `server` fixture as a parameter of that name.
# ruff: noqa: F811

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from redis_support import (  # noqa: F401  (server: fixture)
    DEADLINE,
    server,
    wait_until,
    worker_pool,
)

from pforeach import (
    JobCancelledError,
    OptionError,
    foreach,
    register_backend,
    registered_backend,
)
from pforeach.backends.redis import (
    LocalWorkers,
    RedisBackend,
    jobs,
    start_local_workers,
    workers,
)
from pforeach.backends.redis.server import RedisServer, free_port
from pforeach.cli import main, worker_group

pytestmark = pytest.mark.timeout(90)

QUEUE = "cli"


def run(*args: str, input: str | None = None) -> Result:
    """Runs ``pforeach ARGS`` in-process."""
    return CliRunner().invoke(main, list(args), input=input)


def run_json(*args: str) -> Any:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def live_workers(queue: str, url: str) -> int:
    """How many workers serve ``queue``; 0 while the queue does not exist yet."""
    try:
        return len(workers(queue, url))
    except OptionError:
        return 0


@pytest.fixture(scope="module")
def pool(server: RedisServer) -> Iterator[LocalWorkers]:
    with worker_pool(2, QUEUE, server.url, alive_ttl=2) as started:
        yield started


class BlockedJob:
    """A loop of 6 one-iteration tasks whose bodies wait until released."""

    def __init__(self, url: str, gate: Path) -> None:
        self.gate = gate
        gate.write_text("wait")
        path = str(gate)

        def body(i: int) -> int:
            import time
            from pathlib import Path

            deadline = time.monotonic() + 60
            while Path(path).read_text() == "wait" and time.monotonic() < deadline:
                time.sleep(0.02)
            return i

        self.backend = RedisBackend(QUEUE, url, ftinterval=3, key_ttl=10)
        self.error: BaseException | None = None
        self.value: Any = None
        previous = registered_backend()
        register_backend(self.backend)
        try:
            self.thread = threading.Thread(target=self._run, args=(body,), daemon=True)
            self.thread.start()
        finally:
            # The thread has what it needs once dopar picked the backend up;
            # restoring the registration is left to close().
            self.previous = previous
        self.job = wait_until(
            lambda: jobs(QUEUE, url),
            "the job's first two tasks to start",
            ok=lambda found: (
                len(found) == 1
                and (found[0].tasks_running, found[0].tasks_total) == (2, 6)
            ),
        )[0]

    def _run(self, body: Callable[[int], int]) -> None:
        try:
            self.value = foreach(i=range(6)).dopar(body)
        except BaseException as exc:
            self.error = exc

    def close(self) -> None:
        self.gate.write_text("go")
        self.thread.join(DEADLINE)
        register_backend(self.previous)
        self.backend.close()


@pytest.fixture
def blocked(
    server: RedisServer, pool: LocalWorkers, tmp_path: Path
) -> Iterator[BlockedJob]:
    job = BlockedJob(server.url, tmp_path / "gate")
    try:
        yield job
    finally:
        job.close()


def test_every_command_has_help_with_an_example() -> None:
    runner = CliRunner()
    for name in [*main.commands, None]:
        args = [name, "--help"] if name else ["--help"]
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
        assert "Example" in result.output, name
    result = runner.invoke(worker_group, ["--help"])
    assert result.exit_code == 0 and "Example" in result.output
    result = runner.invoke(worker_group, ["start", "--help"])
    assert result.exit_code == 0
    assert "pforeach-worker start -n 4" in result.output
    for option in ("--log", "--loglevel", "--queue", "--url", "--connect-timeout"):
        assert option in result.output


def test_listings_of_a_running_job(
    server: RedisServer, pool: LocalWorkers, blocked: BlockedJob
) -> None:
    url = server.url
    job_id = blocked.job.job_id

    (job,) = run_json("jobs", "--queue", QUEUE, "--url", url)
    assert job["job_id"] == job_id
    assert (job["tasks_total"], job["tasks_running"], job["tasks_queued"]) == (6, 2, 4)
    assert job["iterations_total"] == 6 and job["pid"] == os.getpid()

    running = run_json("tasks", "--queue", QUEUE, "--url", url)
    assert sorted((t["task_id"], t["iterations"]) for t in running) == [
        (0, "0"),
        (1, "1"),
    ]
    assert {t["worker_pid"] for t in running} == set(pool.child_pids())

    live = run_json("workers", "--queue", QUEUE, "--url", url)
    assert {w["pid"] for w in live} == set(pool.child_pids())
    assert all(w["queues"] == [QUEUE] for w in live)

    summary = run_json("queues", "--url", url)
    assert {
        "queue": QUEUE,
        "workers": 2,
        "jobs": 1,
        "queued": 4,
        "running": 2,
    } in summary

    table = run("jobs", "-q", QUEUE, "--url", url)
    assert table.exit_code == 0
    header, row = table.stdout.splitlines()
    assert header.split()[:3] == ["JOB", "USER", "MASTER"]
    assert row.startswith(job_id) and "6/6" not in row and "0/6 (0%)" in row

    table = run("workers", "-q", QUEUE, "--url", url)
    lines = table.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith("WORKER")
    for pid in pool.child_pids():
        assert any(f" {pid} " in line for line in lines[1:])

    table = run("tasks", "-q", QUEUE, "--url", url)
    assert len(table.stdout.splitlines()) == 3 and job_id in table.stdout


def test_top_renders_frames(server: RedisServer, blocked: BlockedJob) -> None:
    result = run("top", "-q", QUEUE, "--url", server.url, "--frames", "2", "-i", "0.1")
    assert result.exit_code == 0, result.output
    # Without a terminal, frames follow each other, a blank line apart.
    frames = re.split(r"\n\n(?=pforeach top - )", result.stdout)
    assert len(frames) == 2
    assert all(
        f.startswith(f"pforeach top - queue cli at {server.url} - ") for f in frames
    )
    assert "workers: 2 live, 2 busy, 0 idle" in result.stdout
    assert blocked.job.job_id in frames[0]
    assert re.search(r"\[\.{20}\]\s+0%\s+0/6", frames[0])
    assert "4/2/0" in frames[0]  # queued/running/done tasks


def test_remove_job_asks_before_removing(
    server: RedisServer, blocked: BlockedJob
) -> None:
    url, job_id = server.url, blocked.job.job_id

    refused = run("remove-job", QUEUE, job_id, "--url", url, input="n\n")
    assert refused.exit_code == 1 and "Aborted" in refused.output
    assert f"Remove job {job_id} of " in refused.output
    assert [j.job_id for j in jobs(QUEUE, url)] == [job_id]

    handlers = list(logging.getLogger("pforeach").handlers)
    accepted = run(
        "--loglevel", "INFO", "remove-job", QUEUE, job_id, "--url", url, input="y\n"
    )
    assert accepted.exit_code == 0, accepted.output
    assert f"removed job {job_id} from queue {QUEUE} (4 queued task(s) dropped)" in (
        accepted.stdout
    )
    # --loglevel shows pforeach's log, and only while the command runs.
    assert f"pforeach INFO queue {QUEUE}: job {job_id} removed" in accepted.stderr
    assert logging.getLogger("pforeach").handlers == handlers
    assert jobs(QUEUE, url) == []
    blocked.thread.join(DEADLINE)
    assert isinstance(blocked.error, JobCancelledError)

    again = run("remove-job", QUEUE, job_id, "--url", url, "--yes")
    assert again.exit_code == 1
    assert again.stderr == (
        f"Error: no job '{job_id}' on queue '{QUEUE}' at {url}; it has no jobs\n"
    )


def test_remove_queue(server: RedisServer) -> None:
    name = "cli-gone"
    pool = start_local_workers(1, name, server.url, alive_ttl=1, linger=0.5, block=0.5)
    try:
        pool.wait_ready(DEADLINE)
        refused = run("remove-queue", name, "--url", server.url, input="n\n")
        assert refused.exit_code == 1
        assert f"Remove queue {name} at {server.url} (1 live worker(s), 0 job(s)" in (
            refused.output
        )
        assert len(workers(name, server.url)) == 1

        removed = run("remove-queue", name, "--url", server.url, "--yes")
        assert removed.exit_code == 0, removed.output
        assert re.fullmatch(
            rf"removed queue {name} \(\d+ keys deleted\)\n", removed.stdout
        )
        wait_until(lambda: pool.proc.poll(), "exit", ok=lambda code: code is not None)
        gone = run("jobs", "-q", name, "--url", server.url)
        assert gone.exit_code == 1
        assert f"Error: no queue '{name}' at {server.url}" in gone.stderr
    finally:
        pool.stop()


@pytest.mark.parametrize(
    "args",
    [
        ["jobs"],
        ["tasks", "--json"],
        ["workers"],
        ["queues"],
        ["top", "--frames", "1"],
        ["remove-job", QUEUE, "abc"],
        ["remove-queue", QUEUE],
    ],
)
def test_unreachable_redis_is_one_line(args: list[str]) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    result = run(*args, "--url", url, "--connect-timeout", "1")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"Error: cannot reach Redis at {url}: ")
    assert result.stderr.count("\n") == 1


def test_unknown_queue_is_one_line(server: RedisServer, pool: LocalWorkers) -> None:
    for args in (
        ["jobs", "-q", "nosuch"],
        ["top", "-q", "nosuch"],
        ["remove-queue", "nosuch"],
    ):
        result = run(*args, "--url", server.url)
        assert result.exit_code == 1
        assert result.stderr.startswith(f"Error: no queue 'nosuch' at {server.url}; ")
        assert QUEUE in result.stderr and result.stderr.count("\n") == 1


def test_a_server_that_is_not_redis() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        url = f"redis://127.0.0.1:{listener.getsockname()[1]}/0"

        def answer() -> None:
            try:
                while True:
                    conn, _ = listener.accept()
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                    conn.close()
            except OSError:
                return  # the listener was closed: the test is over

        threading.Thread(target=answer, daemon=True).start()
        listing = run("workers", "--url", url)
        starting = CliRunner().invoke(worker_group, ["start", "--url", url])
    for result in (listing, starting):
        assert result.exit_code == 1
        assert result.stderr.startswith(f"Error: Redis at {url} failed: ")
        assert result.stderr.count("\n") == 1


def test_worker_start_fails_fast_without_redis() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    result = CliRunner().invoke(worker_group, ["start", "--url", url])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: cannot reach Redis at {url}: ")
    bad = CliRunner().invoke(worker_group, ["start", "-q", "a.b", "--url", url])
    assert bad.exit_code == 1 and "invalid queue name 'a.b'" in bad.stderr


def test_worker_start_says_where_it_serves(server: RedisServer, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    command = [
        sys.executable, "-c", "from pforeach.cli import worker_main; worker_main()",
        "start", "-n", "1", "-q", "cli-start", "--url", server.url,
        "--log", str(log), "--loglevel", "DEBUG",
    ]  # fmt: skip
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        assert first == (
            f"pforeach-worker: connected to {server.url}; 1 worker(s) serving cli-start; "
            f"logging to {log}\n"
        )
        wait_until(
            lambda: live_workers("cli-start", server.url),
            "a worker",
            ok=lambda n: n == 1,
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(DEADLINE)
    assert code == 0
    text = log.read_text()
    assert re.search(
        r"INFO pforeach-worker\[\d+\] worker \S+: serving cli-start at ", text
    )
    assert "supervisor" in text and "stopped" in text
