"""The foreach builder: iterables, options, running, nesting, bad input, registry."""

# Tests take the imported `backend` fixture as a parameter of the same name.
# ruff: noqa: F811

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Iterator

import pytest
from backend_fixtures import backend  # noqa: F401
from tqdm.std import tqdm as std_tqdm

import pforeach
import pforeach.backends
import pforeach.loop
from pforeach import (
    Foreach,
    IterationError,
    LocalBackend,
    OptionError,
    PforeachError,
    SequentialBackend,
    UnknownBackendError,
    foreach,
    get_backend,
    get_overrides,
    register_backend,
    registered_backend,
    set_options,
    times,
    workers,
)

pytestmark = pytest.mark.timeout(60)


def square(x):
    return x * x


def fail_on_three(x):
    if x == 3:
        raise ValueError("three")
    return x


class Counted:
    """An iterable of 0, 1, 2, ... that records how many items were taken."""

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.taken = 0

    def __iter__(self) -> Iterator[int]:
        for value in itertools.count():
            if self.limit is not None and value >= self.limit:
                return
            self.taken += 1
            yield value


# -- iterables -----------------------------------------------------------------


def test_single_iterable(backend):
    assert foreach(x=range(5)).dopar(square) == [0, 1, 4, 9, 16]


def test_several_iterables_zip_to_the_shortest(backend):
    result = foreach(a=range(5), b="xyz", c=[10, 20, 30, 40]).dopar(
        lambda a, b, c: f"{a}{b}{c}"
    )
    assert result == ["0x10", "1y20", "2z30"]


def test_infinite_generator_zipped_with_a_range(backend):
    result = foreach(i=itertools.count(100), j=range(5)).dopar(lambda i, j: i - j)
    assert result == [100] * 5


def test_generator_is_consumed_lazily(backend):
    source = Counted(limit=1000)
    taken_at_first_combine = []

    def combine(acc, value):
        if not taken_at_first_combine:
            taken_at_first_combine.append(source.taken)
        return acc + value

    loop = foreach(x=iter(source), combine=combine, init=0, inorder=False)
    assert loop.dopar(lambda x: x) == sum(range(1000))
    # Combined as soon as it arrives, the first result finds the generator
    # barely started: a backend draws only the tasks it keeps in flight.
    assert 1 <= taken_at_first_combine[0] <= 64


def test_an_endless_generator_stops_with_the_loop(backend):
    source = Counted()

    def body(x):
        raise ValueError(f"stop at {x}")

    with pytest.raises(IterationError, match="stop at"):
        foreach(x=iter(source)).dopar(body)
    # The first failure to arrive ends the loop; only the tasks in flight by
    # then were drawn from the generator.
    assert 1 <= source.taken <= 64


def test_mapping_names_a_variable_that_is_also_an_option(backend):
    assert foreach({"seed": [1, 2, 3]}).dopar(lambda seed: seed * 2) == [2, 4, 6]


def test_empty_iterable(backend):
    assert foreach(x=[]).dopar(square) == []


# -- options and immutability ----------------------------------------------------


def test_options_as_keywords_and_as_chained_methods_agree(backend):
    by_keyword = foreach(x=range(5), combine="sum", init=100, final=str)
    chained = foreach(x=range(5)).combine("sum").init(100).final(str)
    assert by_keyword.dopar(square) == chained.dopar(square) == "130"


def test_chaining_returns_a_new_builder_and_leaves_the_original_alone():
    base = foreach(x=range(4))
    derived = (
        base.combine("sum")
        .init(10)
        .final(lambda v: -v)
        .chunksize(3)
        .errorhandling("remove")
        .when(lambda x: x > 0)
    )
    assert isinstance(derived, Foreach)
    assert derived is not base
    assert derived.do(square) == -(10 + 1 + 4 + 9)
    assert base.do(square) == [0, 1, 4, 9]
    with pytest.raises(IterationError):
        base.do(fail_on_three)


def test_every_option_has_a_chained_method():
    loop = foreach(x=range(3))
    for name in pforeach.options.OPTION_NAMES:
        assert callable(getattr(loop, name)), name


