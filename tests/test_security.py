"""Signed payloads and bad input, against a real redis-server and real workers.

What is tested here is what docs/security.md promises:

* with a shared secret, every payload (job environment, task, result) is
  checked before a byte of it is unpickled; one that fails is logged, never
  run, and the loop still finishes;
* a payload signed for one job or task does not pass for another;
* without a secret pforeach works as before and warns once per address
  when Redis is not on this machine;
* garbage, truncated, future-format and oversized items, and keys of the
  wrong type, are logged and skipped by workers that go on serving;
* mistakes of the user (no Redis, a bad queue name, a secret that differs
  between master and workers) fail at once with an error that says so.
"""

# Tests take the imported `server` and `r` fixtures as parameters of those names.
# ruff: noqa: F811

from __future__ import annotations

import os
import pathlib
import pickle
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis_support import (  # noqa: F401  (r, server: fixtures)
    BACKEND_OPTIONS,
    DEADLINE,
    WORKER_OPTIONS,
    importable_tests,
    r,
    registered,
    server,
    text_of,
    wait_until,
    worker_pool,
)

from pforeach import (
    BackendUnavailableError,
    OptionError,
    foreach,
    serialize,
)
from pforeach.backends.redis import RedisBackend, start_local_workers
from pforeach.backends.redis.backend import ENV_SECRET, warn_if_exposed
from pforeach.backends.redis.client import ConnectionSpec
from pforeach.backends.redis.keys import (
    RESULT_TAG,
    Keys,
    TaskHeader,
    encode_outcome,
    result_message,
)
from pforeach.backends.redis.server import RedisServer, free_port
from pforeach.backends.redis.worker import make_config
from pforeach.errors import PayloadError, SerializationError
from pforeach.job import Task, TaskResult

pytestmark = pytest.mark.timeout(120)

QUEUE = "secq"
KEYS = Keys(QUEUE)
SECRET = b"the shared secret of this module"


# -- helpers -------------------------------------------------------------------------


def task_message(
    job: str,
    task_id: int,
    payload: bytes,
    secret: bytes | None,
    env_hash: str = "ab" * 16,
    sign_as: tuple[str, int] | None = None,
) -> bytes:
    """A task message as a master makes it; ``sign_as`` signs it for another
    (job, task) than the one its header names, as a copied payload would be."""
    header = TaskHeader(job, task_id, env_hash, 3, None, 7, None, str(task_id)).encode()
    signed_job, signed_task = sign_as or (job, task_id)
    signed_header = TaskHeader(
        signed_job, signed_task, env_hash, 3, None, 7, None, str(signed_task)
    ).encode()
    identity = KEYS.identity("task", signed_job, signed_task, signed_header.decode())
    return header + b"=" + serialize.seal(payload, identity, secret)


class Trap:
    """Creates a file when unpickled: stands for an attacker's payload."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def plant_bad_results(
    i: int, url: str, queue: str = QUEUE, secret: bytes = SECRET
) -> int:
    """Loop body: before its own result, pushes a forged one for its task.

    Runs on a worker; the forged result reaches the master first, since both
    go to the end of the same list.
    """
    r = redis.Redis.from_url(url)
    keys = Keys(queue)
    try:
        (job,) = [j.decode() for j in r.smembers(keys.jobs)]
        if r.set(f"{queue}.planted.{job}.{i}", 1, nx=True, ex=60):
            value = encode_outcome("ok", TaskResult(i, [(i, "forged")], size=1))
            forged = [
                serialize.seal(
                    value, keys.identity("result", job, i), b"another secret"
                ),
                serialize.seal(value, keys.identity("result", job, i + 1), secret),
                serialize.seal(value, keys.identity("result", "f" * 20, i), secret),
                serialize.seal(value, keys.identity("result", job, i), None),
                b"PF\x01\x01" + b"\x00" * 10,
            ][i % 5]
            message = result_message(RESULT_TAG, job, i, "intruder", b"=" + forged)
            r.rpush(keys.out(job), message)
    finally:
        r.close()
    return i * 10


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("workers") / "workers.log"


@pytest.fixture(scope="module")
def pool(server: RedisServer, log_path: Path) -> Iterator[Any]:
    """Two workers with the module's secret, logging to ``log_path``."""
    with worker_pool(
        2, QUEUE, server.url, secret=SECRET, log_file=str(log_path), log_level="INFO"
    ) as workers:
        yield workers


