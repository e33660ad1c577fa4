"""Command-line tools: ``pforeach-worker`` runs workers, ``pforeach`` manages queues.

Both are thin: ``pforeach-worker start`` builds a
:class:`~pforeach.backends.redis.worker.Supervisor`, and every ``pforeach``
command asks :mod:`pforeach.backends.redis.control` and prints a table (or
``--json``). Errors a user can fix (Redis unreachable, no such queue or
job) end the command with one line naming what is wrong and exit code 1.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import click
import redis

from .backends.redis import control
from .backends.redis.client import CONNECTION_ERRORS, ENV_URL, ConnectionSpec
from .backends.redis.control import JobInfo, QueueStatus, WorkerInfo
from .backends.redis.worker import Supervisor, configure_logging, make_config
from .errors import OptionError, PforeachError

F = TypeVar("F", bound=Callable[..., Any])

_LEVELS = click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)
_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# -- shared options and helpers -------------------------------------------------------


def _connection_options(func: F) -> F:
    options = [
        click.option(
            "--url",
            envvar=ENV_URL,
            default=None,
            show_envvar=True,
            help="Redis URL: redis://, rediss:// or unix:// "
            "[default: redis://127.0.0.1:6379/0].",
        ),
        click.option(
            "--connect-timeout",
            default=5.0,
            show_default=True,
            type=click.FloatRange(min=0.1),
            help="Seconds to wait for Redis to answer.",
        ),
        click.option("--ssl-ca-certs", default=None, help="CA file for rediss://."),
        click.option("--ssl-certfile", default=None, help="Client certificate."),
        click.option("--ssl-keyfile", default=None, help="Client key."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def connection_spec(
    url: str | None,
    ssl_ca_certs: str | None = None,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    connect_timeout: float = 5.0,
) -> ConnectionSpec:
    """The connection the command-line options describe."""
    return ConnectionSpec(
        url,
        ssl_ca_certs=ssl_ca_certs,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        connect_timeout=connect_timeout,
    )


def _control_spec(options: dict[str, Any]) -> ConnectionSpec:
    """A spec for job-control commands: short commands, so a read timeout too."""
    spec = connection_spec(
        options.pop("url"),
        options.pop("ssl_ca_certs"),
        options.pop("ssl_certfile"),
        options.pop("ssl_keyfile"),
        options.pop("connect_timeout"),
    )
    spec.extra["socket_timeout"] = max(30.0, spec.connect_timeout)
    return spec


@contextmanager
def _redis(options: dict[str, Any]) -> Iterator[tuple[redis.Redis, str]]:
    """One client for a whole command, and the address to show."""
    spec = _control_spec(options)
    client = spec.connect()
    try:
        yield client, spec.describe()
    finally:
        client.close()


def _queue_option(func: F) -> F:
    return click.option(
        "-q", "--queue", default="jobs", show_default=True, help="The queue's name."
    )(func)


def _json_option(func: F) -> F:
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print JSON (a list of objects) for scripts.",
    )(func)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _friendly(func: F) -> F:
    """Turns errors a user can act on into one-line messages and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except PforeachError as exc:
            raise click.ClickException(_one_line(exc)) from exc

    return wrapper  # type: ignore[return-value]


def _print_json(records: Sequence[Any]) -> None:
    click.echo(json.dumps([dataclasses.asdict(r) for r in records], indent=2))


