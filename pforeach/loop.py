"""The loop: the ``foreach`` builder, iteration, filtering, nesting, running.

``foreach(...)`` returns an immutable :class:`Foreach`. Its chained methods
return new builders; ``dopar`` runs the loop on the registered backend and
``do`` runs it sequentially. Running a loop takes four steps::

    variables  --when-->  iterations  --chunksize-->  tasks  --backend-->
    task results  --errorhandling, combine-->  value

The backend only runs tasks; everything else happens here and in
:mod:`pforeach.combine`, so every backend gives the same answer.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

from tqdm.auto import tqdm

from .combine import Combiner, CombineSpec, TreeCombiner
from .errors import OptionError
from .job import Failure, Job, JobEnv, TaskResult, bind_exports, make_tasks
from .options import (
    COMBINE_OPTIONS,
    OPTION_NAMES,
    Options,
    apply_overrides,
    make_options,
)
from .rng import SeedPlan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Level:
    """One ``foreach`` of a possibly nested loop."""

    names: tuple[str, ...]
    iterables: tuple[Any, ...]
    spec: CombineSpec
    when: Callable[..., bool] | None = None


def _spec(options: Options) -> CombineSpec:
    spec = CombineSpec(**{name: getattr(options, name) for name in COMBINE_OPTIONS})
    Combiner(spec)  # checks combine and init together, before anything runs
    return spec


class Foreach:
    """An immutable description of a loop; see :func:`foreach`.

    Every option has a chained method of the same name that returns a new
    builder, for example ``foreach(x=data).combine("sum").chunksize(10)``.
    """

    __slots__ = ("_levels", "_options")

    def __init__(self, levels: tuple[_Level, ...], options: Options) -> None:
        self._levels = levels
        self._options = options

    # -- building --------------------------------------------------------------

    def options(self, **changes: Any) -> Foreach:
        """A new builder with ``changes`` applied to this loop's options.

        Combine options (combine, init, final, inorder, multicombine,
        maxcombine) apply to the outermost level of a nested loop.
        """
        options = make_options(self._options, **changes)
        levels = self._levels
        if any(name in COMBINE_OPTIONS for name in changes):
            levels = (
                _Level(
                    levels[0].names, levels[0].iterables, _spec(options), levels[0].when
                ),
                *levels[1:],
            )
        return Foreach(levels, options)

    def combine(self, combine: Any, **more: Any) -> Foreach:
        """How results are put together: a name, ``sum``-like builtin, or callable."""
        return self.options(combine=combine, **more)

    def init(self, value: Any) -> Foreach:
        """The value combining starts from."""
        return self.options(init=value)

    def final(self, func: Callable[[Any], Any]) -> Foreach:
        """A function applied to the combined value."""
        return self.options(final=func)

    def inorder(self, flag: bool = True) -> Foreach:
        """Combine in iteration order (True) or as results arrive (False)."""
        return self.options(inorder=flag)

    def multicombine(self, flag: bool = True, maxcombine: int | None = None) -> Foreach:
        """Call combine with up to ``maxcombine`` values at once."""
        extra = {} if maxcombine is None else {"maxcombine": maxcombine}
        return self.options(multicombine=flag, **extra)

    def maxcombine(self, n: int) -> Foreach:
        """The most arguments one multicombine call receives."""
        return self.options(maxcombine=n)

    def errorhandling(self, how: str) -> Foreach:
        """'stop' raises, 'remove' drops failed iterations, 'pass' keeps the error."""
        return self.options(errorhandling=how)

    def export(self, *names: str, **values: Any) -> Foreach:
        """Ship these variables (by name, or as name=value) with the job."""
        if names and values:
            raise OptionError("export takes names or name=value pairs, not both")
        return self.options(export=values if values else names)

    def noexport(self, *names: str) -> Foreach:
        """Do not ship these globals; the worker must provide them."""
        return self.options(noexport=names)

    def packages(self, *names: str) -> Foreach:
        """Modules to import on each worker before the job's first task."""
        return self.options(packages=names)

    def chunksize(self, n: int) -> Foreach:
        """The most iterations one task holds."""
        return self.options(chunksize=n)

    def reduce(self, func: Callable[[list[Any]], Any]) -> Foreach:
        """Reduce each task's list of results to one value, on the worker."""
        return self.options(reduce=func)

    def progress(self, flag: bool = True) -> Foreach:
        """Show a progress bar."""
        return self.options(progress=flag)

    def seed(self, seed: int | None) -> Foreach:
        """Seed the loop's random numbers (instead of the global generators)."""
        return self.options(seed=seed)

    def seed_worker(self, func: Callable[[int], None] | None) -> Foreach:
        """Replace per-iteration seeding with ``func(iteration_seed)``."""
        return self.options(seed_worker=func)

    def worker_init(self, func: Callable[[], None] | None) -> Foreach:
        """Run ``func()`` once per job on each worker, before its first task."""
        return self.options(worker_init=func)

    def verbose(self, flag: bool = True) -> Foreach:
        """Log what the loop does to standard error."""
        return self.options(verbose=flag)

    def timeout(self, seconds: float | None) -> Foreach:
        """Stop a task that runs longer; its iterations fail with TaskTimeoutError."""
        return self.options(timeout=seconds)

    def max_attempts(self, n: int) -> Foreach:
        """How many times a task whose worker died is tried before it fails."""
        return self.options(max_attempts=n)

    def when(self, predicate: Callable[..., bool]) -> Foreach:
        """Keep only iterations for which ``predicate(**variables)`` is true.

        The predicate receives the loop variables it names as parameters (all
        of them if it takes ``**kwargs``). On a nested loop it filters the
        innermost level and sees the variables of every level.
        """
        if not callable(predicate):
            raise OptionError(f"when() takes a callable, not {predicate!r}")
        last = self._levels[-1]
        previous = last.when
        if previous is not None:
            first = previous

            def both(**variables: Any) -> bool:
                return _call_with(first, variables) and _call_with(predicate, variables)

            combined: Callable[..., bool] = both
        else:
            combined = predicate
        new_last = _Level(last.names, last.iterables, last.spec, combined)
        return Foreach((*self._levels[:-1], new_last), self._options)

    def nest(self, inner: Foreach) -> Foreach:
        """Nest ``inner`` in this loop, as R's ``%:%`` does.

        The result runs the body once per combination of the variables of
        both loops, as one job. Each level combines with its own options; the
        loop-wide options (chunksize, export, ...) are this loop's. An inner
        iterable may be a callable that receives the outer variables and
        returns the iterable, for loops like ``for i ...: for j in range(i)``.
        """
        if not isinstance(inner, Foreach):
            raise OptionError(f"nest() takes a foreach(...) loop, not {inner!r}")
        clash = set(self.variables) & set(inner.variables)
        if clash:
            raise OptionError(f"nested loops reuse variable names: {sorted(clash)}")
        if self._options.reduce is not None or inner._options.reduce is not None:
            raise OptionError("reduce cannot be used with nested loops")
        return Foreach(self._levels + inner._levels, self._options)

    __mod__ = nest  # foreach(i=a) % foreach(j=b), the closest thing to %:%

    @property
    def variables(self) -> tuple[str, ...]:
        """The names of the loop variables, outermost first."""
        return tuple(name for level in self._levels for name in level.names)

    def __repr__(self) -> str:
        loops = " % ".join(f"foreach({', '.join(lv.names)})" for lv in self._levels)
        return f"<{loops}>"

    # -- running ---------------------------------------------------------------

    def dopar(self, body: Callable[..., Any]) -> Any:
        """Runs the loop on the registered backend and returns the combined value.

        Also usable as a decorator: ``@foreach(j=range(3)).dopar`` binds the
        decorated name to the loop's value.

        Raises:
            IterationError: an iteration failed and errorhandling is 'stop'.
            OptionError: the body or an option is not acceptable; raised before
                any work is submitted.
        """
        from .backends import _backend_for_dopar

        return self._run(body, _backend_for_dopar(), sys._getframe(1))

    def do(self, body: Callable[..., Any]) -> Any:
        """Runs the loop sequentially in this process, whatever is registered."""
        from .backends.sequential import SequentialBackend

        return self._run(body, SequentialBackend(), sys._getframe(1))

    def _run(
        self, body: Callable[..., Any], backend: Any, frame: FrameType | None
    ) -> Any:
        options = apply_overrides(self._options)
        self._check_body(body)
        exports = _resolve_exports(options.export, frame)
        if exports:
            bind_exports(body, exports)  # refuses a body that cannot take them, now
        env = JobEnv(
            body=bind_exports(body, {}, options.noexport),
            exports=exports,
            packages=options.packages,
            worker_init=options.worker_init,
            reduce=options.reduce,
            seed_worker=options.seed_worker,
            errorhandling=options.errorhandling,
        )
        levels = self._levels
        if options.inorder != self._options.inorder:
            # set_options(inorder=...) reaches the combining, not just the options.
            levels = self.options(inorder=options.inorder)._levels
        with _verbose(options.verbose):
            seeds = SeedPlan.draw(options.seed)
            return _Run(levels, options, env, seeds, backend).run()

    def _check_body(self, body: Callable[..., Any]) -> None:
        if not callable(body):
            raise OptionError(f"the loop body must be callable, not {body!r}")
        try:
            signature = inspect.signature(body)
        except (TypeError, ValueError):
            return  # a builtin or C callable: let the call itself decide
        names = self.variables
        try:
            signature.bind(**dict.fromkeys(names))
        except TypeError as exc:
            label = getattr(body, "__name__", type(body).__name__)
            given = ", ".join(names) if names else "no variables"
            raise OptionError(
                f"the body {label}{signature} does not match the loop variables "
                f"({given}): {exc}"
            ) from None


