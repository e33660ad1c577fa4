"""Combining results: the one place for ordering, batching, init and final.

A :class:`Combiner` folds the results of one loop level into one value as
they arrive. With ``inorder=True`` it combines in iteration order and buffers
only results that arrive ahead of a missing one; with ``inorder=False`` it
combines in arrival order and holds nothing but the accumulated value, so
``combine="sum"`` over a million iterations runs in constant memory.

A :class:`TreeCombiner` does the same for nested loops (``nest``): each
inner level's results are combined per outer iteration, and each finished
inner value feeds the level above it.
"""

from __future__ import annotations

import builtins
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import OptionError
from .options import UNSET


@dataclass(frozen=True)
class _Named:
    """A built-in combine: a binary fold or a collector, plus its empty value."""

    fold: Callable[[Any, Any], Any] | None
    empty: Callable[[], Any]
    finish: Callable[[list[Any]], Any] | None = None


def _stack(how: str) -> Callable[[list[Any]], Any]:
    def finish(values: list[Any]) -> Any:
        try:
            import numpy as np
        except ImportError:
            raise OptionError(f"combine={how!r} needs numpy installed") from None
        if not values:
            return np.empty((0, 0))
        return np.vstack(values) if how == "rbind" else np.column_stack(values)

    return finish


def _concat(acc: list[Any], value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        acc.extend(value)
    else:
        acc.append(value)
    return acc


NAMED: dict[str, _Named] = {
    "list": _Named(None, list, list),
    "sum": _Named(operator.add, lambda: 0),
    "product": _Named(operator.mul, lambda: 1),
    "max": _Named(builtins.max, lambda: None),
    "min": _Named(builtins.min, lambda: None),
    "concat": _Named(_concat, list),
    "rbind": _Named(None, list, _stack("rbind")),
    "cbind": _Named(None, list, _stack("cbind")),
}
ALIASES = {"c": "concat", "prod": "product", "vstack": "rbind", "hstack": "cbind"}

#: Python callables that do not take two arguments but name a combine.
_BUILTINS: dict[Any, str] = {
    builtins.sum: "sum",
    builtins.max: "max",
    builtins.min: "min",
    builtins.list: "list",
    math.prod: "product",
}


def resolve(combine: Any) -> _Named | Callable[..., Any]:
    """The combine behind a name, a builtin such as ``sum``, or a callable."""
    if isinstance(combine, str):
        name = ALIASES.get(combine, combine)
        if name not in NAMED:
            valid = ", ".join(sorted([*NAMED, *ALIASES]))
            raise OptionError(f"unknown combine {combine!r}; the names are: {valid}")
        return NAMED[name]
    try:
        builtin = _BUILTINS.get(combine)
    except TypeError:  # unhashable
        builtin = None
    if builtin is not None:
        return NAMED[builtin]
    if not callable(combine):
        raise OptionError(f"combine must be a name or a callable, not {combine!r}")
    return combine


def _iterable(value: Any) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return True


def check_combine(combine: Any) -> None:
    """Raises OptionError if ``combine`` is neither a known name nor callable."""
    resolve(combine)


@dataclass(frozen=True)
class CombineSpec:
    """How one loop level combines: the combine options of that level."""

    combine: Any = "list"
    init: Any = UNSET
    final: Callable[[Any], Any] | None = None
    inorder: bool = True
    multicombine: bool = False
    maxcombine: int = 100


_HOLE = object()  # an iteration dropped by errorhandling='remove'


class Combiner:
    """Folds one level's results, in order or as they arrive.

    Call :meth:`add` (or :meth:`skip`) exactly once per position
    0, 1, 2, ..., in any order, then :meth:`result`.
    """

    def __init__(self, spec: CombineSpec) -> None:
        self.spec = spec
        how = resolve(spec.combine)
        self._collect: Callable[[list[Any]], Any] | None = None
        self._fold: Callable[..., Any] | None
        self._multi = spec.multicombine
        if isinstance(how, _Named):
            self._empty = how.empty
            self._collect = how.finish if how.fold is None else None
            self._fold = how.fold
            self._multi = False  # built-in folds are applied pairwise
        else:
            self._empty = lambda: None
            self._fold = how
        self._values: list[Any] = []  # collected values, or the multicombine batch
        self._acc: Any = spec.init
        needs_items = how is NAMED["list"] or self._fold is _concat
        if needs_items and spec.init is not UNSET and not _iterable(spec.init):
            raise OptionError(
                f"init must be a list (or another iterable) for combine={spec.combine!r}, "
                f"not {spec.init!r}"
            )
        if self._collect is not None and spec.init is not UNSET:
            # A list starts from init's items; a stack starts with init's rows.
            self._values = list(spec.init) if how is NAMED["list"] else [spec.init]
            self._acc = UNSET
        elif self._fold is _concat:
            self._acc = [] if spec.init is UNSET else list(spec.init)
        self._pending: dict[int, Any] = {}
        self._next = 0
        self.count = 0

    def add(self, position: int, value: Any) -> None:
        """Adds the result of the iteration at ``position``."""
        if not self.spec.inorder:
            self._feed(value)
            return
        if position != self._next:
            self._pending[position] = value
            return
        self._feed(value)
        self._next += 1
        pending = self._pending
        while self._next in pending:
            self._feed(pending.pop(self._next))
            self._next += 1

    def skip(self, position: int) -> None:
        """Marks ``position`` as having no result (errorhandling='remove')."""
        self.add(position, _HOLE)

    def _feed(self, value: Any) -> None:
        if value is _HOLE:
            return
        self.count += 1
        if self._collect is not None:
            self._values.append(value)
        elif self._multi:
            self._values.append(value)
            room = self.spec.maxcombine - (self._acc is not UNSET)
            if len(self._values) >= room:
                self._flush()
        elif self._acc is UNSET:
            self._acc = value
        else:
            assert self._fold is not None
            self._acc = self._fold(self._acc, value)

    def _flush(self) -> None:
        if not self._values:
            return
        assert self._fold is not None
        args = self._values if self._acc is UNSET else [self._acc, *self._values]
        self._values = []
        self._acc = args[0] if len(args) == 1 else self._fold(*args)

    def result(self) -> Any:
        """The combined value, with ``final`` applied."""
        if self._pending:
            missing = self._next
            raise RuntimeError(f"combine finished while iteration {missing} is missing")
        if self._collect is not None:
            value = self._collect(self._values)
        else:
            self._flush()
            value = self._empty() if self._acc is UNSET else self._acc
        return self.spec.final(value) if self.spec.final is not None else value


class TreeCombiner:
    """Combines a nested loop: one :class:`Combiner` per unfinished prefix.

    Results arrive with a *path*, one position per level. When a prefix has
    received as many results as :meth:`close` said it has children, its
    combined value is added to its parent, up to the root.
    """

    def __init__(self, specs: list[CombineSpec]) -> None:
        self.specs = specs
        self._combiners: dict[tuple[int, ...], Combiner] = {}
        self._expected: dict[tuple[int, ...], int] = {}
        self._received: dict[tuple[int, ...], int] = {}

    def _combiner(self, prefix: tuple[int, ...]) -> Combiner:
        found = self._combiners.get(prefix)
        if found is None:
            found = self._combiners[prefix] = Combiner(self.specs[len(prefix)])
        return found

    def add(self, path: tuple[int, ...], value: Any) -> None:
        """Adds the result at ``path`` (``_HOLE`` for a removed iteration)."""
        prefix = path[:-1]
        self._combiner(prefix).add(path[-1], value)
        self._received[prefix] = self._received.get(prefix, 0) + 1
        self._complete(prefix)

    def skip(self, path: tuple[int, ...]) -> None:
        self.add(path, _HOLE)

    def close(self, prefix: tuple[int, ...], count: int) -> None:
        """Says that ``prefix`` has ``count`` children in all."""
        self._expected[prefix] = count
        self._combiner(prefix)
        self._received.setdefault(prefix, 0)
        self._complete(prefix)

    def _complete(self, prefix: tuple[int, ...]) -> None:
        if not prefix or self._expected.get(prefix) != self._received.get(prefix):
            return
        del self._expected[prefix], self._received[prefix]
        value = self._combiners.pop(prefix).result()
        self.add(prefix, value)

    def result(self) -> Any:
        return self._combiner(()).result()