# -- formatting ------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    """A duration such as 4s, 3m05s, 2h07m or 3d04h."""
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, whole = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{whole:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _age(then: float | None, now: float) -> str:
    """How long ago ``then`` was ("-" if unknown)."""
    return "-" if not then else _duration(now - then)


@dataclasses.dataclass(frozen=True)
class _Column:
    """One column of a table: its header, how to get a cell, its alignment."""

    header: str
    cell: Callable[[Any, float], object]  # (record, now) -> value
    right: bool = False


def _table(columns: Sequence[_Column], items: Sequence[Any], now: float) -> str:
    """``items`` as a table of aligned columns under a header line."""
    rows = [[c.header for c in columns]]
    rows += [[str(c.cell(item, now)) for c in columns] for item in items]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = []
    for row in rows:
        cells = [
            value.rjust(width) if column.right else value.ljust(width)
            for value, width, column in zip(row, widths, columns)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _master(job: JobInfo) -> str:
    address = f" ({job.address})" if job.address and job.address != job.host else ""
    return f"{job.host}{address} pid {job.pid}"


def _task_count(job: JobInfo) -> str:
    # While the master is still submitting, only a lower bound is known.
    return (
        str(job.tasks_total)
        if job.tasks_total is not None
        else f"{job.tasks_submitted}+"
    )


def _done_of(job: JobInfo) -> str:
    if job.iterations_total is None:
        return str(job.iterations_done)
    return f"{job.iterations_done}/{job.iterations_total}"


def _iterations(job: JobInfo) -> str:
    if not job.iterations_total:
        return _done_of(job)
    return f"{_done_of(job)} ({100 * job.iterations_done / job.iterations_total:.0f}%)"


def _doing(worker: WorkerInfo) -> str:
    if worker.job_id is None:
        return "idle"
    span = f" ({worker.iterations})" if worker.iterations else ""
    return f"job {worker.job_id} task {worker.task_id}{span}"


_JOB_COLUMNS = [
    _Column("JOB", lambda j, now: j.job_id),
    _Column("USER", lambda j, now: j.user),
    _Column("MASTER", lambda j, now: _master(j)),
    _Column("AGE", lambda j, now: _age(j.submitted, now), right=True),
    _Column("TASKS", lambda j, now: _task_count(j), right=True),
    _Column("QUEUED", lambda j, now: j.tasks_queued, right=True),
    _Column("RUNNING", lambda j, now: j.tasks_running, right=True),
    _Column("DONE", lambda j, now: j.tasks_done, right=True),
    _Column("ITERATIONS", lambda j, now: _iterations(j), right=True),
]

_TASK_COLUMNS = [
    _Column("JOB", lambda t, now: t.job_id),
    _Column("TASK", lambda t, now: t.task_id, right=True),
    _Column("ITERATIONS", lambda t, now: t.iterations),
    _Column("ATTEMPT", lambda t, now: t.attempt, right=True),
    _Column("USER", lambda t, now: t.user),
    _Column("MASTER", lambda t, now: t.master_host),
    _Column("WORKER HOST", lambda t, now: t.worker_host),
    _Column("PID", lambda t, now: t.worker_pid, right=True),
    _Column("FOR", lambda t, now: _age(t.started, now), right=True),
    _Column("HEARTBEAT", lambda t, now: _age(t.heartbeat, now), right=True),
]

_WORKER_COLUMNS = [
    _Column("WORKER", lambda w, now: w.worker_id),
    _Column("HOST", lambda w, now: w.host),
    _Column("PID", lambda w, now: w.pid, right=True),
    _Column("QUEUES", lambda w, now: ",".join(w.queues)),
    _Column("RUNNING", lambda w, now: _doing(w)),
    _Column("FOR", lambda w, now: _age(w.since, now), right=True),
    _Column("DONE", lambda w, now: w.tasks_done, right=True),
    _Column("UP", lambda w, now: _age(w.started, now), right=True),
    _Column("HEARTBEAT", lambda w, now: _age(w.heartbeat, now), right=True),
]

_QUEUE_COLUMNS = [
    _Column("QUEUE", lambda s, now: s.queue),
    _Column("WORKERS", lambda s, now: len(s.workers), right=True),
    _Column("JOBS", lambda s, now: len(s.jobs), right=True),
    _Column("QUEUED", lambda s, now: s.length, right=True),
    _Column("RUNNING", lambda s, now: len(s.tasks), right=True),
]


def _show(
    items: Sequence[Any], as_json: bool, columns: Sequence[_Column], empty: str
) -> None:
    if as_json:
        _print_json(items)
    elif items:
        click.echo(_table(columns, items, time.time()))
    else:
        click.echo(empty)


def _queue_listing(func: F) -> F:
    """The options of a command that lists what is on one queue."""
    return _queue_option(_connection_options(_json_option(_friendly(func))))


def _list(
    fetch: Callable[[str, Any], Sequence[Any]],
    queue: str,
    as_json: bool,
    options: dict[str, Any],
    columns: Sequence[_Column],
    nothing: str,
) -> None:
    """Shows what ``fetch`` finds on ``queue``, or ``nothing`` if it is empty."""
    with _redis(options) as (client, _):
        found = fetch(queue, client)
    _show(found, as_json, columns, f"{nothing} on queue {queue}")


# -- pforeach-worker -------------------------------------------------------------------


@click.group(context_settings=_CONTEXT)
def worker_group() -> None:
    """Run pforeach workers that serve Redis work queues.

    \b
    Example:
        pforeach-worker start -n 4 --queue jobs --url redis://host:6379/0
    """


@worker_group.command("start")
@click.option(
    "-n",
    "--workers",
    "n",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Worker processes to run.",
)
@click.option(
    "-q",
    "--queue",
    "queues",
    multiple=True,
    default=["jobs"],
    show_default=True,
    help="Queue to serve; repeat for several.",
)
@_connection_options
@click.option(
    "--secret-file",
    type=click.File("rb"),
    default=None,
    help="File holding the shared secret (default: $PFOREACH_SECRET).",
)
@click.option(
    "--linger",
    default=30.0,
    show_default=True,
    type=float,
    help="Seconds to wait after the queue is removed before exiting.",
)
@click.option(
    "--alive-ttl",
    default=10.0,
    show_default=True,
    type=float,
    help="Seconds a heartbeat lasts (refreshed 3 times as often).",
)
@click.option(
    "--log", "log_file", default=None, help="Log to this file instead of stderr."
)
@click.option("--loglevel", default="INFO", show_default=True, type=_LEVELS)
@_friendly
def start(
    n: int,
    queues: tuple[str, ...],
    url: str | None,
    connect_timeout: float,
    ssl_ca_certs: str | None,
    ssl_certfile: str | None,
    ssl_keyfile: str | None,
    secret_file: Any,
    linger: float,
    alive_ttl: float,
    log_file: str | None,
    loglevel: str,
) -> None:
    """Start N worker processes in the foreground; Ctrl+C or SIGTERM stops them.

    Running tasks are handed back to the queue when the workers stop.

    \b
    Example:
        pforeach-worker start -n 4 --queue jobs --url redis://host:6379/0
    """
    secret = secret_file.read().strip() if secret_file is not None else None
    spec = connection_spec(
        url, ssl_ca_certs, ssl_certfile, ssl_keyfile, connect_timeout
    )
    config = make_config(
        list(queues),
        secret=secret,
        spec=spec,
        linger=linger,
        alive_ttl=alive_ttl,
        log_file=log_file,
        log_level=loglevel,
    )
    # Fail now, in one line, rather than have every worker retry for an hour.
    client = spec.connect()
    try:
        client.ping()
    except CONNECTION_ERRORS as exc:
        raise click.ClickException(
            f"cannot reach Redis at {spec.describe()}: {_one_line(exc)}"
        ) from exc
    except redis.RedisError as exc:
        raise click.ClickException(
            f"Redis at {spec.describe()} failed: {_one_line(exc)}"
        ) from exc
    finally:
        client.close()
    configure_logging(log_file, loglevel)
    click.echo(
        f"pforeach-worker: connected to {spec.describe()}; {n} worker(s) serving "
        f"{', '.join(queues)}" + (f"; logging to {log_file}" if log_file else ""),
        err=True,
    )
    sys.exit(Supervisor(n, config).run())


def worker_main() -> None:
    """Entry point of ``pforeach-worker``."""
    worker_group()


# -- pforeach --------------------------------------------------------------------------


class _EchoHandler(logging.Handler):
    """Writes log lines to whatever standard error is at the time of the call."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(self.format(record), err=True)
        except Exception:
            self.handleError(record)


@click.group(context_settings=_CONTEXT)
@click.option(
    "--loglevel",
    default="WARNING",
    show_default=True,
    type=_LEVELS,
    help="Show pforeach's log on stderr from this level on.",
)
def main(loglevel: str) -> None:
    """Inspect and manage pforeach work queues on a Redis server.

    \b
    Examples:
        pforeach jobs --queue jobs --url redis://host:6379/0
        pforeach top --queue jobs
        pforeach remove-job jobs 3f2a9c0d1b7e4a55b6c1
    """
    root = logging.getLogger("pforeach")
    level = logging.getLevelName(loglevel.upper())
    handler = _EchoHandler(level)
    handler.setFormatter(logging.Formatter("pforeach %(levelname)s %(message)s"))
    previous = root.level
    root.addHandler(handler)
    if root.getEffectiveLevel() > level:
        root.setLevel(level)

    def restore() -> None:
        # Leaves logging as it was, for callers that run commands in-process.
        root.removeHandler(handler)
        root.setLevel(previous)

    click.get_current_context().call_on_close(restore)


@main.command("jobs")
@_queue_listing
def jobs_command(queue: str, as_json: bool, **options: Any) -> None:
    """List the running jobs of a queue and their progress.

    TASKS is the job's number of tasks ("12+" while its master is still
    submitting); QUEUED, RUNNING and DONE count its tasks; AGE is the time
    since it was submitted.

    \b
    Example:
        pforeach jobs --queue jobs --url redis://host:6379/0 --json
    """
    _list(control.jobs, queue, as_json, options, _JOB_COLUMNS, "no running jobs")


@main.command("tasks")
@_queue_listing
def tasks_command(queue: str, as_json: bool, **options: Any) -> None:
    """List the tasks of a queue that workers are running now.

    ITERATIONS are 0-based loop positions; ATTEMPT is above 1 when a
    previous worker died running the task.

    \b
    Example:
        pforeach tasks --queue jobs --url redis://host:6379/0
    """
    _list(control.tasks, queue, as_json, options, _TASK_COLUMNS, "no running tasks")


@main.command("workers")
@_queue_listing
def workers_command(queue: str, as_json: bool, **options: Any) -> None:
    """List the live workers of a queue and what they are doing.

    A worker that died leaves the list when its heartbeat expires.

    \b
    Example:
        pforeach workers --queue jobs --url redis://host:6379/0
    """
    _list(control.workers, queue, as_json, options, _WORKER_COLUMNS, "no live workers")


@main.command("queues")
@_connection_options
@_json_option
@_friendly
def queues_command(as_json: bool, **options: Any) -> None:
    """List the queues on a Redis server with their workers, jobs and tasks.

    \b
    Example:
        pforeach queues --url redis://host:6379/0
    """
    with _redis(options) as (client, address):
        statuses = []
        for name in control.queues(client):
            try:
                statuses.append(control.queue_status(name, client))
            except OptionError:
                continue  # removed since it was listed
    if as_json:
        summary = [
            {
                "queue": s.queue,
                "workers": len(s.workers),
                "jobs": len(s.jobs),
                "queued": s.length,
                "running": len(s.tasks),
            }
            for s in statuses
        ]
        click.echo(json.dumps(summary, indent=2))
    elif statuses:
        click.echo(_table(_QUEUE_COLUMNS, statuses, time.time()))
    else:
        click.echo(f"no queues at {address}")


@main.command("remove-job")
@click.argument("queue")
@click.argument("job")
@_connection_options
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@_friendly
def remove_job_command(queue: str, job: str, yes: bool, **options: Any) -> None:
    """Cancel job JOB of queue QUEUE: drop its queued tasks and its keys.

    Its master stops with JobCancelledError at its next fault check; tasks
    already running finish and their results are dropped.

    \b
    Example:
        pforeach remove-job jobs 3f2a9c0d1b7e4a55b6c1 --url redis://host:6379/0
    """
    with _redis(options) as (client, address):
        info = None
        if not yes:
            running = control.jobs(queue, client)
            info = next((j for j in running if j.job_id == job), None)
        # An unknown job needs no confirmation: remove_job says it does not exist.
        if info is not None:
            click.confirm(
                f"Remove job {job} of {info.user} on {info.host} "
                f"({_done_of(info)} iterations done) from queue {queue} "
                f"at {address}?",
                abort=True,
            )
        removed = control.remove_job(queue, job, client)
    click.echo(
        f"removed job {job} from queue {queue} ({removed} queued task(s) dropped)"
    )


@main.command("remove-queue")
@click.argument("queue")
@_connection_options
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@_friendly
def remove_queue_command(queue: str, yes: bool, **options: Any) -> None:
    """Delete every key of queue QUEUE.

    Its workers exit after their linger time unless the queue comes back;
    the masters of its jobs stop with JobCancelledError.

    \b
    Example:
        pforeach remove-queue jobs --yes --url redis://host:6379/0
    """
    with _redis(options) as (client, address):
        if not yes:
            status = control.queue_status(queue, client)
            click.confirm(
                f"Remove queue {queue} at {address} ({len(status.workers)} live "
                f"worker(s), {len(status.jobs)} job(s), {status.length} queued "
                "task(s))?",
                abort=True,
            )
        deleted = control.remove_queue(queue, client)
    click.echo(f"removed queue {queue} ({deleted} keys deleted)")


# -- pforeach top ----------------------------------------------------------------------


class _Rates:
    """Iterations per second of each job, over the last few frames.

    Until a job has been seen twice, its average since submission stands in.
    """

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self.samples: dict[str, deque[tuple[float, int]]] = {}

    def update(self, jobs: Sequence[JobInfo], now: float) -> dict[str, float | None]:
        rates: dict[str, float | None] = {}
        for job in jobs:
            seen = self.samples.setdefault(job.job_id, deque(maxlen=self.window))
            seen.append((now, job.iterations_done))
            (t0, n0), (t1, n1) = seen[0], seen[-1]
            if t1 > t0:
                rates[job.job_id] = (n1 - n0) / (t1 - t0)
            elif job.iterations_done and now > job.submitted > 0:
                rates[job.job_id] = job.iterations_done / (now - job.submitted)
            else:
                rates[job.job_id] = None
        for gone in set(self.samples) - set(rates):
            del self.samples[gone]
        return rates


def _bar(done: int, total: int | None, width: int = 20) -> str:
    if not total:
        return ""
    filled = min(width, int(width * done / total))
    return "[" + "#" * filled + "." * (width - filled) + f"] {100 * done / total:3.0f}%"


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1f}/s"


def _eta(job: JobInfo, rate: float | None) -> str:
    if job.iterations_total is None or not rate:
        return "-"
    left = max(0, job.iterations_total - job.iterations_done)
    return _duration(left / rate)


def _frame(status: QueueStatus, rates: dict[str, float | None], interval: float) -> str:
    now = time.time()
    busy = sum(1 for w in status.workers if w.job_id is not None)
    lines = [
        f"pforeach top - queue {status.queue} at {status.address} - "
        f"{time.strftime('%H:%M:%S')} (every {interval:g}s, Ctrl+C quits)",
        f"workers: {len(status.workers)} live, {busy} busy, "
        f"{len(status.workers) - busy} idle   jobs: {len(status.jobs)}   "
        f"tasks: {status.length} queued, {len(status.tasks)} running",
        "",
    ]
    job_columns = [
        _Column("JOB", lambda j, now: j.job_id),
        _Column("USER", lambda j, now: j.user),
        _Column("MASTER", lambda j, now: j.host),
        _Column("AGE", lambda j, now: _age(j.submitted, now), right=True),
        _Column("PROGRESS", lambda j, now: _bar(j.iterations_done, j.iterations_total)),
        _Column("ITERATIONS", lambda j, now: _done_of(j), right=True),
        _Column("RATE", lambda j, now: _rate(rates.get(j.job_id)), right=True),
        _Column("ETA", lambda j, now: _eta(j, rates.get(j.job_id)), right=True),
        _Column(
            "TASKS Q/R/D",
            lambda j, now: f"{j.tasks_queued}/{j.tasks_running}/{j.tasks_done}",
            right=True,
        ),
    ]
    worker_columns = [
        _Column("HOST", lambda w, now: w.host),
        _Column("PID", lambda w, now: w.pid, right=True),
        _Column("RUNNING", lambda w, now: _doing(w)),
        _Column("FOR", lambda w, now: _age(w.since, now), right=True),
        _Column("DONE", lambda w, now: w.tasks_done, right=True),
        _Column("HEARTBEAT", lambda w, now: _age(w.heartbeat, now), right=True),
    ]
    lines.append(
        _table(job_columns, status.jobs, now) if status.jobs else "no running jobs"
    )
    lines.append("")
    lines.append(
        _table(worker_columns, status.workers, now)
        if status.workers
        else "no live workers"
    )
    return "\n".join(lines)


@main.command("top")
@_queue_option
@_connection_options
@click.option(
    "-i",
    "--interval",
    default=2.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds between refreshes.",
)
@click.option(
    "--frames",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Stop after this many frames (0: run until Ctrl+C).",
)
@_friendly
def top_command(queue: str, interval: float, frames: int, **options: Any) -> None:
    """Watch the workers, jobs and progress of a queue, refreshing until Ctrl+C.

    RATE is iterations per second over the last few refreshes; TASKS Q/R/D
    counts queued, running and done tasks.

    \b
    Example:
        pforeach top --queue jobs --url redis://host:6379/0 --interval 1
    """
    try:
        with _redis(options) as (client, _):
            _watch(queue, client, interval, frames)
    except KeyboardInterrupt:
        return


def _watch(queue: str, client: redis.Redis, interval: float, frames: int) -> None:
    """Draws frames until ``frames`` were drawn (never, if 0)."""
    rates = _Rates()
    shown = 0
    interactive = sys.stdout.isatty()
    while True:
        try:
            status = control.queue_status(queue, client)
        except PforeachError as exc:
            if shown == 0:
                raise  # a wrong address or name: say so and stop
            # Later, the server may be restarting or the queue coming back.
            text = f"pforeach top - {time.strftime('%H:%M:%S')}: {_one_line(exc)}"
        else:
            text = _frame(status, rates.update(status.jobs, time.time()), interval)
        if interactive:
            click.clear()
        elif shown:
            click.echo()
        click.echo(text)
        shown += 1
        if frames and shown >= frames:
            return
        time.sleep(interval)
