"""Random numbers: the same draws on every backend, chunk size and worker count."""

# Tests take the imported `backend` fixture as a parameter of the same name.
# ruff: noqa: F811

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest
from backend_fixtures import append_line, backend, read_lines  # noqa: F401

from pforeach import (
    IterationError,
    LocalBackend,
    foreach,
    iteration_seed,
    register_backend,
    registered_backend,
)

pytestmark = pytest.mark.timeout(60)

N = 20


def draws(x):
    return (x, random.random(), random.randint(0, 10**9))


def numpy_draws(x):
    return (x, float(np.random.random()), int(np.random.randint(0, 2**31)))


def both_draws(x):
    return (random.random(), float(np.random.random()))


def reference(body, seed: int, **options):
    """The loop's value run sequentially after seeding the global generators."""
    random.seed(seed)
    np.random.seed(seed)
    return foreach(x=range(N), **options).do(body)


def run_seeded(body, seed: int, **options):
    random.seed(seed)
    np.random.seed(seed)
    return foreach(x=range(N), **options).dopar(body)


@pytest.mark.parametrize("chunksize", [1, 3, 7])
def test_global_seed_gives_the_same_draws_everywhere(backend, chunksize):
    expected = reference(draws, 2024)
    assert run_seeded(draws, 2024, chunksize=chunksize) == expected
    assert len({value for _, value, _ in expected}) == N


@pytest.mark.parametrize("chunksize", [1, 3, 7])
def test_numpy_global_seed_gives_the_same_draws_everywhere(backend, chunksize):
    expected = reference(numpy_draws, 77)
    assert run_seeded(numpy_draws, 77, chunksize=chunksize) == expected
    assert len({value for _, value, _ in expected}) == N


def test_draws_depend_on_the_seed_set_before_the_loop(backend):
    first = run_seeded(both_draws, 1)
    assert run_seeded(both_draws, 1) == first
    assert run_seeded(both_draws, 2) != first


def test_draws_do_not_depend_on_earlier_iterations_of_the_worker(backend):
    full = run_seeded(draws, 5)
    random.seed(5)
    np.random.seed(5)
    filtered = foreach(x=range(N)).when(lambda x: x < 4).dopar(draws)
    assert filtered == full[:4]


@pytest.fixture(scope="module")
def three_workers() -> Iterator[LocalBackend]:
    three = LocalBackend(3)
    try:
        yield three
    finally:
        three.close()


@pytest.mark.parametrize("chunksize", [1, 3, 7])
def test_worker_count_does_not_change_the_draws(three_workers, chunksize):
    expected = reference(both_draws, 99)
    previous = registered_backend()
    register_backend(three_workers)
    try:
        assert run_seeded(both_draws, 99, chunksize=chunksize) == expected
    finally:
        register_backend(previous)


def test_seed_option_ignores_the_global_state(backend):
    random.seed(1)
    np.random.seed(1)
    first = foreach(x=range(N), seed=42).dopar(both_draws)
    random.seed(2)
    np.random.seed(2)
    assert foreach(x=range(N)).seed(42).chunksize(3).dopar(both_draws) == first
    assert foreach(x=range(N), seed=42).do(both_draws) == first
    assert foreach(x=range(N), seed=43).dopar(both_draws) != first


def test_seed_option_leaves_the_master_stream_alone(backend):
    random.seed(8)
    np.random.seed(8)
    foreach(x=range(5), seed=3).dopar(both_draws)
    after = (random.random(), float(np.random.random()))
    random.seed(8)
    np.random.seed(8)
    assert after == (random.random(), float(np.random.random()))


def test_master_next_draw_after_a_loop_is_the_same_on_every_backend(backend):
    def greedy(x):
        return [random.random() for _ in range(x)] + list(np.random.random(x))

    random.seed(31)
    np.random.seed(31)
    foreach(x=range(6)).do(lambda x: None)
    expected = (random.random(), float(np.random.random()))

    random.seed(31)
    np.random.seed(31)
    foreach(x=range(6), chunksize=4).dopar(greedy)
    assert (random.random(), float(np.random.random())) == expected

    random.seed(31)
    np.random.seed(31)
    with pytest.raises(IterationError):
        foreach(x=range(6)).dopar(lambda x: [*greedy(x), 1 / (x - 2)])
    assert (random.random(), float(np.random.random())) == expected


def test_seed_worker_replaces_the_default_seeding(backend):
    def small_seed(seed):
        random.seed(seed % 1000)

    def body(x):
        return (iteration_seed(), random.random())

    result = foreach(x=range(8), seed=5, seed_worker=small_seed).dopar(body)
    for seed, value in result:
        assert value == random.Random(seed % 1000).random()
    default = foreach(x=range(8), seed=5).dopar(body)
    assert [s for s, _ in default] == [s for s, _ in result]
    assert [v for _, v in default] != [v for _, v in result]


def test_seed_worker_that_ignores_the_seed(backend):
    def fixed(seed):
        random.seed(0)

    result = foreach(x=range(4)).seed_worker(fixed).dopar(lambda x: random.random())
    assert result == [random.Random(0).random()] * 4


def test_iteration_seed_is_per_iteration_and_reproducible(backend):
    def body(x):
        return (
            iteration_seed(),
            float(np.random.default_rng(iteration_seed()).random()),
        )

    first = foreach(x=range(N), seed=11).dopar(body)
    assert foreach(x=range(N), seed=11, chunksize=7).dopar(body) == first
    assert foreach(x=range(N), seed=11).do(body) == first
    assert len({seed for seed, _ in first}) == N
    assert all(isinstance(seed, int) for seed, _ in first)


def test_iteration_seed_outside_a_loop_body(backend):
    foreach(x=range(3)).dopar(lambda x: iteration_seed())
    with pytest.raises(RuntimeError, match="inside a loop body"):
        iteration_seed()


def test_iteration_seed_is_unavailable_in_worker_init(backend, tmp_path):
    foreach(x=range(4)).dopar(lambda x: iteration_seed())
    log = str(tmp_path / "init.log")

    def init():
        try:
            iteration_seed()
        except RuntimeError:
            append_line(log, "raised")
        else:
            append_line(log, "stale")

    foreach(x=range(4), worker_init=init).dopar(lambda x: x)
    assert set(read_lines(log)) == {"raised"}
