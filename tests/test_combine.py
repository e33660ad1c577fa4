"""Combining results: the Combiner classes themselves, then whole loops per backend."""

# Tests take the imported `backend` fixture as a parameter of the same name.
# ruff: noqa: F811

from __future__ import annotations

import builtins
import math

import numpy as np
import pytest
from backend_fixtures import backend  # noqa: F401
from hypothesis import given
from hypothesis import strategies as st

from pforeach import OptionError, foreach
from pforeach.combine import (
    ALIASES,
    NAMED,
    Combiner,
    CombineSpec,
    TreeCombiner,
    resolve,
)

pytestmark = pytest.mark.timeout(60)

DATA = [3, 1, 4, 1, 5, 9, 2, 6]


def identity(x):
    return x


def combined(spec: CombineSpec, values: list, order: list[int] | None = None):
    """Feeds ``values`` to a Combiner in the given arrival ``order``."""
    combiner = Combiner(spec)
    for position in order if order is not None else range(len(values)):
        combiner.add(position, values[position])
    return combiner.result()


# -- Combiner ---------------------------------------------------------------------


def test_combiner_collects_in_position_order_whatever_the_arrival():
    assert combined(CombineSpec(), list("abcde"), [4, 2, 0, 3, 1]) == list("abcde")


@given(st.permutations(range(12)))
def test_combiner_inorder_folds_in_order_for_any_arrival(order):
    spec = CombineSpec(combine=lambda a, b: a + b)
    assert combined(spec, list("abcdefghijkl"), order) == "abcdefghijkl"


@given(st.permutations(range(9)))
def test_combiner_not_inorder_folds_in_arrival_order(order):
    spec = CombineSpec(combine=lambda a, b: a + b, inorder=False)
    letters = list("abcdefghi")
    assert combined(spec, letters, order) == "".join(letters[p] for p in order)


def test_combiner_buffers_only_what_arrives_early():
    combiner = Combiner(CombineSpec(combine=lambda a, b: a + b))
    combiner.add(2, "c")
    combiner.add(1, "b")
    assert combiner.count == 0
    combiner.add(0, "a")
    assert combiner.count == 3
    assert combiner.result() == "abc"


def test_combiner_skip_leaves_a_hole():
    combiner = Combiner(CombineSpec())
    combiner.add(2, "c")
    combiner.skip(0)
    combiner.add(1, "b")
    assert combiner.result() == ["b", "c"]
    assert combiner.count == 2


def test_combiner_result_with_a_missing_position_is_an_error():
    combiner = Combiner(CombineSpec())
    combiner.add(0, "a")
    combiner.add(2, "c")
    with pytest.raises(RuntimeError, match="iteration 1 is missing"):
        combiner.result()


@pytest.mark.parametrize("maxcombine", [2, 3, 4, 7, 100])
@pytest.mark.parametrize("init", [None, 1000])
def test_combiner_multicombine_batches_at_most_maxcombine(maxcombine, init):
    calls = []

    def add_all(*args):
        calls.append(len(args))
        return sum(args)

    extra = {} if init is None else {"init": init}
    spec = CombineSpec(
        combine=add_all, multicombine=True, maxcombine=maxcombine, **extra
    )
    values = list(range(1, 21))
    assert combined(spec, values) == sum(values) + (init or 0)
    assert calls
    assert max(calls) <= maxcombine
    assert max(calls) == min(maxcombine, len(values) + (init is not None))


def test_combiner_binary_combine_gets_two_arguments():
    calls = []

    def pair(a, b):
        calls.append((a, b))
        return a * 10 + b

    assert combined(CombineSpec(combine=pair), [1, 2, 3]) == 123
    assert calls == [(1, 2), (12, 3)]
    calls.clear()
    assert combined(CombineSpec(combine=pair, init=9), [1, 2]) == 912
    assert calls == [(9, 1), (91, 2)]


def test_tree_combiner_nests_results_by_path():
    tree = TreeCombiner([CombineSpec(), CombineSpec(combine="sum")])
    tree.add((1, 1), 5)
    tree.add((0, 0), 1)
    tree.close((0,), 2)
    tree.add((1, 0), 4)
    tree.add((0, 1), 2)
    tree.close((1,), 2)
    tree.close((2,), 0)
    tree.close((), 3)
    assert tree.result() == [3, 9, 0]


def test_tree_combiner_skip():
    tree = TreeCombiner([CombineSpec(), CombineSpec()])
    tree.skip((0, 0))
    tree.add((0, 1), "b")
    tree.close((0,), 2)
    tree.close((), 1)
    assert tree.result() == [["b"]]


def test_resolve_names_aliases_and_builtins():
    for alias, name in ALIASES.items():
        assert resolve(alias) is NAMED[name]
    assert resolve(builtins.sum) is NAMED["sum"]
    assert resolve(builtins.max) is NAMED["max"]
    assert resolve(builtins.min) is NAMED["min"]
    assert resolve(builtins.list) is NAMED["list"]
    assert resolve(math.prod) is NAMED["product"]
    custom = lambda a, b: a  # noqa: E731
    assert resolve(custom) is custom


def test_resolve_refuses_unknown_names_and_non_callables():
    with pytest.raises(OptionError) as info:
        resolve("median")
    assert "concat" in str(info.value) and "rbind" in str(info.value)
    with pytest.raises(OptionError):
        resolve(42)
    with pytest.raises(OptionError):
        resolve([1, 2])


