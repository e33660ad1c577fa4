"""Passwords, ACL users and TLS, against real redis-server processes.

Every server here is started by the test with its own throwaway certificates
(``make_test_certs``) or password; masters and workers (started from Python
and with the ``pforeach-worker`` command) connect to it as a user would.
The least-privilege ACL is read from docs/security.md and applied as it is
written there, so the page and the test cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redis_support import (
    BACKEND_OPTIONS,
    DEADLINE,
    WORKER_OPTIONS,
    registered,
    worker_pool,
)

from pforeach import (
    BackendUnavailableError,
    foreach,
)
from pforeach.backends.redis import RedisBackend, start_local_workers
from pforeach.backends.redis.client import ConnectionSpec
from pforeach.backends.redis.server import RedisServer, TLSFiles, make_test_certs

pytestmark = pytest.mark.timeout(120)

HERE = Path(__file__).resolve().parent
DOC = HERE.parents[1] / "docs" / "security.md"
WORKER = str(Path(sys.executable).with_name("pforeach-worker"))
SECRET = "tls-and-acl-secret"


# -- helpers ------------------------------------------------------------------------


@contextmanager
def workers(n: int, queue: str, spec: ConnectionSpec, **options: Any) -> Iterator[Any]:
    with worker_pool(n, queue, spec=spec, secret=SECRET, **options) as pool:
        yield pool


@contextmanager
def cli_worker(queue: str, url: str, tmp_path: Path, *args: str) -> Iterator[Path]:
    """``pforeach-worker start`` in a subprocess; yields its log file."""
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    log = tmp_path / f"{queue}.log"
    proc = subprocess.Popen(
        [
            WORKER,
            "start",
            "-n",
            "1",
            "--queue",
            queue,
            "--url",
            url,
            "--secret-file",
            str(secret_file),
            "--linger",
            "1",
            "--log",
            str(log),
            *args,
        ],
    )
    try:
        yield log
    finally:
        proc.terminate()
        proc.wait(DEADLINE)


def square_sum(backend: RedisBackend, n: int = 10) -> Any:
    with registered(backend):
        return foreach(x=range(n), combine=sum).dopar(lambda x: x * x)


EXPECTED = sum(x * x for x in range(10))


def fails_fast(backend: RedisBackend, *fragments: str) -> str:
    """Runs a loop that must fail with BackendUnavailableError, quickly."""
    started = time.monotonic()
    with registered(backend), pytest.raises(BackendUnavailableError) as info:
        foreach(x=range(2)).dopar(lambda x: x)
    assert time.monotonic() - started < 15, "must not wait for reconnect_timeout"
    text = str(info.value)
    for fragment in fragments:
        assert fragment in text, text
    return text


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_test_certs(tmp_path_factory.mktemp("certs"))


# -- passwords -------------------------------------------------------------------------


def test_a_loop_with_a_password(tmp_path):
    with (
        RedisServer(password="pw-for-default") as srv,
        workers(2, "pwq", ConnectionSpec(srv.url)),
    ):
        assert (
            square_sum(RedisBackend("pwq", srv.url, secret=SECRET, **BACKEND_OPTIONS))
            == EXPECTED
        )


def test_a_wrong_or_missing_password_fails_at_once(tmp_path):
    with RedisServer(password="the-right-one") as srv:
        address = f"127.0.0.1:{srv.port}"
        for url in (
            f"redis://:not-it@{address}/0",
            f"redis://{address}/0",
            f"redis://nobody:not-it@{address}/0",
        ):
            text = fails_fast(
                RedisBackend("q", url, reconnect_timeout=60, **BACKEND_OPTIONS),
                address,
                "refused the credentials",
            )
            assert "not-it" not in text and "the-right-one" not in text
        # Workers with a wrong password exit instead of retrying for an hour.
        pool = start_local_workers(
            1, "q", f"redis://:not-it@{address}/0", secret=SECRET, **WORKER_OPTIONS
        )
        try:
            with pytest.raises(
                BackendUnavailableError, match="refused the credentials"
            ):
                pool.wait_ready(DEADLINE)
            assert pool.proc.wait(DEADLINE) != 0
        finally:
            pool.kill()


# -- TLS -------------------------------------------------------------------------------


def tls_spec(url: str, certs: TLSFiles, client_cert: bool = True) -> dict[str, Any]:
    files = {"ssl_ca_certs": certs.ca_file}
    if client_cert:
        files.update(
            ssl_certfile=certs.client_cert_file, ssl_keyfile=certs.client_key_file
        )
    return files


def test_a_loop_over_tls_with_client_certificates(certs, tmp_path):
    strict = dataclasses.replace(certs, auth_clients="yes")
    with RedisServer(tls=strict) as srv:
        assert srv.url.startswith("rediss://")
        files = tls_spec(srv.url, certs)
        with workers(2, "tlsq", ConnectionSpec(srv.url, **files)):
            assert (
                square_sum(
                    RedisBackend(
                        "tlsq", srv.url, secret=SECRET, **files, **BACKEND_OPTIONS
                    )
                )
                == EXPECTED
            )
        # The worker command takes the same files.
        with cli_worker(
            "tlscli",
            srv.url,
            tmp_path,
            "--ssl-ca-certs",
            certs.ca_file,
            "--ssl-certfile",
            str(certs.client_cert_file),
            "--ssl-keyfile",
            str(certs.client_key_file),
        ) as log:
            assert (
                square_sum(
                    RedisBackend(
                        "tlscli", srv.url, secret=SECRET, **files, **BACKEND_OPTIONS
                    )
                )
                == EXPECTED
            )
        assert "serving tlscli at rediss://" in log.read_text()

        # The server speaks nothing but TLS ...
        plain = srv.url.replace("rediss://", "redis://")
        fails_fast(
            RedisBackend("q", plain, connect_timeout=3, **BACKEND_OPTIONS),
            f"127.0.0.1:{srv.port}",
        )
        # ... and only to clients with a certificate its CA signed.
        fails_fast(
            RedisBackend(
                "q",
                srv.url,
                connect_timeout=3,
                **tls_spec(srv.url, certs, client_cert=False),
                **BACKEND_OPTIONS,
            ),
            f"127.0.0.1:{srv.port}",
        )


class NameBlindServer(RedisServer):
    """A server whose own start-up check ignores the name in its certificate,
    so that it can serve a certificate made out to another address."""

    def client(self, **kw: Any) -> redis.Redis:
        return super().client(**{"ssl_check_hostname": False, **kw})


def test_a_server_certificate_that_does_not_verify_fails_at_once(certs, tmp_path):
    other_ca = make_test_certs(tmp_path / "other")
    with RedisServer(tls=certs) as srv:
        fails_fast(
            RedisBackend(
                "q",
                srv.url,
                ssl_ca_certs=other_ca.ca_file,
                reconnect_timeout=60,
                **BACKEND_OPTIONS,
            ),
            f"127.0.0.1:{srv.port}",
            "could not be verified over TLS",
        )
    # A certificate for 127.0.0.1 and localhost does not do for 127.0.0.2.
    with NameBlindServer(host="127.0.0.2", tls=certs) as srv:
        assert "127.0.0.2" in srv.url
        fails_fast(
            RedisBackend(
                "q",
                srv.url,
                ssl_ca_certs=certs.ca_file,
                reconnect_timeout=60,
                **BACKEND_OPTIONS,
            ),
            f"127.0.0.2:{srv.port}",
            "could not be verified over TLS",
        )


# -- the least-privilege ACL ------------------------------------------------------------


def documented_acl() -> list[list[str]]:
    """The ``ACL SETUSER`` lines of docs/security.md, split into arguments."""
    lines = [
        line.strip()
        for line in DOC.read_text().splitlines()
        if line.strip().startswith("ACL SETUSER ")
    ]
    assert lines, f"no ACL in {DOC}"
    return [shlex.split(line) for line in lines]


def password_of(acl: list[list[str]], user: str) -> str:
    for words in acl:
        if words[2] == user:
            for word in words[3:]:
                if word.startswith(">"):
                    return word[1:]
    raise AssertionError(f"no password for {user} in the documented ACL")


def fault_check_seen(i: int, admin_url: str, marker: str) -> int:
    """Loop body run under the worker's ACL user.

    Task 0 kills its worker process the first time (so a supervisor hands
    the task back and starts a worker, under the ACL); task 1 waits until
    the master has run a fault check, so that the check, too, ran under the
    ACL. While a loop runs, only a fault check calls SMEMBERS (the master
    looking for dead workers).
    """
    if i == 0 and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(3)
    if i == 1:
        admin = redis.Redis.from_url(admin_url)

        def smembers_calls() -> int:
            stats = admin.info("commandstats").get("cmdstat_smembers", {})
            return int(stats.get("calls", 0))

        deadline = time.monotonic() + DEADLINE
        try:
            before = smembers_calls()
            while smembers_calls() == before:
                if time.monotonic() > deadline:
                    return -1
                time.sleep(0.05)
        finally:
            admin.close()
    return i * i


def test_a_loop_under_the_documented_acl(tmp_path):
    acl = documented_acl()
    users = {words[2] for words in acl}
    assert users == {"pforeach-master", "pforeach-worker"}
    with RedisServer(password="admin-only") as srv:
        address = f"127.0.0.1:{srv.port}"
        with srv.client() as admin:
            for words in acl:
                assert admin.execute_command(*words) in (b"OK", "OK")
            admin.acl_log_reset()
        worker_url = (
            f"redis://pforeach-worker:{password_of(acl, 'pforeach-worker')}@{address}/0"
        )
        master_url = (
            f"redis://pforeach-master:{password_of(acl, 'pforeach-master')}@{address}/0"
        )

        # The default user is password-protected: nobody gets in unasked.
        with (
            redis.Redis(host="127.0.0.1", port=srv.port) as anonymous,
            pytest.raises(redis.AuthenticationError),
        ):
            anonymous.ping()
        # The pforeach users touch their queue's keys only, with their commands only.
        for url in (worker_url, master_url):
            with redis.Redis.from_url(url) as user:
                user.set("jobs.scratch", b"1")
                user.delete("jobs.scratch")
                for command in (
                    ("GET", "other"),
                    ("SET", "jobsx", "1"),
                    ("KEYS", "*"),
                    ("FLUSHALL",),
                    ("CONFIG", "GET", "*"),
                    ("SCAN", "0"),
                    ("EVAL", "return 1", "0"),
                    ("SUBSCRIBE", "jobs"),
                ):
                    with pytest.raises(redis.exceptions.NoPermissionError):
                        user.execute_command(*command)
        with srv.client() as admin:
            admin.acl_log_reset()

        marker = str(tmp_path / "died-once")
        with workers(2, "jobs", ConnectionSpec(worker_url)) as pool:
            before = set(pool.child_pids())
            # The master's credentials as arguments, the workers' in the URL.
            master = RedisBackend(
                "jobs",
                f"redis://{address}/0",
                username="pforeach-master",
                password=password_of(acl, "pforeach-master"),
                secret=SECRET,
                **BACKEND_OPTIONS,
            )
            with registered(master):
                result = foreach(
                    i=range(6), admin_url=[srv.url] * 6, marker=[marker] * 6
                ).dopar(fault_check_seen)
            assert result == [i * i for i in range(6)]
            assert os.path.exists(marker)
            assert set(pool.child_pids()) != before  # one worker died and was replaced

        with srv.client() as admin:
            denied = [
                entry
                for entry in admin.acl_log()
                # redis-py sends CLIENT SETINFO (Redis 7.2+) and ignores a refusal.
                if "setinfo" not in str(entry.get("object", "")).lower()
            ]
            assert denied == [], [
                (e["username"], e["object"], e["context"]) for e in denied
            ]
            stats = admin.info("commandstats")
        # The run went through the paths the ACL must cover.
        for command in (
            "evalsha",
            "blmove",
            "blpop",
            "info",
            "smembers",
            "lrange",
            "lmove",
        ):
            assert f"cmdstat_{command}" in stats, command