class _Run:
    """One run of a loop: feeds the backend, combines what comes back."""

    def __init__(
        self,
        levels: tuple[_Level, ...],
        options: Options,
        env: JobEnv,
        seeds: SeedPlan,
        backend: Any,
    ) -> None:
        self.levels = levels
        self.options = options
        self.backend = backend
        self.nested = len(levels) > 1
        self.reduce = options.reduce is not None
        self.paths: dict[int, tuple[int, ...]] = {}
        self.combiner: Combiner | TreeCombiner
        if self.nested:
            self.combiner = TreeCombiner([level.spec for level in levels])
        else:
            self.combiner = Combiner(levels[0].spec)
        iterations = self._iterations()
        self.job = Job(
            env,
            make_tasks(iterations, options.chunksize),
            seeds,
            timeout=options.timeout,
            max_attempts=options.max_attempts,
            total=self._total(),
        )

    def _total(self) -> int | None:
        if self.nested or self.levels[0].when is not None:
            return None
        sizes = []
        for iterable in self.levels[0].iterables:
            try:
                sizes.append(len(iterable))
            except TypeError:
                return None
        return min(sizes) if sizes else None

    def _iterations(self) -> Iterator[dict[str, Any]]:
        if not self.nested:
            yield from _walk_level(self.levels[0], {})
            return
        assert isinstance(self.combiner, TreeCombiner)
        counter = itertools.count()
        for path, variables in _walk(self.levels, {}, (), self.combiner.close):
            self.paths[next(counter)] = path
            yield variables

    def run(self) -> Any:
        options, job = self.options, self.job
        logger.info(
            "job %s: starting on %s (chunksize %d)",
            job.job_id,
            type(self.backend).__name__,
            options.chunksize,
        )
        results = self.backend.run(job)
        with _progress_bar(job.total, options.progress) as bar:
            try:
                for result in results:
                    self._take(result)
                    bar.update(result.size)
            finally:
                results.close()
        logger.info("job %s: done", job.job_id)
        return self.combiner.result()

    def _take(self, result: TaskResult) -> None:
        if self.reduce:
            # One value per task: the reduced value, or the failure that
            # stands for the whole task.
            index, value = result.items[0]
            self._add(result.task_id, index, value)
            return
        for index, value in result.items:
            self._add(self.paths.pop(index) if self.nested else index, index, value)

    def _add(self, key: Any, index: int, value: Any) -> None:
        if isinstance(value, Failure):
            how = self.options.errorhandling
            logger.debug("job %s: iteration %d failed", self.job.job_id, index)
            if how == "stop":
                raise value.to_error(index, self.job.job_id)
            if how == "remove":
                self.combiner.skip(key)
                return
            value = value.error
        self.combiner.add(key, value)


