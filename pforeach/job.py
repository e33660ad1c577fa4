"""Jobs, tasks and their results: what every backend moves around.

A *job* is one run of a loop. It carries a :class:`JobEnv` (the body and
everything it needs, serialized once) and a lazy stream of :class:`Task`\\ s,
each holding at most ``chunksize`` iterations. A backend runs tasks with
:meth:`LoadedEnv.run` wherever it likes and yields one :class:`TaskResult` per
task; the loop driver combines them.
"""

from __future__ import annotations

import importlib
import itertools
import traceback
import types
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from . import serialize
from .errors import (
    IterationError,
    OptionError,
    RemoteError,
    SerializationError,
)
from .rng import SeedPlan, clear_iteration_seed


@dataclass
class Failure:
    """An iteration (or a whole task) that failed, as it travels back.

    Attributes:
        error: the exception, or a :class:`RemoteError` standing in for one
            that could not be serialized.
        traceback: the traceback text captured where the body ran.
        values: short reprs of the iteration's loop variables.
    """

    error: BaseException
    traceback: str = ""
    values: dict[str, str] = field(default_factory=dict)

    @classmethod
    def capture(
        cls, exc: BaseException, variables: dict[str, Any] | None = None
    ) -> Failure:
        """Records ``exc`` and its traceback so that both survive pickling."""
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            serialize.loads(serialize.dumps(exc))
            error: BaseException = exc.with_traceback(None)
        except Exception:
            kind = f"{type(exc).__module__}.{type(exc).__qualname__}"
            error = RemoteError(kind, str(exc))
        return cls(error, text, describe(variables or {}))

    def to_error(self, index: int, job_id: str) -> IterationError:
        """The exception that errorhandling='stop' raises for this failure."""
        err = IterationError(index, self.values, self.error, self.traceback, job_id)
        err.__cause__ = self.error
        return err


@dataclass
class Task:
    """A chunk of consecutive iterations.

    Attributes:
        task_id: 0, 1, 2, ... in iteration order.
        items: ``(index, variables)`` pairs, ``index`` counting iterations
            from 0 in loop order.
    """

    task_id: int
    items: list[tuple[int, dict[str, Any]]]

    @property
    def indices(self) -> list[int]:
        return [index for index, _ in self.items]


@dataclass
class TaskResult:
    """What one task produced.

    Attributes:
        task_id: the task's id.
        items: ``(index, value)`` pairs, where a value may be a
            :class:`Failure`. With a per-task ``reduce`` that succeeded, a
            single pair ``(first index, reduced value)``.
        reduced: whether ``items`` holds one reduced value.
    """

    task_id: int
    items: list[tuple[int, Any]]
    reduced: bool = False
    size: int = 0

    def dumps(self) -> bytes:
        """Serializes the result; values that cannot travel become failures."""
        try:
            return serialize.dumps(self)
        except SerializationError:
            pass
        kept: list[tuple[int, Any]] = []
        for index, value in self.items:
            try:
                serialize.dumps(value)
            except SerializationError as exc:
                value = Failure(
                    SerializationError(
                        f"the result of iteration {index} cannot be sent back: {exc}"
                    )
                )
            kept.append((index, value))
        return serialize.dumps(TaskResult(self.task_id, kept, self.reduced, self.size))

    @classmethod
    def failed(cls, task: Task, error: BaseException) -> TaskResult:
        """A result in which every iteration of ``task`` failed with ``error``."""
        items = [(i, Failure(error, "", describe(v))) for i, v in task.items]
        return cls(task.task_id, items, size=len(items))


