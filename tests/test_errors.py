"""errorhandling: 'stop' raises, 'remove' drops, 'pass' keeps the exception."""

# Tests take the imported `backend` fixture as a parameter of the same name.
# ruff: noqa: F811

from __future__ import annotations

import pytest
from backend_fixtures import backend  # noqa: F401

from pforeach import IterationError, PforeachError, RemoteError, foreach

pytestmark = pytest.mark.timeout(60)


class CustomError(Exception):
    """An exception of the test module's own, to check its type survives."""


class Anchor:
    """An object that refuses to be serialized."""

    def __reduce__(self):
        raise TypeError("an Anchor stays where it is")


class Unpicklable(Exception):
    """An exception that holds an Anchor, so it cannot leave the process."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.anchor = Anchor()


def fail_on_three(x):
    if x == 3:
        raise ValueError(f"bad value {x}")
    return x * 10


def fail_on_odd(x):
    if x % 2:
        raise CustomError(f"odd {x}")
    return x


def test_stop_raises_iteration_error_naming_the_iteration(backend):
    with pytest.raises(IterationError) as info:
        foreach(x=range(6)).dopar(fail_on_three)
    err = info.value
    assert isinstance(err, PforeachError)
    assert err.index == 3
    assert err.values == {"x": "3"}
    assert err.job_id
    message = str(err)
    assert "iteration 3 (x=3)" in message
    assert "ValueError: bad value 3" in message
    assert isinstance(err.__cause__, ValueError)
    assert str(err.__cause__) == "bad value 3"
    assert "fail_on_three" in err.remote_traceback
    assert "ValueError: bad value 3" in err.remote_traceback
    assert "Traceback where the body ran" in message


def test_stop_with_several_variables_and_chunks(backend):
    loop = foreach(x=range(10), label=[f"item-{i}" for i in range(10)], chunksize=4)
    with pytest.raises(IterationError) as info:
        loop.dopar(lambda x, label: fail_on_three(x))
    assert info.value.index == 3
    assert info.value.values == {"x": "3", "label": "'item-3'"}


def test_stop_index_counts_only_iterations_kept_by_when(backend):
    loop = foreach(x=range(10)).when(lambda x: x % 2 == 1)
    with pytest.raises(IterationError) as info:
        loop.dopar(fail_on_three)
    assert info.value.index == 1
    assert info.value.values == {"x": "3"}


def test_stop_keeps_the_type_of_a_module_exception(backend):
    with pytest.raises(IterationError) as info:
        foreach(x=[0, 2, 5]).dopar(fail_on_odd)
    assert type(info.value.__cause__) is CustomError
    assert str(info.value.__cause__) == "odd 5"


def test_unshippable_exception_is_replaced_by_remote_error(backend):
    def body(x):
        raise Unpicklable(f"locked {x}")

    with pytest.raises(IterationError) as info:
        foreach(x=[7]).dopar(body)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteError)
    assert cause.type_name.endswith("Unpicklable")
    assert "locked 7" in str(cause)
    assert "locked 7" in info.value.remote_traceback


def test_backend_is_usable_after_a_stopped_loop(backend):
    with pytest.raises(IterationError):
        foreach(x=range(20), chunksize=2).dopar(fail_on_three)
    assert foreach(x=range(20), combine="sum").dopar(lambda x: x) == 190


def test_remove_drops_failed_iterations(backend):
    kept = foreach(x=range(6), errorhandling="remove").dopar(fail_on_three)
    assert kept == [0, 10, 20, 40, 50]
    loop = foreach(x=range(8), chunksize=3, combine="sum").errorhandling("remove")
    assert loop.dopar(fail_on_odd) == 0 + 2 + 4 + 6


def test_remove_everything_gives_the_empty_value(backend):
    assert foreach(x=[1, 3], errorhandling="remove").dopar(fail_on_odd) == []
    loop = foreach(x=[1, 3], errorhandling="remove", combine="sum", init=4)
    assert loop.dopar(fail_on_odd) == 4


def test_remove_keeps_the_order_of_the_rest(backend):
    loop = foreach(x=range(12), chunksize=5, errorhandling="remove")
    kept = loop.combine(lambda a, b: [*a, b], init=[]).dopar(fail_on_odd)
    assert kept == [0, 2, 4, 6, 8, 10]


def test_pass_puts_the_exception_in_place(backend):
    result = foreach(x=range(5), chunksize=2, errorhandling="pass").dopar(fail_on_three)
    assert result[:3] == [0, 10, 20]
    assert result[4] == 40
    assert type(result[3]) is ValueError
    assert str(result[3]) == "bad value 3"


def test_pass_with_a_module_exception(backend):
    result = foreach(x=range(4)).errorhandling("pass").dopar(fail_on_odd)
    assert result[0] == 0 and result[2] == 2
    assert [type(r) for r in result[1::2]] == [CustomError, CustomError]
    assert [str(r) for r in result[1::2]] == ["odd 1", "odd 3"]


def test_errorhandling_in_a_nested_loop(backend):
    loop = foreach(i=range(3)).nest(foreach(j=range(4)))

    def body(i, j):
        if j == i:
            raise ValueError(f"{i}={j}")
        return (i, j)

    assert loop.errorhandling("remove").dopar(body) == [
        [(0, 1), (0, 2), (0, 3)],
        [(1, 0), (1, 2), (1, 3)],
        [(2, 0), (2, 1), (2, 3)],
    ]
    passed = loop.errorhandling("pass").dopar(body)
    assert [str(passed[i][i]) for i in range(3)] == ["0=0", "1=1", "2=2"]
    with pytest.raises(IterationError) as info:
        loop.dopar(body)
    assert info.value.values in (
        {"i": "0", "j": "0"},
        {"i": "1", "j": "1"},
        {"i": "2", "j": "2"},
    )


def test_errorhandling_with_a_per_task_reduce(backend):
    loop = foreach(x=range(8), chunksize=4, reduce=sum)
    assert loop.errorhandling("remove").dopar(fail_on_odd) == [0 + 2, 4 + 6]
    with pytest.raises(IterationError) as info:
        loop.dopar(fail_on_odd)
    assert type(info.value.__cause__) is CustomError


def test_failing_worker_init_fails_every_iteration(backend):
    def broken_init():
        raise RuntimeError("init failed")

    result = foreach(x=range(3), worker_init=broken_init, errorhandling="pass").dopar(
        lambda x: x
    )
    assert [type(r) for r in result] == [RuntimeError] * 3
    assert all("init failed" in str(r) for r in result)
    with pytest.raises(IterationError, match="init failed"):
        foreach(x=range(3), worker_init=broken_init).dopar(lambda x: x)


def test_missing_package_fails_every_iteration(backend):
    loop = foreach(x=range(3), packages=["no_such_package_xyz"], errorhandling="pass")
    result = loop.dopar(lambda x: x)
    assert all(isinstance(r, ImportError) for r in result)
    assert all("no_such_package_xyz" in str(r) for r in result)