def _call_with(func: Callable[..., Any], variables: Mapping[str, Any]) -> Any:
    """Calls ``func`` with the variables it names (all of them with **kwargs)."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return func(**variables)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return func(**variables)
    names = {p.name for p in params}
    return func(**{k: v for k, v in variables.items() if k in names})


def _walk_level(level: _Level, outer: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The variables of one level's iterations (merged with ``outer``)."""
    iterables = []
    for name, iterable in zip(level.names, level.iterables):
        if callable(iterable) and not hasattr(iterable, "__iter__"):
            iterable = _call_with(iterable, outer)
        try:
            iterables.append(iter(iterable))
        except TypeError:
            raise OptionError(
                f"loop variable {name!r} is not iterable: {iterable!r}"
            ) from None
    if not level.names:  # times(n)
        iterables = [iter(level.iterables[0])]
    for values in zip(*iterables):
        variables = {**outer, **dict(zip(level.names, values))}
        if level.when is None or _call_with(level.when, variables):
            yield variables


def _walk(
    levels: tuple[_Level, ...],
    outer: dict[str, Any],
    prefix: tuple[int, ...],
    close: Callable[[tuple[int, ...], int], None],
) -> Iterator[tuple[tuple[int, ...], dict[str, Any]]]:
    """Depth-first paths and variables of a nested loop; closes each prefix."""
    count = 0
    for position, variables in enumerate(_walk_level(levels[0], outer)):
        count += 1
        path = (*prefix, position)
        if len(levels) == 1:
            yield path, variables
        else:
            yield from _walk(levels[1:], variables, path, close)
    close(prefix, count)