def test_options_method_validates_and_rejects_unknown_names():
    with pytest.raises(OptionError, match="unknown option 'chunk'"):
        foreach(x=range(3)).options(chunk=2)


def test_variables_and_repr():
    loop = foreach(a=range(2), b=range(2)).nest(foreach(c=range(2)))
    assert loop.variables == ("a", "b", "c")
    assert repr(loop) == "<foreach(a, b) % foreach(c)>"


# -- running -----------------------------------------------------------------------


def test_do_runs_in_this_process_whatever_is_registered(backend):
    pids = foreach(x=range(4)).do(lambda x: os.getpid())
    assert pids == [os.getpid()] * 4


def test_dopar_as_a_decorator_binds_the_result(backend):
    @foreach(j=range(10), combine=sum).dopar
    def total(j):
        return j * j

    assert total == 285


def test_body_receives_loop_variables_as_keywords(backend):
    def body(*, b, a):
        return a - b

    assert foreach(a=[10, 20], b=[1, 2]).dopar(body) == [9, 18]
    assert foreach(a=[1], b=[2]).dopar(lambda **kw: sorted(kw.items())) == [
        [("a", 1), ("b", 2)]
    ]


def test_body_with_defaults_for_extra_parameters(backend):
    assert foreach(x=range(3)).dopar(lambda x, k=10: x + k) == [10, 11, 12]


@pytest.mark.parametrize(
    ("body", "missing"),
    [
        (lambda y: y, "x"),
        (lambda: 1, "x"),
        (lambda x, y: x, "y"),
    ],
)
def test_body_that_does_not_match_the_variables_is_refused(backend, body, missing):
    source = Counted()
    loop = foreach(x=iter(source))
    with pytest.raises(OptionError) as info:
        loop.dopar(body)
    message = str(info.value)
    assert "x" in message
    assert missing in message
    assert source.taken == 0


def test_non_callable_body_is_refused_before_any_work(backend):
    source = Counted()
    with pytest.raises(OptionError, match="callable"):
        foreach(x=iter(source)).dopar(42)
    assert source.taken == 0


def test_times(backend):
    assert times(3).dopar(lambda: "hi") == ["hi", "hi", "hi"]
    assert times(4, combine="sum").dopar(lambda: 2) == 8
    assert times(0).dopar(lambda: 1) == []
    with pytest.raises(OptionError):
        times(2).dopar(lambda x: x)


@pytest.mark.parametrize("n", [-1, 2.5, True, "3"])
def test_times_needs_a_non_negative_integer(n):
    with pytest.raises(OptionError):
        times(n)


def test_when_filters_iterations(backend):
    loop = foreach(x=range(10)).when(lambda x: x % 3 == 0)
    assert loop.dopar(square) == [0, 9, 36, 81]


def test_when_predicate_may_name_some_variables_or_take_kwargs(backend):
    loop = foreach(a=range(6), b=range(10, 16))
    assert loop.when(lambda b: b % 2 == 0).dopar(lambda a, b: a) == [0, 2, 4]
    assert loop.when(lambda **v: v["a"] > 3).dopar(lambda a, b: b) == [14, 15]


def test_chained_whens_must_all_hold(backend):
    loop = foreach(x=range(20)).when(lambda x: x % 2 == 0).when(lambda x: x % 3 == 0)
    assert loop.dopar(lambda x: x) == [0, 6, 12, 18]


def test_when_needs_a_callable():
    with pytest.raises(OptionError):
        foreach(x=range(3)).when(True)