@pytest.fixture
def master(server: RedisServer, pool: Any) -> Iterator[RedisBackend]:
    with registered(
        RedisBackend(QUEUE, server.url, secret=SECRET, **BACKEND_OPTIONS)
    ) as b:
        yield b


# -- the envelope ------------------------------------------------------------------------


def test_a_sealed_payload_round_trips_only_to_its_own_identity():
    sealed = serialize.seal(b"payload", "q/task/j1/0", b"k")
    assert bytes(serialize.unseal(sealed, "q/task/j1/0", b"k")) == b"payload"
    for identity, secret, reason in [
        ("q/task/j1/1", b"k", "signature check failed"),  # another task
        ("q/task/j2/0", b"k", "signature check failed"),  # another job
        ("r/task/j1/0", b"k", "signature check failed"),  # another queue
        ("q/task/j1/0", b"other", "signature check failed"),  # another secret
        ("q/task/j1/0", None, "no secret is configured here"),
    ]:
        with pytest.raises(PayloadError, match=reason):
            serialize.unseal(sealed, identity, secret)
    unsigned = serialize.seal(b"payload", "q/task/j1/0", None)
    with pytest.raises(PayloadError, match="not signed; a secret is required"):
        serialize.unseal(unsigned, "q/task/j1/0", b"k")
    assert bytes(serialize.unseal(unsigned, "q/task/j1/0", None)) == b"payload"


def test_every_byte_of_a_signed_payload_is_covered():
    sealed = serialize.seal(b"some payload", "q/result/j/3", b"k")
    for position in range(len(sealed)):
        damaged = bytearray(sealed)
        damaged[position] ^= 0x01
        with pytest.raises(PayloadError):
            serialize.unseal(bytes(damaged), "q/result/j/3", b"k")
    for cut in range(len(sealed)):
        with pytest.raises(PayloadError):
            serialize.unseal(sealed[:cut], "q/result/j/3", b"k")


def test_a_replayed_genuine_task_passes_the_check():
    # What the secret does not do: a genuine message pushed again is genuine.
    from pforeach.backends.redis.worker import decode_task

    message = task_message("j1", 0, serialize.dumps(Task(0, [(0, {"x": 1})])), SECRET)
    first = decode_task(message, KEYS, SECRET, {}.get)
    assert decode_task(message, KEYS, SECRET, {}.get) == first


def test_a_payload_of_a_future_format_is_refused_by_name():
    future = b"PF\x02\x00" + pickle.dumps(1)
    with pytest.raises(
        PayloadError, match="format version 2, this pforeach reads version 1"
    ):
        serialize.unseal(future, "q/env/h", None)


def test_a_trap_is_checked_before_it_is_unpickled(tmp_path):
    from pforeach.backends.redis.worker import decode_task

    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(Trap(armed)))
    assert armed.exists(), (
        "the trap must work when unpickled, or this test proves nothing"
    )

    marker = tmp_path / "marker"
    payload = serialize.dumps(Task(0, [(0, {"x": Trap(marker)})]))
    for message, secret in [
        (task_message("j1", 0, payload, b"wrong secret"), SECRET),
        (task_message("j1", 0, payload, None), SECRET),
        (task_message("j1", 0, payload, SECRET, sign_as=("j2", 0)), SECRET),
        (task_message("j1", 0, payload, SECRET, sign_as=("j1", 1)), SECRET),
        (task_message("j1", 0, payload, SECRET), None),
    ]:
        with pytest.raises(PayloadError):
            decode_task(message, KEYS, secret, {}.get)
    assert not marker.exists()
    # The same message, rightly signed, is unpickled (and springs the trap).
    decode_task(task_message("j1", 0, payload, SECRET), KEYS, SECRET, {}.get)
    assert marker.exists()