def _resolve_exports(export: Any, frame: FrameType | None) -> dict[str, Any]:
    if isinstance(export, Mapping):
        return dict(export)
    values: dict[str, Any] = {}
    for name in export:
        if frame is not None and name in frame.f_locals:
            values[name] = frame.f_locals[name]
        elif frame is not None and name in frame.f_globals:
            values[name] = frame.f_globals[name]
        else:
            raise OptionError(
                f"export: no variable named {name!r} where the loop was run"
            )
    return values


@contextmanager
def _progress_bar(total: int | None, enabled: bool) -> Iterator[Any]:
    """A tqdm bar over iterations (a plain count when ``total`` is None).

    tqdm redraws only inside ``update`` and at most every 0.1 s, so a burst
    of results followed by a long wait (a slow first task with inorder, say)
    would leave a stale count on screen; a thread redraws it meanwhile.
    """
    # leave=True keeps the final count on screen, which a fast loop's
    # throttled redraws would otherwise never show.
    bar = tqdm(total=total, disable=not enabled, unit="it", desc="pforeach", leave=True)
    stop = threading.Event()

    def catch_up() -> None:
        shown = bar.n
        while not stop.wait(0.5):
            if bar.n != shown:
                shown = bar.n
                bar.refresh()

    thread = threading.Thread(target=catch_up, name="pforeach-progress", daemon=True)
    if enabled:
        thread.start()
    try:
        yield bar
    finally:
        stop.set()
        if enabled:
            thread.join()
        bar.close()


@contextmanager
def _verbose(enabled: bool) -> Iterator[None]:
    """Shows pforeach's log on standard error for the loop's duration."""
    root = logging.getLogger("pforeach")
    if not enabled:
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("pforeach %(levelname)s %(message)s"))
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def foreach(*variables: Mapping[str, Any], **kwargs: Any) -> Foreach:
    """Describes a loop over one or more iterables, zipped to the shortest.

    Keyword arguments that name an option are options; every other keyword
    is a loop variable. Pass a mapping positionally for a variable whose name
    is also an option's (``foreach({"seed": seeds})``).

    Args:
        *variables: mappings of loop variable names to iterables.
        **kwargs: loop variables (``name=iterable``) and options:
            combine ("list", "sum", "product", "max", "min", "concat",
            "rbind", "cbind", a builtin such as ``sum``, or a callable of two
            arguments), init, final, inorder (default True), multicombine,
            maxcombine (default 100), errorhandling ("stop", "remove",
            "pass"), export, noexport, packages, chunksize (default 1),
            reduce, progress, seed, seed_worker, worker_init, verbose,
            timeout, max_attempts (default 3).

    Returns:
        A :class:`Foreach`; run it with ``.dopar(body)`` or ``.do(body)``.

    Raises:
        OptionError: no loop variable, a value that is not iterable, or an
            option that is not acceptable.

    Example:
        >>> foreach(x=[1, 2, 3], combine=sum).do(lambda x: x * x)
        14
    """
    options = {k: v for k, v in kwargs.items() if k in OPTION_NAMES}
    loop_vars: dict[str, Any] = {}
    for mapping in variables:
        if not isinstance(mapping, Mapping):
            raise OptionError(
                "foreach takes loop variables as name=iterable (or a mapping), "
                f"not {mapping!r}"
            )
        loop_vars.update(mapping)
    loop_vars.update({k: v for k, v in kwargs.items() if k not in OPTION_NAMES})
    if not loop_vars:
        raise OptionError(
            "foreach needs at least one loop variable (name=iterable); "
            "use times(n) to repeat a body n times"
        )
    for name, value in loop_vars.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise OptionError(f"loop variable names must be identifiers, not {name!r}")
        if not (hasattr(value, "__iter__") or callable(value)):
            raise OptionError(
                f"loop variable {name!r} is not iterable: {type(value).__name__}"
            )
    return _make(tuple(loop_vars), tuple(loop_vars.values()), options)


def times(n: int, **options: Any) -> Foreach:
    """A loop that runs a body taking no arguments ``n`` times (R's ``times``).

    Example:
        >>> times(3).do(lambda: 1)
        [1, 1, 1]
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise OptionError(f"times(n) needs an integer n >= 0, not {n!r}")
    return _make((), (range(n),), options)


def _make(
    names: tuple[str, ...], iterables: tuple[Any, ...], given: dict[str, Any]
) -> Foreach:
    options = make_options(**given)
    return Foreach((_Level(names, iterables, _spec(options)),), options)


__all__ = ["Foreach", "foreach", "times"]