def test_progress_bar_reaches_the_total(backend, monkeypatch, capsys):
    bars = []

    class RecordingBar(std_tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append((self, kwargs.get("disable", False)))

    monkeypatch.setattr(pforeach.loop, "tqdm", RecordingBar)
    assert foreach(x=range(12), chunksize=5, progress=True).dopar(square)[-1] == 121
    [(bar, disabled)] = bars
    assert (bar.n, bar.total, disabled) == (12, 12, False)
    assert "pforeach" in capsys.readouterr().err

    bars.clear()
    foreach(x=iter(range(7))).progress().dopar(square)
    [(bar, disabled)] = bars
    assert (bar.n, bar.total, disabled) == (7, None, False)
    assert "pforeach" in capsys.readouterr().err

    bars.clear()
    foreach(x=range(3)).dopar(square)
    [(bar, disabled)] = bars
    assert disabled is True
    assert capsys.readouterr().err == ""


# -- nesting -----------------------------------------------------------------------


def test_nest_gives_one_value_per_outer_iteration(backend):
    loop = foreach(i=range(3)).nest(foreach(j=range(2)))
    assert loop.dopar(lambda i, j: (i, j)) == [
        [(0, 0), (0, 1)],
        [(1, 0), (1, 1)],
        [(2, 0), (2, 1)],
    ]


def test_nest_each_level_combines_with_its_own_options(backend):
    inner_sum = foreach(i=range(3)).nest(foreach(j=range(4), combine="sum"))
    assert inner_sum.dopar(lambda i, j: i * j) == [0, 6, 12]
    both = foreach(i=range(3), combine="sum").nest(foreach(j=range(4), combine="sum"))
    assert both.dopar(lambda i, j: i * j) == 18
    finals = foreach(i=range(2), final=tuple).nest(foreach(j=range(2), final=tuple))
    assert finals.dopar(lambda i, j: i + j) == ((0, 1), (1, 2))


def test_nest_inner_iterable_from_outer_variables(backend):
    loop = foreach(i=range(4)).nest(foreach(j=lambda i: range(i), combine="sum"))
    assert loop.dopar(lambda i, j: j) == [0, 0, 1, 3]
    ragged = foreach(i=range(3)).nest(foreach(j=lambda i: range(i)))
    assert ragged.dopar(lambda i, j: j) == [[], [0], [0, 1]]


def test_nest_operator_and_three_levels(backend):
    loop = foreach(a=range(2)) % foreach(b=range(2)) % foreach(c=range(2))
    assert loop.dopar(lambda a, b, c: 4 * a + 2 * b + c) == [
        [[0, 1], [2, 3]],
        [[4, 5], [6, 7]],
    ]


def test_when_on_a_nested_loop_filters_the_innermost_level(backend):
    loop = (foreach(i=range(3)) % foreach(j=range(3))).when(lambda i, j: i != j)
    assert loop.dopar(lambda i, j: j) == [[1, 2], [0, 2], [0, 1]]


def test_when_before_nest_filters_the_outer_level(backend):
    loop = foreach(i=range(4)).when(lambda i: i % 2 == 1).nest(foreach(j=range(2)))
    assert loop.dopar(lambda i, j: (i, j)) == [[(1, 0), (1, 1)], [(3, 0), (3, 1)]]


def test_nested_loop_with_chunks_that_do_not_divide(backend):
    loop = foreach(i=range(5)).nest(foreach(j=range(3))).chunksize(4)
    assert loop.dopar(lambda i, j: i * 10 + j) == [
        [i * 10 + j for j in range(3)] for i in range(5)
    ]


def test_combine_options_of_a_nested_loop_apply_to_the_outer_level(backend):
    loop = foreach(i=range(3)).nest(foreach(j=range(2))).combine("concat")
    assert loop.dopar(lambda i, j: (i, j)) == [
        (i, j) for i in range(3) for j in range(2)
    ]


def test_nest_refusals():
    with pytest.raises(OptionError, match="reuse"):
        foreach(i=range(2)).nest(foreach(i=range(2)))
    with pytest.raises(OptionError):
        foreach(i=range(2)).nest(range(2))
    with pytest.raises(OptionError, match="reduce"):
        foreach(i=range(2), reduce=len).nest(foreach(j=range(2)))


def test_inner_callable_returning_a_non_iterable_fails_and_backend_recovers(backend):
    loop = foreach(i=range(3)).nest(foreach(j=lambda i: 5))
    with pytest.raises(OptionError, match="not iterable"):
        loop.dopar(lambda i, j: j)
    assert foreach(x=range(4)).dopar(square) == [0, 1, 4, 9]


# -- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((), {"x": 5}, "not iterable"),
        ((), {"x": None}, "not iterable"),
        ((), {}, "at least one loop variable"),
        ((), {"combine": "sum"}, "at least one loop variable"),
        ((range(3),), {}, "name=iterable"),
        (({"1x": [1]},), {}, "identifiers"),
        ((), {"x": [1], "chunksize": 0}, "chunksize"),
        ((), {"x": [1], "chunksize": 1.5}, "chunksize"),
        ((), {"x": [1], "maxcombine": 1}, "maxcombine"),
        ((), {"x": [1], "max_attempts": 0}, "max_attempts"),
        ((), {"x": [1], "errorhandling": "ignore"}, "errorhandling"),
        ((), {"x": [1], "inorder": "yes"}, "inorder"),
        ((), {"x": [1], "timeout": 0}, "timeout"),
        ((), {"x": [1], "seed": "abc"}, "seed"),
        ((), {"x": [1], "final": 3}, "final"),
        ((), {"x": [1], "worker_init": "init"}, "worker_init"),
        ((), {"x": [1], "combine": 3}, "combine"),
        ((), {"x": [1], "packages": [1]}, "packages"),
        ((), {"x": [1], "export": {"not valid": 1}}, "export"),
    ],
)
def test_bad_input_is_refused_when_the_loop_is_built(args, kwargs, match):
    with pytest.raises(OptionError, match=match):
        foreach(*args, **kwargs)


