"""Cancelling Redis jobs, and the keys a job leaves behind however it ends.

Ctrl+C in a master, ``remove_job`` from another process, a master killed
outright, a loop that completes and one that fails: afterwards no key of the
job outlives the stated TTLs (docs/failures.md), and the same workers serve
the next job.
"""

from __future__ import annotations

import functools
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fault_bodies import fails_on, logged_square
from fault_support import (
    DEADLINE,
    ENV_TTL,
    KEY_TTL,
    env_keys,
    events,
    in_thread,
    job_ids,
    job_keys,
    make_backend,
    make_lab,
    master_process,
    pool,
    queued_of,
    registered,
    wait_until,
)

from pforeach import IterationError, JobCancelledError, foreach

pytestmark = pytest.mark.timeout(120)

#: The master's command-line options of fault_master.py.
MASTER_OPTIONS = ("ftinterval=3", f"key_ttl={KEY_TTL:g}", f"env_ttl={ENV_TTL:g}")

#: Slack for a loaded machine on top of a stated TTL.
SLACK = 4.0


@pytest.fixture
def lab(fresh_redis, tmp_path, request, monkeypatch):
    yield from make_lab(fresh_redis, tmp_path, request, monkeypatch)


def squares(n: int) -> list[int]:
    return [i * i for i in range(n)]


def assert_env_keys_bounded(lab) -> None:
    """The shared environment key may stay, but no longer than env_ttl."""
    for key in env_keys(lab.r, lab.queue):
        assert 0 < lab.r.ttl(key) <= ENV_TTL, key


def wait_running_tasks_end(runs: Path) -> None:
    wait_until(
        lambda: len(events(runs, "done")) == len(events(runs, "start")),
        what="running tasks end",
    )


def test_ctrl_c_in_a_master_process(lab):
    """SIGINT: the master exits within 2 s with KeyboardInterrupt, its queued
    tasks are removed at once, running ones finish without leaving results,
    and the workers serve the next job."""
    q, r = lab.queue, lab.r
    runs, out = lab.file("runs"), lab.file("master.out")
    with pool(2, lab.url, q, lab.dir):
        master = master_process(lab.url, q, runs, out, "30", "1.0", *MASTER_OPTIONS)
        try:
            job = wait_until(lambda: job_ids(r, q), what="job registered")[0]
            wait_until(lambda: len(events(runs, "start")) >= 2, what="two tasks run")
            assert queued_of(r, q, job) > 0
            sent = time.monotonic()
            master.send_signal(signal.SIGINT)
            master.wait(timeout=DEADLINE)
            took = time.monotonic() - sent
        finally:
            if master.poll() is None:
                master.kill()
        output = out.read_text()
        assert took < 2.0, output
        assert master.returncode == 130, output
        assert "INTERRUPTED" in output
        # At once: nothing of the job is queued, its record is gone.
        assert queued_of(r, q, job) == 0
        assert job not in job_ids(r, q)
        assert not r.exists(f"{q}.job.{job}")
        # The running tasks finish; what they push is dropped, not kept.
        wait_running_tasks_end(runs)
        wait_until(
            lambda: not job_keys(r, q, job),
            timeout=KEY_TTL + SLACK,
            what="the job's keys expire",
        )
        assert_env_keys_bounded(lab)
        with registered(make_backend(lab.url, q)):
            body = functools.partial(logged_square, log=str(lab.file("next")))
            assert foreach(i=range(6), combine=sum).dopar(body) == 55


