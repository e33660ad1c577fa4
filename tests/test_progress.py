"""progress=True: a tqdm bar over iterations, the same on every backend.

The bar writes to standard error, which pytest captures; its last state is
the text after the last carriage return.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from backend_fixtures import registered, shared_backend
from redis_support import DEADLINE, worker_pool

from pforeach import (
    Backend,
    foreach,
    register_backend,
    registered_backend,
    set_options,
)
from pforeach.backends.redis import LocalWorkers, RedisBackend
from pforeach.backends.redis.server import RedisServer

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def redis_pool() -> Iterator[tuple[RedisServer, LocalWorkers]]:
    with (
        RedisServer() as server,
        worker_pool(2, "progress", server.url, alive_ttl=2) as pool,
    ):
        yield server, pool


@pytest.fixture(params=["sequential", "local", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Each backend in turn, registered for the test."""
    if request.param == "redis":
        server, _ = request.getfixturevalue("redis_pool")
        instance: Backend = RedisBackend(
            "progress", server.url, ftinterval=3, key_ttl=10
        )
    else:
        instance = shared_backend(request.param, request)
    # The shared backends stay open for the session; the Redis one is the test's.
    with registered(instance, close=request.param == "redis"):
        yield instance


def last_state(err: str) -> str:
    """What the bar showed last: the text after the last carriage return."""
    return err.rstrip("\n").rsplit("\r", 1)[-1]


def test_bar_reaches_the_total(
    backend: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    value = foreach(i=range(10), combine=sum, progress=True, chunksize=3).dopar(
        lambda i: i * i
    )
    assert value == 285
    shown = last_state(capsys.readouterr().err)
    assert re.match(r"pforeach: 100%\|.*\| 10/10 \[\d\d:\d\d<00:00, .*it/s\]$", shown)


def test_unknown_length_counts_without_eta(
    backend: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    value = foreach(i=iter(range(7)), combine=sum, progress=True).dopar(lambda i: i)
    assert value == 21
    shown = last_state(capsys.readouterr().err)
    assert re.match(r"pforeach: 7it \[\d\d:\d\d, .*it/s\]$", shown)


def test_set_options_turns_the_bar_on_and_off(
    backend: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    with set_options(progress=True):
        foreach(i=range(4)).dopar(lambda i: i)
    assert "| 4/4 [" in last_state(capsys.readouterr().err)
    foreach(i=range(4)).dopar(lambda i: i)
    assert "pforeach:" not in capsys.readouterr().err


@pytest.mark.parametrize("name", ["local", "redis"])
def test_bar_advances_before_the_first_result_with_inorder(
    name: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Iteration 0 waits at a gate while others finish: the bar counts them
    # (and shows it, although no further result arrives to trigger a redraw)
    # while in-order combining still waits for iteration 0.
    if name == "redis":
        server, _ = request.getfixturevalue("redis_pool")
        instance: Backend = RedisBackend(
            "progress", server.url, ftinterval=3, key_ttl=10
        )
    else:
        instance = shared_backend(name, request)
    gate = tmp_path / "gate"
    path = str(gate)

    def body(i: int) -> int:
        import os
        import time

        deadline = time.monotonic() + 60
        while i == 0 and not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.02)
        return i

    outcome: dict[str, object] = {}
    previous = registered_backend()
    register_backend(instance)
    try:
        loop = foreach(i=range(5), inorder=True, progress=True)
        thread = threading.Thread(target=lambda: outcome.update(value=loop.dopar(body)))
        thread.start()
        seen = ""
        advanced = re.compile(r"\| [1-4]/5 \[")
        deadline = time.monotonic() + DEADLINE
        while not advanced.search(seen) and time.monotonic() < deadline:
            seen += capsys.readouterr().err
            time.sleep(0.05)
        assert advanced.search(seen), seen
        assert "value" not in outcome
        gate.touch()
        thread.join(DEADLINE)
    finally:
        gate.touch()
        register_backend(previous)
        if name == "redis":
            instance.close()
    assert outcome["value"] == [0, 1, 2, 3, 4]
    assert "| 5/5 [" in last_state(capsys.readouterr().err)