# -- loops --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("combine", "expected"),
    [
        ("list", DATA),
        ("sum", sum(DATA)),
        ("product", math.prod(DATA)),
        ("max", 9),
        ("min", 1),
        ("concat", DATA),
        ("c", DATA),
        ("prod", math.prod(DATA)),
        (builtins.sum, sum(DATA)),
        (builtins.max, 9),
        (builtins.min, 1),
        (builtins.list, DATA),
        (math.prod, math.prod(DATA)),
    ],
    ids=repr,
)
def test_named_and_builtin_combines(backend, combine, expected):
    assert foreach(x=DATA, combine=combine).dopar(identity) == expected


def test_concat_flattens_lists_and_tuples(backend):
    result = foreach(x=range(4), combine="concat").dopar(
        lambda x: [x] * x if x % 2 else (x, -x)
    )
    assert result == [0, 0, 1, 2, -2, 3, 3, 3]


def test_binary_callable_combine_in_order(backend):
    result = foreach(x=range(1, 8), chunksize=3).combine(lambda a, b: a * 10 + b)
    assert result.dopar(identity) == 1234567


def test_rbind_and_cbind(backend):
    rows = foreach(x=range(4), combine="rbind").dopar(lambda x: np.array([x, 10 * x]))
    np.testing.assert_array_equal(rows, [[0, 0], [1, 10], [2, 20], [3, 30]])
    cols = foreach(x=range(4), combine="cbind").dopar(lambda x: np.array([x, 10 * x]))
    np.testing.assert_array_equal(cols, [[0, 1, 2, 3], [0, 10, 20, 30]])
    stacked = foreach(x=range(2), combine="vstack", init=np.array([[7, 7]]))
    np.testing.assert_array_equal(
        stacked.dopar(lambda x: np.array([x, x])), [[7, 7], [0, 0], [1, 1]]
    )


def test_init_and_final(backend):
    assert foreach(x=range(5), combine="sum", init=100).dopar(identity) == 110
    assert foreach(x=range(3), init=["start"]).dopar(identity) == ["start", 0, 1, 2]
    concat = foreach(x=range(3), combine="concat", init=(9,))
    assert concat.dopar(identity) == [9, 0, 1, 2]
    assert foreach(x=[4, 2], combine="max", init=7).dopar(identity) == 7
    assert foreach(x=range(4), final=len).dopar(identity) == 4
    result = foreach(x=range(4), combine="sum", final=lambda s: s / 2).dopar(identity)
    assert result == 3
    with_init = foreach(x=range(3), combine=lambda a, b: f"{a}{b}", init="<")
    assert with_init.dopar(identity) == "<012"


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, []),
        ({"combine": "list"}, []),
        ({"combine": "sum"}, 0),
        ({"combine": builtins.sum}, 0),
        ({"combine": "product"}, 1),
        ({"combine": "concat"}, []),
        ({"combine": "sum", "init": 5}, 5),
        ({"combine": lambda a, b: a + b, "init": "seed"}, "seed"),
        ({"combine": "list", "init": [1]}, [1]),
        ({"final": len}, 0),
        ({"combine": "sum", "init": 2, "final": lambda v: v * 10}, 20),
    ],
    ids=repr,
)
def test_empty_loops(backend, options, expected):
    assert foreach(x=[], **options).dopar(identity) == expected
    assert (
        foreach(x=range(5), **options).when(lambda x: False).dopar(identity) == expected
    )


def test_empty_rbind_is_an_empty_array(backend):
    assert foreach(x=[], combine="rbind").dopar(identity).shape == (0, 0)


def test_inorder_true_keeps_iteration_order(backend):
    loop = foreach(x=range(30), chunksize=4, inorder=True)
    assert loop.combine(lambda acc, v: [*acc, v], init=[]).dopar(identity) == list(
        range(30)
    )


def test_inorder_false_with_an_order_sensitive_combine(backend):
    loop = foreach(x=range(30), chunksize=3).inorder(False)
    result = loop.combine(lambda acc, v: [*acc, v], init=[]).dopar(identity)
    assert sorted(result) == list(range(30))
    assert len(result) == 30
    assert sorted(foreach(x=range(30), inorder=False).dopar(identity)) == list(
        range(30)
    )


@pytest.mark.parametrize("maxcombine", [2, 3, 5])
def test_multicombine_calls_never_exceed_maxcombine(backend, maxcombine):
    calls = []

    def add_all(*args):
        calls.append(len(args))
        return sum(args)

    loop = foreach(x=range(1, 11), chunksize=3).multicombine(
        True, maxcombine=maxcombine
    )
    assert loop.combine(add_all).dopar(identity) == 55
    assert max(calls) == maxcombine
    assert min(calls) >= 2


def test_multicombine_maxcombine_method_and_init_counts(backend):
    calls = []

    def gather(*args):
        calls.append(len(args))
        return [
            item for arg in args for item in (arg if isinstance(arg, list) else [arg])
        ]

    loop = foreach(x=range(6), combine=gather, init=[], multicombine=True).maxcombine(4)
    assert loop.dopar(identity) == [0, 1, 2, 3, 4, 5]
    assert max(calls) == 4


def test_multicombine_is_ignored_by_named_combines(backend):
    assert foreach(x=range(5), combine="sum", multicombine=True).dopar(identity) == 10