def test_unknown_combine_name_lists_the_valid_names():
    with pytest.raises(OptionError) as info:
        foreach(x=[1], combine="average")
    message = str(info.value)
    assert "'average'" in message
    for name in ("list", "sum", "product", "concat", "max", "min", "rbind", "cbind"):
        assert name in message


@pytest.mark.parametrize(
    ("method", "value"),
    [
        ("chunksize", 0),
        ("maxcombine", 1),
        ("errorhandling", "skip"),
        ("combine", "mean"),
        ("timeout", -1),
        ("max_attempts", 0),
    ],
)
def test_chained_methods_validate_too(method, value):
    with pytest.raises(OptionError):
        getattr(foreach(x=[1]), method)(value)


def test_option_errors_are_value_errors_and_pforeach_errors():
    with pytest.raises(ValueError):
        foreach(x=[1], chunksize=0)
    with pytest.raises(PforeachError):
        foreach(x=[1], chunksize=0)


def test_export_of_a_missing_name_is_refused_before_any_work(backend):
    source = Counted()
    with pytest.raises(OptionError, match="no_such_variable"):
        foreach(x=iter(source)).export("no_such_variable").dopar(square)
    assert source.taken == 0
    with pytest.raises(OptionError):
        foreach(x=[1]).export("a", b=2)


# -- registry -----------------------------------------------------------------------


@pytest.fixture
def no_backend(monkeypatch):
    """No backend registered, and the run-sequentially warning not given yet."""
    previous = registered_backend()
    register_backend(None)
    monkeypatch.setattr(pforeach.backends, "_warned", False)
    try:
        yield
    finally:
        register_backend(previous)


def test_dopar_without_a_backend_runs_sequentially_and_warns_once(no_backend):
    with pytest.warns(RuntimeWarning, match="no parallel backend") as caught:
        pids = foreach(x=range(3)).dopar(lambda x: os.getpid())
    assert caught[0].filename == __file__
    assert pids == [os.getpid()] * 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert foreach(x=range(3)).dopar(square) == [0, 1, 4]
    assert [w for w in caught if issubclass(w.category, RuntimeWarning)] == []


def test_get_backend_and_workers_without_registration(no_backend):
    assert registered_backend() is None
    assert isinstance(get_backend(), SequentialBackend)
    assert workers() == 1


def test_register_an_instance(no_backend):
    instance = SequentialBackend()
    assert register_backend(instance) is instance
    assert registered_backend() is instance
    assert get_backend() is instance
    assert register_backend(None) is None
    assert registered_backend() is None