# -- the secret in use ---------------------------------------------------------------------


def test_a_loop_with_a_secret(master):
    assert foreach(x=range(20), combine=sum).dopar(lambda x: x * x) == sum(
        x * x for x in range(20)
    )


def test_the_secret_can_come_from_the_environment(server, pool, monkeypatch):
    monkeypatch.setenv(ENV_SECRET, SECRET.decode())
    with registered(RedisBackend(QUEUE, server.url, **BACKEND_OPTIONS)) as backend:
        assert backend.secret == SECRET
        assert foreach(x=range(6), combine=sum).dopar(lambda x: x + 1) == 21


def test_bad_results_are_taken_for_lost_and_the_loop_finishes(master, server, caplog):
    """Forged results (wrong secret, signed for another task or job, unsigned,
    truncated) reach the master before the real ones; none is used."""
    caplog.set_level("WARNING", logger="pforeach")
    # A module-level body travels by reference; the workers import this module.
    result = foreach(i=range(5), url=[server.url] * 5).dopar(plant_bad_results)
    assert result == [0, 10, 20, 30, 40]
    unusable = [
        rec.getMessage()
        for rec in caplog.records
        if "is unusable" in rec.getMessage()
        and "running the task again" in rec.getMessage()
    ]
    assert len(unusable) == 5, unusable
    for text in unusable:
        assert "worker intruder" in text and f"{QUEUE}.out." in text
    reasons = " ".join(unusable)
    assert "signature check failed" in reasons
    assert "payload is not signed" in reasons
    assert "truncated payload" in reasons


def test_a_secret_that_differs_fails_the_loop_saying_so(server, pool):
    for secret in (b"not the workers' secret", None):
        backend = RedisBackend(QUEUE, server.url, secret=secret, **BACKEND_OPTIONS)
        started = time.monotonic()
        with registered(backend), pytest.raises(PayloadError) as info:
            foreach(x=range(4)).dopar(lambda x: x)
        text = str(info.value)
        assert "could not read task" in text
        assert "must use the same secret" in text
        # Well before any fault check or TTL could end it otherwise.
        assert time.monotonic() - started < 20
    # The workers are fine and serve the next loop.
    with registered(RedisBackend(QUEUE, server.url, secret=SECRET, **BACKEND_OPTIONS)):
        assert foreach(x=range(4), combine=sum).dopar(lambda x: x) == 6


def test_a_worker_started_with_a_secret_file(server, tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(b"from a file\n")
    log = tmp_path / "cli.log"
    with importable_tests():
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("pforeach-worker")),
                "start",
                "-n",
                "1",
                "--queue",
                "fileq",
                "--url",
                server.url,
                "--secret-file",
                str(secret_file),
                "--linger",
                "1",
                "--log",
                str(log),
            ],
        )
    try:
        with registered(
            RedisBackend("fileq", server.url, secret="from a file", **BACKEND_OPTIONS)
        ):
            assert foreach(x=range(5), combine=sum).dopar(lambda x: 2 * x) == 20
        with (
            registered(
                RedisBackend(
                    "fileq", server.url, secret="from a file\n", **BACKEND_OPTIONS
                )
            ),
            pytest.raises(PayloadError),
        ):
            # The file's trailing newline is not part of the secret.
            foreach(x=range(2)).dopar(lambda x: x)
    finally:
        proc.terminate()
        proc.wait(DEADLINE)
    assert "rejected task" in log.read_text()


# -- without a secret ---------------------------------------------------------------------


