"""The local backend: real worker processes, lost workers, timeouts, reuse."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend_fixtures import (
    DEADLINE,
    LOCAL_WORKERS,
    append_line,
    read_lines,
    registered,
    shared_backend,
    wait_for,
)

from pforeach import (
    IterationError,
    LocalBackend,
    PforeachError,
    SerializationError,
    TaskTimeoutError,
    WorkerLostError,
    foreach,
    register_backend,
    registered_backend,
    set_options,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def local(request):
    """The session's LocalBackend, registered for the test."""
    with registered(shared_backend("local", request), close=False) as instance:
        yield instance


@dataclass(frozen=True)
class Point:
    x: int
    y: int

    def norm1(self) -> int:
        return abs(self.x) + abs(self.y)


class Scaler:
    def __init__(self, factor: int) -> None:
        self.factor = factor

    def scale(self, x):
        return x * self.factor

    def __call__(self, x):
        return x + self.factor


def die_on_three(x, log):
    if x == 3:
        append_line(log, str(os.getpid()))
        os._exit(3)
    return x


def slow_on_one(x):
    if x == 1:
        time.sleep(DEADLINE)
    return x


class Anchor:
    """A value that cannot be serialized."""

    def __reduce__(self):
        raise TypeError("an Anchor stays where it is")


# -- parallelism and processes ----------------------------------------------------


def test_two_iterations_run_at_the_same_time(local, tmp_path):
    directory = str(tmp_path)

    def meet(me, other):
        Path(directory, f"{me}.here").touch()
        seen = wait_for(lambda: Path(directory, f"{other}.here").exists())
        return (seen, os.getpid())

    result = foreach(me=["a", "b"], other=["b", "a"]).dopar(meet)
    assert [seen for seen, _ in result] == [True, True]
    assert result[0][1] != result[1][1]


def test_bodies_run_in_worker_processes(local):
    pids = set(foreach(x=range(20)).dopar(lambda x: os.getpid()))
    assert os.getpid() not in pids
    assert len(pids) == LOCAL_WORKERS


def test_environment_is_shipped_once_per_worker_per_job(local, tmp_path):
    log = str(tmp_path / "loads.log")

    def init():
        append_line(log, str(os.getpid()))

    loop = foreach(x=range(40), worker_init=init)
    pids = {str(pid) for pid in loop.dopar(lambda x: os.getpid())}
    loads = read_lines(log)
    assert sorted(loads) == sorted(pids)
    assert len(loads) == LOCAL_WORKERS

    loop.dopar(lambda x: os.getpid())
    assert len(read_lines(log)) == 2 * LOCAL_WORKERS


@pytest.mark.parametrize("chunksize", [3, 4, 7, 11])
def test_chunk_sizes_that_do_not_divide_the_count(local, chunksize):
    assert foreach(x=range(10), chunksize=chunksize).dopar(lambda x: x * 2) == [
        x * 2 for x in range(10)
    ]
    sizes = foreach(x=range(10), chunksize=chunksize, reduce=len).dopar(lambda x: x)
    assert sum(sizes) == 10
    assert sizes[:-1] == [chunksize] * (len(sizes) - 1)
    assert 1 <= sizes[-1] <= chunksize


def test_results_arriving_out_of_order_are_combined_in_order(local, tmp_path):
    marker = tmp_path / "three-done"

    def body(x):
        if x == 0:
            return (x, wait_for(marker.exists))
        if x == 3:
            marker.touch()
        return (x, True)

    assert foreach(x=range(6)).dopar(body) == [(x, True) for x in range(6)]


def arrival_order_loop(directory: Path, **options):
    """A loop whose iteration 0 ends only once the master has combined iteration 3.

    With inorder=False that happens, and 3 comes before 0 in the result; in
    order, 3 is never combined before 0, and iteration 0 gives up after a
    while, returning "timed out".
    """
    marker = str(directory / "three-combined")

    def combine(acc, value):
        if value == 3:
            Path(marker).touch()
        return [*acc, value]

    def body(x):
        if x == 0 and not wait_for(Path(marker).exists, timeout=DEADLINE / 3):
            return "timed out"
        return x

    return foreach(x=range(6), combine=combine, init=[], **options), body


def test_inorder_false_combines_as_results_arrive(local, tmp_path):
    loop, body = arrival_order_loop(tmp_path, inorder=False)
    result = loop.dopar(body)
    assert "timed out" not in result
    assert sorted(result) == list(range(6))
    assert result.index(3) < result.index(0)


def test_set_options_inorder_reaches_the_combine(local, tmp_path):
    loop, body = arrival_order_loop(tmp_path)
    with set_options(inorder=False):
        result = loop.dopar(body)
    assert "timed out" not in result
    assert sorted(result) == list(range(6))
    assert result.index(3) < result.index(0)


# -- lost workers and timeouts -------------------------------------------------------


@pytest.mark.parametrize("attempts", [1, 2])
def test_a_worker_that_dies_is_retried_then_fails_the_loop(local, tmp_path, attempts):
    log = str(tmp_path / "attempts.log")
    loop = foreach(x=range(6), max_attempts=attempts)
    with pytest.raises(IterationError) as info:
        loop.dopar(lambda x: die_on_three(x, log))
    assert info.value.index == 3
    cause = info.value.__cause__
    assert isinstance(cause, WorkerLostError)
    assert "iterations 3" in str(cause)
    assert f"died {attempts} times" in str(cause)
    pids = read_lines(log)
    assert len(pids) == attempts
    assert len(set(pids)) == attempts
    assert foreach(x=range(4)).dopar(lambda x: x + 1) == [1, 2, 3, 4]