@pytest.mark.parametrize("name", ["sequential", "seq"])
def test_register_sequential_by_name(no_backend, name):
    made = register_backend(name)
    assert isinstance(made, SequentialBackend)
    assert get_backend() is made
    assert workers() == 1


def test_register_local_by_name(no_backend):
    made = register_backend("local", 3)
    try:
        assert isinstance(made, LocalBackend)
        assert get_backend() is made
        assert workers() == 3
    finally:
        made.close()
    default = register_backend("local")
    try:
        assert default.workers() == (os.cpu_count() or 1)
    finally:
        default.close()


def test_unknown_backend_name_lists_the_backends(no_backend):
    with pytest.raises(UnknownBackendError) as info:
        register_backend("threads")
    message = str(info.value)
    assert "'threads'" in message
    for name in ("sequential", "local", "redis"):
        assert name in message
    assert isinstance(info.value, LookupError)
    assert registered_backend() is None


def test_register_something_that_is_not_a_backend(no_backend):
    with pytest.raises(UnknownBackendError):
        register_backend(object())
    assert registered_backend() is None


def test_workers_reports_the_registered_backend(backend):
    assert workers() == backend.workers()
    assert get_backend() is backend


# -- set_options ----------------------------------------------------------------------


@pytest.fixture
def clean_overrides():
    """Whatever a test overrides is undone after it."""
    with set_options():
        yield


def test_set_options_overrides_the_loop_and_restores_as_a_context(
    backend, clean_overrides
):
    loop = foreach(x=range(5), errorhandling="stop")
    with set_options(errorhandling="pass"):
        assert get_overrides() == {"errorhandling": "pass"}
        result = loop.dopar(fail_on_three)
    assert result[:3] == [0, 1, 2]
    assert isinstance(result[3], ValueError)
    assert result[4] == 4
    assert get_overrides() == {}
    with pytest.raises(IterationError):
        loop.dopar(fail_on_three)


def test_set_options_chunksize_reaches_a_loop_that_sets_its_own(
    backend, clean_overrides
):
    loop = foreach(x=range(7), chunksize=1, reduce=len)
    assert loop.dopar(lambda x: x) == [1] * 7
    with set_options(chunksize=3):
        assert loop.dopar(lambda x: x) == [3, 3, 1]


def test_set_options_without_with_and_none_removes(clean_overrides):
    set_options(chunksize=4, progress=False)
    assert get_overrides() == {"chunksize": 4, "progress": False}
    set_options(chunksize=None)
    assert get_overrides() == {"progress": False}


def test_nested_set_options_contexts(clean_overrides):
    with set_options(chunksize=2):
        with set_options(chunksize=5, verbose=False):
            assert get_overrides() == {"chunksize": 5, "verbose": False}
        assert get_overrides() == {"chunksize": 2}
    assert get_overrides() == {}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("combine", "sum"),
        ("init", 0),
        ("final", len),
        ("multicombine", True),
        ("maxcombine", 5),
    ],
)
def test_set_options_refuses_what_decides_the_result(clean_overrides, name, value):
    with pytest.raises(OptionError, match=name):
        set_options(**{name: value})
    assert get_overrides() == {}


def test_set_options_allows_inorder(clean_overrides):
    with set_options(inorder=False):
        assert get_overrides() == {"inorder": False}


@pytest.mark.parametrize(
    "overrides",
    [{"chunksize": 0}, {"errorhandling": "never"}, {"colour": "red"}],
)
def test_set_options_validates(clean_overrides, overrides):
    with pytest.raises(OptionError):
        set_options(**overrides)
    assert get_overrides() == {}


def test_set_options_packages_add_to_the_loop_own(backend, clean_overrides):
    loop = foreach(x=range(2), packages=["fractions"], errorhandling="pass")
    with set_options(packages=["no_such_module_for_pforeach_tests"]):
        result = loop.dopar(lambda x: x)
    assert all(isinstance(r, ImportError) for r in result)
    assert all("no_such_module_for_pforeach_tests" in str(r) for r in result)
    assert loop.dopar(lambda x: x) == [0, 1]
