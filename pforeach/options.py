"""Loop options: their defaults, their validation, and global overrides.

Options come from three places, weakest first: the defaults below, the
options given to ``foreach`` (as keywords or chained methods), and the
overrides set with :func:`set_options`. Overrides win, so that a user can
steer loops that a library runs internally, where the user cannot reach the
``foreach`` call itself.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import OptionError

ERRORHANDLING = ("stop", "remove", "pass")

#: Options that shape how one level of a (possibly nested) loop combines its
#: results; every other option applies to the loop as a whole.
COMBINE_OPTIONS = ("combine", "init", "final", "inorder", "multicombine", "maxcombine")


class _Unset:
    """Marks an option that was not given (``None`` is a valid ``init``)."""

    _instance: _Unset | None = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET: Any = _Unset()


@dataclass(frozen=True)
class Options:
    """Every option of a loop, validated.

    See the user guide for what each one does; :func:`foreach` documents them
    as keyword arguments.
    """

    combine: Any = "list"
    init: Any = UNSET
    final: Callable[[Any], Any] | None = None
    inorder: bool = True
    multicombine: bool = False
    maxcombine: int = 100
    errorhandling: str = "stop"
    export: Mapping[str, Any] | tuple[str, ...] = ()
    noexport: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    chunksize: int = 1
    reduce: Callable[[list[Any]], Any] | None = None
    progress: bool = False
    seed: int | None = None
    seed_worker: Callable[[int], None] | None = None
    worker_init: Callable[[], None] | None = None
    verbose: bool = False
    timeout: float | None = None
    max_attempts: int = 3

    def replace(self, **changes: Any) -> Options:
        """A copy with ``changes`` applied and validated."""
        return make_options(self, **changes)


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(Options))


def _names(value: Any, option: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    try:
        names = tuple(value)
    except TypeError:
        raise OptionError(
            f"{option} takes a name or a list of names, not {type(value).__name__}"
        ) from None
    for name in names:
        if not isinstance(name, str):
            raise OptionError(f"{option} takes names (str); got {name!r}")
    return names


def _check(name: str, value: Any) -> Any:
    """Validates one option and returns its normalized value."""
    if name in ("inorder", "multicombine", "progress", "verbose"):
        if not isinstance(value, bool):
            raise OptionError(f"{name} must be True or False, not {value!r}")
    elif name in ("maxcombine", "chunksize", "max_attempts"):
        low = {"maxcombine": 2, "chunksize": 1, "max_attempts": 1}[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise OptionError(f"{name} must be an integer >= {low}, not {value!r}")
    elif name == "errorhandling":
        if value not in ERRORHANDLING:
            allowed = ", ".join(repr(e) for e in ERRORHANDLING)
            raise OptionError(f"errorhandling must be one of {allowed}, not {value!r}")
    elif name in ("final", "reduce", "seed_worker", "worker_init"):
        if value is not None and not callable(value):
            raise OptionError(f"{name} must be callable or None, not {value!r}")
    elif name == "timeout":
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0
        ):
            raise OptionError(f"timeout must be a number of seconds > 0, not {value!r}")
    elif name == "seed":
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int)
        ):
            raise OptionError(f"seed must be an int or None, not {value!r}")
    elif name == "export":
        if isinstance(value, Mapping):
            for key in value:
                if not isinstance(key, str) or not key.isidentifier():
                    raise OptionError(f"export names must be identifiers, not {key!r}")
            return dict(value)
        return _names(value, name)
    elif name in ("noexport", "packages"):
        return _names(value, name)
    elif name == "combine":
        from .combine import check_combine

        check_combine(value)
    return value


def make_options(base: Options | None = None, **changes: Any) -> Options:
    """Returns ``base`` (or the defaults) with ``changes`` validated and applied.

    Raises:
        OptionError: an unknown option or a value it does not accept.
    """
    base = base or Options()
    checked: dict[str, Any] = {}
    for name, value in changes.items():
        if name not in OPTION_NAMES:
            raise OptionError(
                f"unknown option {name!r}; the options are: {', '.join(OPTION_NAMES)}"
            )
        checked[name] = _check(name, value)
    return dataclasses.replace(base, **checked)


# -- global overrides ---------------------------------------------------------

_lock = threading.Lock()
_overrides: dict[str, Any] = {}


class _Restore:
    """Returned by set_options: usable as a context manager that undoes it."""

    def __init__(self, previous: dict[str, Any]) -> None:
        self._previous = previous

    def __enter__(self) -> _Restore:
        return self

    def __exit__(self, *exc: object) -> None:
        with _lock:
            _overrides.clear()
            _overrides.update(self._previous)


def set_options(**overrides: Any) -> _Restore:
    """Overrides loop options for every loop that runs from now on.

    Overrides take precedence over the options a loop gives itself, so they
    steer loops that run inside a library. ``export`` and ``packages`` add to
    the loop's own instead of replacing them. Used as a context manager, the
    previous overrides come back at the end of the ``with`` block.

    Args:
        **overrides: any option accepted by :func:`foreach` except those that
            decide the shape of the result (combine, init, final,
            multicombine, maxcombine). ``None`` removes an override.

    Returns:
        An object whose ``with`` block restores the previous overrides.

    Raises:
        OptionError: an unknown option, one that cannot be overridden, or a
            value it does not accept.

    Example:
        >>> with set_options(chunksize=10, progress=False):
        ...     pass
    """
    forbidden = [n for n in overrides if n in COMBINE_OPTIONS and n != "inorder"]
    if forbidden:
        raise OptionError(
            f"set_options cannot override {', '.join(forbidden)}: they decide "
            "what the loop returns"
        )
    to_set = {k: v for k, v in overrides.items() if v is not None}
    make_options(**to_set)  # validates
    with _lock:
        previous = dict(_overrides)
        for name, value in overrides.items():
            if value is None:
                _overrides.pop(name, None)
            else:
                _overrides[name] = value
    return _Restore(previous)


def get_overrides() -> dict[str, Any]:
    """The overrides in force (a copy)."""
    with _lock:
        return dict(_overrides)


def apply_overrides(options: Options) -> Options:
    """Applies the global overrides to a loop's own options."""
    overrides = get_overrides()
    if not overrides:
        return options
    if "export" in overrides:
        overrides["export"] = _merge_exports(options.export, overrides["export"])
    if "packages" in overrides:
        extra = _names(overrides["packages"], "packages")
        overrides["packages"] = tuple(dict.fromkeys(options.packages + extra))
    return make_options(options, **overrides)


def _merge_exports(own: Any, more: Any) -> Any:
    if isinstance(own, Mapping) or isinstance(more, Mapping):
        raise OptionError(
            "set_options(export=...) with a mapping cannot be merged with a "
            "loop's exports; give names instead"
        )
    return tuple(dict.fromkeys(tuple(own) + _names(more, "export")))