def test_a_lost_worker_with_errorhandling_pass(local, tmp_path):
    log = str(tmp_path / "attempts.log")
    loop = foreach(x=range(8), chunksize=2, max_attempts=2, errorhandling="pass")
    result = loop.dopar(lambda x: die_on_three(x, log))
    assert [result[i] for i in (0, 1, 4, 5, 6, 7)] == [0, 1, 4, 5, 6, 7]
    for lost in result[2:4]:
        assert isinstance(lost, WorkerLostError)
        assert "iterations 2-3" in str(lost)
    assert len(read_lines(log)) == 2
    assert len(set(foreach(x=range(10)).dopar(lambda x: os.getpid()))) == LOCAL_WORKERS


def test_a_task_past_its_timeout_is_stopped(local):
    started = time.monotonic()
    result = foreach(x=range(6), timeout=3, errorhandling="pass").dopar(slow_on_one)
    assert time.monotonic() - started < DEADLINE
    assert [result[i] for i in (0, 2, 3, 4, 5)] == [0, 2, 3, 4, 5]
    assert isinstance(result[1], TaskTimeoutError)
    assert "timeout" in str(result[1])
    assert foreach(x=range(5), combine="sum").dopar(lambda x: x) == 10


def test_a_timeout_with_errorhandling_stop(local):
    with pytest.raises(IterationError) as info:
        foreach(x=range(3), timeout=3).dopar(slow_on_one)
    assert info.value.index == 1
    assert isinstance(info.value.__cause__, TaskTimeoutError)
    assert foreach(x=range(3)).dopar(lambda x: -x) == [0, -1, -2]


def test_a_stopped_loop_cancels_the_remaining_work(local, tmp_path):
    never = tmp_path / "never"

    def body(x):
        if x == 0:
            raise ValueError("first")
        return wait_for(never.exists)

    started = time.monotonic()
    with pytest.raises(IterationError, match="first"):
        foreach(x=range(8)).dopar(body)
    assert time.monotonic() - started < DEADLINE / 2
    assert foreach(x=range(4)).dopar(lambda x: x) == [0, 1, 2, 3]


def test_a_result_that_cannot_be_sent_back_fails_its_iteration(local):
    result = foreach(x=range(3), errorhandling="pass").dopar(
        lambda x: Anchor() if x == 1 else x
    )
    assert result[0] == 0 and result[2] == 2
    assert isinstance(result[1], SerializationError)
    assert "iteration 1" in str(result[1])


def test_large_values_both_ways(local):
    data = [bytes([i]) * (4 << 20) for i in range(6)]
    result = foreach(x=data, chunksize=2).dopar(lambda x: x + x[:1])
    assert [len(r) for r in result] == [(4 << 20) + 1] * 6
    assert [r[-1] for r in result] == list(range(6))


# -- what the body may be ---------------------------------------------------------------


def test_closures_lambdas_and_classes_of_the_test_module(local):
    offset = 100

    def closure(x):
        return x + offset

    class Local:
        def __init__(self, value):
            self.value = value

        def doubled(self):
            return self.value * 2

    def recursive(n):
        return 1 if n <= 1 else n * recursive(n - 1)

    assert foreach(x=range(3)).dopar(closure) == [100, 101, 102]
    assert foreach(x=range(3)).dopar(lambda x: x - offset) == [-100, -99, -98]
    assert foreach(x=range(3)).dopar(lambda x: Local(x).doubled()) == [0, 2, 4]
    assert foreach(n=range(5)).dopar(recursive) == [1, 1, 2, 6, 24]
    points = foreach(x=range(3), y=[5, -6, 7]).dopar(Point)
    assert points == [Point(0, 5), Point(1, -6), Point(2, 7)]
    assert foreach(p=points).dopar(lambda p: p.norm1()) == [5, 7, 9]
    assert foreach(x=range(3)).dopar(Scaler(3).scale) == [0, 3, 6]
    assert foreach(x=range(3)).dopar(Scaler(10)) == [10, 11, 12]


def test_a_nested_dopar_on_the_same_backend_is_refused(local):
    def combine(acc, value):
        foreach(y=range(2)).dopar(lambda y: y)
        return acc + value

    with pytest.raises(PforeachError, match="already running"):
        foreach(x=range(3), combine=combine).dopar(lambda x: x)
    assert foreach(x=range(3), combine="sum").dopar(lambda x: x) == 3


# -- lifecycle --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [((0,), {}), ((-2,), {}), ((True,), {}), ((1.5,), {}), ((2,), {"prefetch": 0})],
)
def test_bad_constructor_arguments(args, kwargs):
    with pytest.raises(ValueError):
        LocalBackend(*args, **kwargs)


def test_close_and_run_again():
    with LocalBackend(1) as backend:
        assert backend.workers() == 1
        previous = registered_backend()
        register_backend(backend)
        try:
            first = foreach(x=range(3)).dopar(lambda x: os.getpid())
            assert len(set(first)) == 1
            backend.close()
            second = foreach(x=range(3)).dopar(lambda x: os.getpid())
            assert len(set(second)) == 1
            assert second[0] != first[0]
        finally:
            register_backend(previous)


def test_workers_start_from_any_working_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with LocalBackend(1) as backend:
        previous = registered_backend()
        register_backend(backend)
        try:
            loop = foreach(x=range(2), max_attempts=1)
            assert loop.dopar(lambda x: os.getcwd()) == [str(tmp_path)] * 2
        finally:
            register_backend(previous)