@dataclass
class JobEnv:
    """Everything a worker needs to run a job's tasks, shipped once per job.

    Attributes:
        body: the loop body, called with the loop variables as keywords.
        exports: extra global names for the body.
        packages: modules imported before the first task runs.
        worker_init: run once per job on each worker, before the first task;
            a mapping it returns becomes extra globals of the body there.
        reduce: per-task reduction applied on the worker.
        seed_worker: replaces the default per-iteration seeding.
        errorhandling: the loop's errorhandling, needed by ``reduce``.
    """

    body: Callable[..., Any]
    exports: dict[str, Any] = field(default_factory=dict)
    packages: tuple[str, ...] = ()
    worker_init: Callable[[], None] | None = None
    reduce: Callable[[list[Any]], Any] | None = None
    seed_worker: Callable[[int], None] | None = None
    errorhandling: str = "stop"

    def check_capturable(self, trial: bool = True) -> None:
        """Fails early, naming the variable, if something cannot be shipped.

        Args:
            trial: serialize each captured value on its own, to name the one
                that fails; False only refuses the kinds never shipped.
        """
        for role in ("body", "worker_init", "reduce", "seed_worker"):
            func = getattr(self, role)
            if func is None:
                continue
            for name, value in serialize.captured_variables(func):
                serialize.check_capturable(name, value, trial)
        for name, value in self.exports.items():
            serialize.check_capturable(name, value, trial)

    def dumps(self) -> bytes:
        """Serializes the environment, naming the culprit if that fails."""
        # Each captured value is serialized on its own only when the whole
        # fails, to name it: a large one (a 40 MB array) would otherwise be
        # serialized twice for every loop.
        self.check_capturable(trial=False)
        try:
            return serialize.dumps(self)
        except SerializationError as exc:
            self.check_capturable()  # names a captured variable, if one is the cause
            for role in ("body", "worker_init", "reduce", "seed_worker"):
                try:
                    serialize.dumps(getattr(self, role))
                except SerializationError:
                    raise SerializationError(
                        f"the loop's {role} cannot be serialized: {exc}", role
                    ) from exc
            raise


def describe(variables: dict[str, Any], limit: int = 60) -> dict[str, str]:
    """Short reprs of loop variables, for error messages."""
    shown = {}
    for name, value in variables.items():
        try:
            text = repr(value)
        except Exception:
            text = f"<{type(value).__name__}>"
        shown[name] = text if len(text) <= limit else text[: limit - 3] + "..."
    return shown


def new_job_id() -> str:
    """A job id that is never reused."""
    return uuid.uuid4().hex[:20]


@dataclass
class Job:
    """One run of a loop, as a backend sees it.

    The base seeds travel with each task rather than in the environment, so
    that running the same loop again reuses an environment workers already
    hold.

    Attributes:
        env: the job environment.
        tasks: the tasks, produced lazily in task-id order.
        seeds: the loop's base seeds.
        job_id: a unique id.
        timeout: per-task time limit in seconds, or None.
        max_attempts: how many times a task whose worker died is tried.
        total: the number of iterations, when known in advance.
    """

    env: JobEnv
    tasks: Iterator[Task]
    seeds: SeedPlan
    job_id: str = field(default_factory=new_job_id)
    timeout: float | None = None
    max_attempts: int = 3
    total: int | None = None

    @cached_property
    def env_bytes(self) -> bytes:
        """The serialized environment, made once."""
        return self.env.dumps()

    @cached_property
    def env_hash(self) -> str:
        """The content hash of the serialized environment."""
        return serialize.digest(self.env_bytes)


def make_tasks(iterations: Iterable[dict[str, Any]], chunksize: int) -> Iterator[Task]:
    """Cuts a stream of iteration variables into tasks, lazily."""
    numbered = enumerate(iterations)
    for task_id in itertools.count():
        items = list(itertools.islice(numbered, chunksize))
        if not items:
            return
        yield Task(task_id, items)


# -- running tasks ---------------------------------------------------------------


def bind_exports(
    func: Callable[..., Any], exports: dict[str, Any], exclude: tuple[str, ...] = ()
) -> Callable[..., Any]:
    """A copy of ``func`` that sees ``exports`` as globals and not ``exclude``.

    The copy gets its own globals dictionary, so the caller's module is left
    untouched.
    """
    if not exports and not exclude:
        return func
    if not isinstance(func, types.FunctionType):
        raise OptionError(
            "export and noexport need the body to be a plain function, not a "
            f"{type(func).__name__}"
        )
    namespace = {k: v for k, v in func.__globals__.items() if k not in exclude}
    namespace.update(exports)
    copy = types.FunctionType(
        func.__code__, namespace, func.__name__, func.__defaults__, func.__closure__
    )
    copy.__kwdefaults__ = func.__kwdefaults__
    copy.__dict__.update(func.__dict__)
    copy.__qualname__ = func.__qualname__
    copy.__module__ = func.__module__
    return copy