def test_ctrl_c_in_this_process_then_the_next_loop_works(lab):
    """KeyboardInterrupt reaches the caller within 2 s; the same backend (and
    its connections) runs the next loop without being registered again."""
    q, r = lab.queue, lab.r
    runs = lab.file("runs")
    sent: list[float] = []
    found: list[str] = []

    def interrupt() -> None:
        found.extend(wait_until(lambda: job_ids(r, q), what="job registered"))
        wait_until(lambda: len(events(runs, "start")) >= 2, what="two tasks run")
        sent.append(time.monotonic())
        # What Ctrl+C does in a terminal, aimed at the thread running the loop.
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    with pool(2, lab.url, q, lab.dir), registered(make_backend(lab.url, q)):
        body = functools.partial(logged_square, log=str(runs), sleep=1.0)
        threading.Thread(target=interrupt, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            foreach(i=range(30)).dopar(body)
        took = time.monotonic() - sent[0]
        assert took < 2.0
        job = found[0]
        assert queued_of(r, q, job) == 0
        assert not r.exists(f"{q}.job.{job}")
        quick = functools.partial(logged_square, log=str(lab.file("next")))
        assert foreach(i=range(5), combine=sum).dopar(quick) == 30
        assert foreach(i=range(3)).dopar(quick) == squares(3)
    wait_running_tasks_end(runs)
    wait_until(
        lambda: not job_keys(r, q, job),
        timeout=KEY_TTL + SLACK,
        what="the job's keys expire",
    )


def test_remove_job_from_another_process(lab):
    q, r = lab.queue, lab.r
    runs = lab.file("runs")
    with pool(2, lab.url, q, lab.dir), registered(make_backend(lab.url, q)):
        body = functools.partial(logged_square, log=str(runs), sleep=1.0)
        future = in_thread(lambda: foreach(i=range(30)).dopar(body))
        job = wait_until(lambda: job_ids(r, q), what="job registered")[0]
        wait_until(lambda: len(events(runs, "start")) >= 2, what="two tasks run")
        remover = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pforeach.backends.redis import remove_job; "
                "print(remove_job(sys.argv[1], sys.argv[2], sys.argv[3]))",
                q,
                job,
                lab.url,
            ],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
        assert remover.returncode == 0, remover.stderr
        assert int(remover.stdout) > 0  # queued tasks removed
        with pytest.raises(JobCancelledError, match=job):
            future.result(timeout=DEADLINE)
        assert queued_of(r, q, job) == 0
        wait_running_tasks_end(runs)
        # The same workers serve the next job.
        quick = functools.partial(logged_square, log=str(lab.file("next")))
        assert foreach(i=range(6)).dopar(quick) == squares(6)
    wait_until(
        lambda: not job_keys(r, q, job),
        timeout=KEY_TTL + SLACK,
        what="the job's keys expire",
    )


def test_keys_of_a_killed_master_expire(lab):
    """A master killed outright (SIGKILL) cleans nothing up: its keys expire
    within key_ttl, and workers drop the tasks it left queued once they do."""
    q, r = lab.queue, lab.r
    runs, out = lab.file("runs"), lab.file("master.out")
    with pool(2, lab.url, q, lab.dir):
        master = master_process(lab.url, q, runs, out, "60", "0.5", *MASTER_OPTIONS)
        job = wait_until(lambda: job_ids(r, q), what="job registered")[0]
        wait_until(lambda: len(events(runs, "start")) >= 2, what="two tasks run")
        master.kill()
        master.wait()
        killed = time.monotonic()
        wait_until(
            lambda: not job_keys(r, q, job) and queued_of(r, q, job) == 0,
            timeout=KEY_TTL + 1.0 + SLACK,
            what="the job's keys and tasks go",
        )
        gone_after = time.monotonic() - killed
        assert_env_keys_bounded(lab)
        ran = len(events(runs, "start"))
    # Tasks ran until the job's record expired, not all 60 of them (30 s' worth).
    assert ran < 60
    assert gone_after <= KEY_TTL + 1.0 + SLACK


def test_no_job_keys_remain_after_a_loop_completes_or_fails(lab, caplog):
    caplog.set_level(logging.INFO, logger="pforeach.backends.redis.master")
    q, r = lab.queue, lab.r
    runs = lab.file("runs")
    with pool(2, lab.url, q, lab.dir), registered(make_backend(lab.url, q)):
        body = functools.partial(logged_square, log=str(runs))
        assert foreach(i=range(8)).dopar(body) == squares(8)
        [done_job] = re.findall(r"job (\w+): submitting", caplog.text)
        assert job_keys(r, q, done_job) == []  # at once
        failing = functools.partial(fails_on, bad=1, log=str(runs), sleep=1.0)
        with pytest.raises(IterationError, match="iteration 1 is bad"):
            foreach(i=range(12)).dopar(failing)
        failed_job = re.findall(r"job (\w+): submitting", caplog.text)[-1]
        assert failed_job != done_job
        assert queued_of(r, q, failed_job) == 0
        wait_running_tasks_end(runs)
        wait_until(
            lambda: not job_keys(r, q, failed_job),
            timeout=KEY_TTL + SLACK,
            what="the failed job's keys go",
        )
        assert job_ids(r, q) == []
        assert_env_keys_bounded(lab)