def test_without_a_secret_loops_work_as_before(server, monkeypatch):
    monkeypatch.delenv(ENV_SECRET, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a loopback Redis: no warning
        with importable_tests():
            workers = start_local_workers(1, "plainq", server.url, **WORKER_OPTIONS)
        backend = RedisBackend("plainq", server.url, **BACKEND_OPTIONS)
    try:
        workers.wait_ready(DEADLINE)
        assert backend.secret is None
        with registered(backend):
            assert foreach(x=range(5), combine=sum).dopar(lambda x: x) == 10
    finally:
        workers.stop()


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.2:6379/0",
        "redis://localhost:6379/0",
        "redis://[::1]:6379/0",
        "unix:///tmp/redis.sock",
    ],
)
def test_no_warning_for_redis_on_this_machine(url, monkeypatch):
    monkeypatch.delenv(ENV_SECRET, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RedisBackend("q", url)  # makes no connection
        make_config("q", url)


def test_one_warning_per_address_for_redis_elsewhere_without_a_secret(monkeypatch):
    monkeypatch.delenv(ENV_SECRET, raising=False)
    # Nothing connects: a backend and a worker config connect lazily.
    url = f"redis://redis-elsewhere-{os.getpid()}-{time.monotonic_ns()}.invalid:6379/0"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        RedisBackend("q", url)
        RedisBackend("q", url)
        make_config("q", url)
    texts = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(texts) == 1, texts
    assert "no secret is set" in texts[0] and "redis-elsewhere" in texts[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RedisBackend("q", url.replace("6379", "6380"), secret="s")  # signed: no warning
        warn_if_exposed(ConnectionSpec(url), b"s")


# -- bad input on the queue -----------------------------------------------------------------


def test_bad_items_on_the_queue_are_logged_and_skipped(
    master, pool, r, log_path, tmp_path
):
    before = sorted(pool.child_pids())
    assert len(before) == 2

    # Processing lists of the wrong type: neither worker can take a task
    # until it notices and repairs its own.
    wids = sorted(w.decode() for w in r.smembers(KEYS.workers))
    assert len(wids) == 2
    for wid in wids:
        r.hset(KEYS.proc(wid), "not", "a list")

    jobs = [f"badjob{n:02d}" for n in range(12)]
    for job in jobs:  # job records, so that the workers hand the tasks out
        r.hset(KEYS.job(job), "user", "test")
        r.expire(KEYS.job(job), 120)
    trap_task, trap_env = tmp_path / "task-trap", tmp_path / "env-trap"
    trap = serialize.dumps(Task(0, [(0, {"x": Trap(trap_task)})]))
    genuine = serialize.dumps(Task(0, [(0, {"x": 1})]))
    env_list, env_forged = "e1" * 16, "e2" * 16
    r.rpush(KEYS.env(env_list), b"a list, not a string")
    forged_env = serialize.seal(
        serialize.dumps(Trap(trap_env)),
        KEYS.identity("env", env_forged),
        b"wrong secret",
    )
    r.set(KEYS.env(env_forged), b"=" + forged_env, ex=120)
    r.set(KEYS.out(jobs[9]), b"a string, not a list", ex=120)
    oversized = task_message(jobs[4], 0, b"\x00" * (4 << 20), b"wrong secret")

    items = {
        b"\x00\xff garbage \x80": "dropping a malformed message",
        b"PFT1 " + b"x" * 3000 + b"\n=": "dropping a malformed message",
        task_message(jobs[0], 0, genuine, SECRET)[:-7]: f"task 0 of job {jobs[0]}",
        task_message(jobs[1], 0, genuine, SECRET)[:60]: f"task 0 of job {jobs[1]}",
        TaskHeader(jobs[2], 0, "ab", 3, None, 1, None, "0").encode()
        + b"=PF\x09\x01payload": "format version 9",
        TaskHeader(jobs[3], 0, "ab", 3, None, 1, None, "0").encode()
        + b"#99999999999": "malformed part count",
        # A time limit of nan would have the supervisor stop the worker at once.
        TaskHeader(jobs[3], 1, "ab", 3, None, 1, None, "1")
        .encode()
        .replace(b" - 1 - ", b" nan 1 - ")
        + b"=": f"malformed task header: ['{jobs[3]}', '1', 'ab', '3', 'nan'",
        oversized: f"task 0 of job {jobs[4]}",
        task_message(jobs[5], 0, trap, b"wrong secret"): f"task 0 of job {jobs[5]}",
        task_message(jobs[6], 0, trap, None): "payload is not signed",
        task_message(jobs[7], 0, trap, SECRET, sign_as=(jobs[8], 0)): f"job {jobs[7]}",
        task_message(
            jobs[7], 1, trap, SECRET, sign_as=(jobs[7], 0)
        ): f"task 1 of job {jobs[7]}",
        # Q.out.J is a string: the worker cannot answer, and says so.
        task_message(jobs[9], 0, genuine, SECRET): "Redis refused a command",
        # Q.env.H is a list, or holds a forged environment.
        task_message(
            jobs[10], 0, genuine, SECRET, env_hash=env_list
        ): f"rejected environment {KEYS.env(env_list)}",
        task_message(
            jobs[11], 0, genuine, SECRET, env_hash=env_forged
        ): f"rejected environment {KEYS.env(env_forged)}",
    }
    r.rpush(QUEUE, *items)
    wait_until(lambda: r.llen(QUEUE) == 0, "the workers take every item")
    repaired = [f"{KEYS.proc(wid)} holds a hash, not a list" for wid in wids]
    for expected in [*repaired, *items.values()]:
        wait_until(lambda e=expected: e in text_of(log_path), f"log has {expected!r}")

    # The same workers serve a normal loop right after.
    assert foreach(x=range(10), combine=sum).dopar(lambda x: x * 3) == 135
    assert sorted(pool.child_pids()) == before
    assert not trap_task.exists() and not trap_env.exists()

    log = text_of(log_path)
    assert "Traceback" not in log
    for expected in [*repaired, *items.values()]:
        lines = [line for line in log.splitlines() if expected in line]
        assert lines and all(" WARNING " in line for line in lines), expected
    r.delete(*(KEYS.job(j) for j in jobs), KEYS.env(env_list), KEYS.env(env_forged))


def test_a_worker_record_of_the_wrong_type_is_repaired(master, pool, r, log_path):
    before = sorted(pool.child_pids())
    wid = sorted(w.decode() for w in r.smembers(KEYS.workers))[0]
    r.delete(KEYS.worker(wid))
    r.rpush(KEYS.worker(wid), "a list where a hash belongs")
    # The supervisor's heartbeat notices, removes the odd key and writes the
    # worker's record anew; nothing stops.
    wait_until(
        lambda: r.type(KEYS.worker(wid)) == b"hash", "the worker key is a hash again"
    )
    assert f"{KEYS.worker(wid)} holds a list, not a hash" in text_of(log_path)
    assert foreach(x=range(8), combine=sum).dopar(lambda x: x) == 28
    assert sorted(pool.child_pids()) == before


# -- mistakes of the user -------------------------------------------------------------------


def test_unreachable_redis_fails_at_once_naming_the_address():
    port = free_port()
    backend = RedisBackend(
        "q", f"redis://127.0.0.1:{port}/0", connect_timeout=2, reconnect_timeout=60
    )
    started = time.monotonic()
    with registered(backend), pytest.raises(BackendUnavailableError) as info:
        foreach(x=range(3)).dopar(lambda x: x)
    assert time.monotonic() - started < 10  # not reconnect_timeout
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "cannot reach Redis" in str(info.value)


@pytest.mark.parametrize(
    "name", ["a.b", "two words", "", "x" * 201, "new\nline", "star*"]
)
def test_a_queue_name_that_would_break_the_key_layout(name):
    with pytest.raises(OptionError, match="invalid queue name"):
        RedisBackend(name)
    with pytest.raises(OptionError, match="invalid queue name"):
        start_local_workers(1, name, "redis://127.0.0.1:1/0")
    with pytest.raises(OptionError, match="invalid queue name"):
        Keys(name)


def test_the_worker_command_refuses_a_bad_queue_name():
    worker = str(Path(sys.executable).with_name("pforeach-worker"))
    done = subprocess.run(
        [worker, "start", "--queue", "a.b", "--url", "redis://127.0.0.1:1/0"],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert done.returncode != 0
    assert "invalid queue name 'a.b'" in done.stderr


# -- what the secret does not do ------------------------------------------------------------


def test_the_secret_signs_but_does_not_encrypt(master, r):
    marker = "plain-text-visible-in-redis"

    def body(x):
        return f"{marker}-{x}"

    assert foreach(x=range(3)).dopar(body) == [f"{marker}-{x}" for x in range(3)]
    # The job environment outlives the job (env_ttl): its bytes, signed, hold
    # the body's constants as they are.
    envs = [r.get(k) for k in r.scan_iter(match=f"{QUEUE}.env.*")]
    assert any(marker.encode() in (value or b"") for value in envs)


def fail_loops_with_notices(x: int, url: str) -> int:
    """Loop body: does what anyone with write access to Redis can do, pushes
    (unsigned) notices that the task could not be read."""
    r = redis.Redis.from_url(url)
    try:
        (job,) = [j.decode() for j in r.smembers(KEYS.jobs)]
        notice = b"PFN1 %s %d intruder\nforged" % (job.encode(), x)
        r.rpush(KEYS.out(job), notice, notice)
    finally:
        r.close()
    return x


def test_a_writer_to_redis_can_still_fail_a_loop(master, server):
    with pytest.raises(
        PayloadError, match="worker intruder could not read task 0: forged"
    ):
        foreach(x=[0], url=[server.url]).dopar(fail_loops_with_notices)


# -- results and environments that fail -------------------------------------------------------


def _refuse_in(pid: int) -> int:
    if os.getpid() == pid:
        raise RuntimeError("this value cannot be rebuilt in the master")
    return 1


class OnlyOnWorkers:
    """Pickles anywhere; unpickles everywhere but in the process ``pid``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __reduce__(self) -> tuple[Any, ...]:
        return (_refuse_in, (self.pid,))


def make_only_on_workers(x: int, pid: int) -> Any:
    return OnlyOnWorkers(pid) if x == 1 else x


def test_a_genuine_result_that_does_not_unpickle_fails_its_task_with_the_reason(
    master, caplog
):
    caplog.set_level("WARNING", logger="pforeach")
    result = foreach(x=range(3), pid=[os.getpid()] * 3, errorhandling="pass").dopar(
        make_only_on_workers
    )
    assert result[0] == 0 and result[2] == 2
    error = result[1]
    assert isinstance(error, SerializationError)
    assert "cannot be read here" in str(error)
    assert "this value cannot be rebuilt in the master" in str(error)
    retries = [r for r in caplog.records if "running the task again" in r.getMessage()]
    assert len(retries) == 2  # tried three times in all (max_attempts), then failed


def test_a_forged_environment_is_not_loaded_and_is_uploaded_again(
    server, tmp_path, caplog
):
    """The environment is replaced in Redis before any worker reads it."""
    caplog.set_level("WARNING", logger="pforeach")
    queue, keys = "envq", Keys("envq")
    trap = tmp_path / "env-trap"
    log = tmp_path / "envq.log"
    outcome: dict[str, Any] = {}
    with (
        server.client() as r,
        registered(RedisBackend(queue, server.url, secret=SECRET, **BACKEND_OPTIONS)),
    ):

        def run() -> None:
            try:
                outcome["value"] = foreach(x=range(4), combine=sum).dopar(
                    lambda x: x + 1
                )
            except BaseException as exc:  # reported below
                outcome["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        wait_until(lambda: list(r.scan_iter(match=f"{queue}.env.*")), "the upload")
        (key,) = [k.decode() for k in r.scan_iter(match=f"{queue}.env.*")]
        env_hash = key.rpartition(".")[2]
        forged = serialize.seal(
            serialize.dumps(Trap(trap)), keys.identity("env", env_hash), b"wrong secret"
        )
        r.set(key, b"=" + forged, ex=120)
        with importable_tests():
            workers = start_local_workers(
                1,
                queue,
                server.url,
                secret=SECRET,
                log_file=str(log),
                **{**WORKER_OPTIONS, "log_level": "INFO"},
            )
        try:
            thread.join(DEADLINE)
        finally:
            workers.stop()
    assert not thread.is_alive()
    assert outcome == {"value": 10}
    assert not trap.exists()
    assert f"rejected environment {key}: signature check failed" in log.read_text()
    assert any(
        "found no environment; uploading it again" in rec.getMessage()
        for rec in caplog.records
    )