def _unusable(**variables: Any) -> None:
    raise RuntimeError("the job environment could not be loaded")


class LoadedEnv:
    """A job environment made ready to run: exports bound, packages imported.

    ``worker_init`` runs on the first task, once per LoadedEnv, which a worker
    keeps per job.
    """

    def __init__(self, env: JobEnv, job_id: str = "") -> None:
        self.env = env
        self.job_id = job_id
        self.body = bind_exports(env.body, env.exports)
        self._init_error: Failure | None = None
        self._ready = False
        self.broken = False

    @classmethod
    def failing(cls, job_id: str, error: BaseException) -> LoadedEnv:
        """An environment that could not be had: every task fails with ``error``."""
        broken = cls(JobEnv(body=_unusable), job_id)
        broken._ready = broken.broken = True
        broken._init_error = Failure.capture(error)
        return broken

    @classmethod
    def load(cls, data: bytes | memoryview, job_id: str) -> LoadedEnv:
        """Deserializes an environment; one that fails makes every task fail."""
        try:
            env = serialize.loads(data)
            if not isinstance(env, JobEnv):
                raise SerializationError(f"not a job environment: {type(env).__name__}")
            return cls(env, job_id)
        except Exception as exc:
            return cls.failing(
                job_id,
                SerializationError(
                    f"job {job_id}: cannot load the job environment: {exc}"
                ),
            )

    def _prepare(self) -> None:
        self._ready = True
        try:
            for name in self.env.packages:
                try:
                    importlib.import_module(name)
                except ImportError as exc:
                    raise ImportError(
                        f"package {name!r} (from packages=): {exc}"
                    ) from exc
            if self.env.worker_init is not None:
                provided = self.env.worker_init()
                if isinstance(provided, Mapping):
                    # Values made on the worker (a connection, a model) become
                    # globals of the body there, never shipped.
                    self.body = bind_exports(self.body, dict(provided))
        except Exception as exc:
            self._init_error = Failure.capture(exc)

    def run(self, task: Task, seeds: SeedPlan) -> TaskResult:
        """Runs every iteration of ``task`` and applies ``reduce``."""
        if not self._ready:
            self._prepare()
        if self._init_error is not None:
            failed = [(i, self._init_error) for i in task.indices]
            return TaskResult(task.task_id, failed, size=len(failed))
        env = self.env
        items: list[tuple[int, Any]] = []
        for index, variables in task.items:
            seeds.seed_iteration(index, env.seed_worker)
            try:
                items.append((index, self.body(**variables)))
            except Exception as exc:
                items.append((index, Failure.capture(exc, variables)))
        clear_iteration_seed()  # a process that serves tasks runs other code too
        if env.reduce is None:
            return TaskResult(task.task_id, items, size=len(items))
        return self._reduce(task, items)

    def _reduce(self, task: Task, items: list[tuple[int, Any]]) -> TaskResult:
        reduce = self.env.reduce
        assert reduce is not None
        failed = [pair for pair in items if isinstance(pair[1], Failure)]
        size = len(items)
        if failed and self.env.errorhandling == "stop":
            return TaskResult(task.task_id, failed, size=size)
        if self.env.errorhandling == "remove":
            values = [v for _, v in items if not isinstance(v, Failure)]
        else:
            values = [v.error if isinstance(v, Failure) else v for _, v in items]
        try:
            reduced = reduce(values)
        except Exception as exc:
            failure = Failure.capture(exc, {"reduce": f"task {task.task_id}"})
            return TaskResult(task.task_id, [(task.indices[0], failure)], size=size)
        first = task.indices[0]
        return TaskResult(task.task_id, [(first, reduced)], reduced=True, size=size)
