"""The results table, the targets, and docs/benchmarks.md."""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Callable
from dataclasses import dataclass

from .measure import MB, Stats
from .systems import ALIVE_TTL, FTINTERVAL, WORKERS, System
from .workloads import ROWS, Cell, Results, Sizes

REFERENCES = ("pf-redis", "pf-local")
_REF_LABEL = {"pf-redis": "redis x", "pf-local": "local x"}


def titles(sizes: Sizes) -> dict[str, str]:
    """Row titles with this run's sizes in them."""
    s = sizes
    return {
        "W1": f"W1 overhead: {s.w1_tasks:,} trivial tasks, 1 iteration each",
        "W1b": f"W1b chunked: {s.w1b_iterations:,} trivial iterations, "
        f"{s.w1b_chunk} per task",
        "W2": f"W2 pi (vignette): {s.pi_tasks} tasks of {s.pi_samples:,} points",
        "W2h": f"W2 pi, heavier: {s.pi_tasks} tasks of {s.pi_heavy_samples:,} points",
        "W3": f"W3 environment: {s.env_bytes / MB:g} MB captured array, "
        f"{s.env_tasks} tasks, first loop",
        "W3r": "W3 environment: the same loop again",
        "W4": f"W4 latency: one trivial task (median of {s.latency_calls})",
        "W5": f"W5 fault: worker process killed holding a task ({s.fault_seconds:g} s tasks)",
        "W5b": "W5 fault: worker and its supervisor killed (host lost)",
        "MEM": f"Memory: {s.memory_iterations:,} iterations from a generator, "
        f"combine=sum, inorder=False, chunksize {s.memory_chunk:,}",
    }


def fmt(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    if magnitude >= 0.01:
        return f"{value:.3f}"
    return f"{value:.2g}"


def ratio(results: Results, row: str, ours: str, theirs: str) -> float | None:
    """How many times better ``ours`` is than ``theirs`` on a row (median figures).

    Above 1 means better whichever way the unit points: more tasks per
    second, or fewer milliseconds.
    """
    cells = results.get(row, {})
    a = cells.get(ours, Cell()).stats()
    b = cells.get(theirs, Cell()).stats()
    if a is None or b is None or a.median <= 0 or b.median <= 0:
        return None
    spec = next(r for r in ROWS if r.key == row)
    return a.median / b.median if spec.higher_better else b.median / a.median


def _notes(row: str, cell: Cell) -> str:
    parts = []
    for metric, label, unit in (
        ("wall_s", "wall", "s"),
        ("in_MB", "Redis in", "MB"),
        ("out_MB", "Redis out", "MB"),
        ("redis_MB", "Redis used_memory +", "MB"),
        ("plain_s", "plain loop", "s"),
        ("total_s", "from start", "s"),
    ):
        stats = cell.stats(metric)
        if stats is not None:
            parts.append(f"{label} {fmt(stats.median)} {unit}".replace("+ ", "+"))
    if cell.errors:
        parts.append(f"{len(cell.errors)} failed: {cell.errors[0]}")
    return "; ".join(parts)


def table(results: Results, systems: list[System], sizes: Sizes) -> str:
    """The results as one Markdown table."""
    names = {s.key: s.label for s in systems}
    head = [
        "Workload",
        "System",
        "Median",
        "Min",
        "Max",
        "Unit",
        *(_REF_LABEL[r] for r in REFERENCES),
        "Notes",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    title = titles(sizes)
    for spec in ROWS:
        if spec.key not in results:
            continue
        first = True
        for system in systems:
            cell = results[spec.key].get(system.key)
            if cell is None:
                continue
            stats = cell.stats()
            if stats is None:
                text = cell.text or (cell.errors[0] if cell.errors else "-")
                figures = [text, "", ""]
            else:
                figures = [fmt(stats.median), fmt(stats.low), fmt(stats.high)]
            ratios = []
            for ref in REFERENCES:
                value = (
                    None
                    if ref == system.key
                    else ratio(results, spec.key, ref, system.key)
                )
                ratios.append("" if value is None else f"{value:.2f}")
            notes = _notes(spec.key, cell) if stats is not None else ""
            lines.append(
                "| "
                + " | ".join(
                    [
                        title[spec.key] if first else "",
                        names[system.key],
                        *figures,
                        spec.unit,
                        *ratios,
                        notes,
                    ]
                )
                + " |"
            )
            first = False  # the workload's title heads its group of rows only
    return "\n".join(lines)


# -- targets ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    text: str
    check: Callable[[Results, Sizes], tuple[bool | None, str]]


def _median(
    results: Results, row: str, system: str, metric: str = "value"
) -> Stats | None:
    cell = results.get(row, {}).get(system)
    return cell.stats(metric) if cell is not None else None


def _ratio_check(
    row: str, ours: str, peer: str, at_least: float
) -> Callable[[Results, Sizes], tuple[bool | None, str]]:
    def check(results: Results, sizes: Sizes) -> tuple[bool | None, str]:
        value = ratio(results, row, ours, peer)
        if value is None:
            return None, "not measured"
        return value >= at_least, f"{value:.2f}x"

    return check


def _figure_target(
    row: str,
    system: str,
    test: Callable[[float, Sizes], bool],
    unit: str,
    metric: str = "value",
    worst: bool = False,
) -> Callable[[Results, Sizes], tuple[bool | None, str]]:
    def check(results: Results, sizes: Sizes) -> tuple[bool | None, str]:
        stats = _median(results, row, system, metric)
        if stats is None:
            return None, "not measured"
        value = stats.high if worst else stats.median
        which = "worst" if worst else "median"
        return test(value, sizes), f"{which} {fmt(value)} {unit}"

    return check


def _fault_bound(sizes: Sizes) -> float:
    return FTINTERVAL + ALIVE_TTL + sizes.fault_seconds


def _env_in(value: float, sizes: Sizes) -> bool:
    return value <= 1.1 * sizes.env_bytes / MB + 1


def _env_out(value: float, sizes: Sizes) -> bool:
    return value <= 1.1 * WORKERS * sizes.env_bytes / MB + 1


def targets(sizes: Sizes) -> list[Target]:
    bound = _fault_bound(sizes)
    env_mb = sizes.env_bytes / MB
    found = [
        Target(
            "W1: Redis backend at least 3x Celery's tasks/s",
            _ratio_check("W1", "pf-redis", "celery", 3),
        ),
        Target(
            "W1: Redis backend at least 10x RQ's tasks/s",
            _ratio_check("W1", "pf-redis", "rq", 10),
        ),
        Target(
            "W1: Redis backend above 5,000 tasks/s (guidance)",
            _figure_target("W1", "pf-redis", lambda v, s: v > 5000, "tasks/s"),
        ),
        Target(
            "W1: local backend at least joblib's tasks/s",
            _ratio_check("W1", "pf-local", "joblib", 1),
        ),
        Target(
            "W1b: Redis backend above 200,000 iterations/s",
            _figure_target("W1b", "pf-redis", lambda v, s: v > 200_000, "iterations/s"),
        ),
        Target(
            "W2 heavier: speedup >= 1.85 on the local backend",
            _figure_target("W2h", "pf-local", lambda v, s: v >= 1.85, "x"),
        ),
        Target(
            "W2 heavier: speedup >= 1.85 on the Redis backend",
            _figure_target("W2h", "pf-redis", lambda v, s: v >= 1.85, "x"),
        ),
        Target(
            f"W3: Redis sent <= 1.1 x {WORKERS} workers x {env_mb:g} MB + 1 MB "
            "(each worker downloads the environment once)",
            _figure_target("W3", "pf-redis", _env_out, "MB", "out_MB"),
        ),
        Target(
            f"W3: Redis received <= 1.1 x {env_mb:g} MB + 1 MB (one upload)",
            _figure_target("W3", "pf-redis", _env_in, "MB", "in_MB"),
        ),
        Target(
            "W3: the repeated loop moves no environment bytes (< 1 MB each way)",
            _repeat_check,
        ),
        Target(
            "W4: median latency under 1 ms on the Redis backend",
            _figure_target("W4", "pf-redis", lambda v, s: v < 1, "ms"),
        ),
        Target(
            f"W5: right result within ftinterval + alive TTL + task time "
            f"({bound:g} s) after a worker process is killed (worst run)",
            _figure_target(
                "W5", "pf-redis", lambda v, s: v <= _fault_bound(s), "s", worst=True
            ),
        ),
        Target(
            f"W5: right result within {bound:g} s after a whole host is lost "
            "(worst run)",
            _figure_target(
                "W5b", "pf-redis", lambda v, s: v <= _fault_bound(s), "s", worst=True
            ),
        ),
        Target(
            "Memory: master RSS grows < 50 MB on the Redis backend (worst run)",
            _figure_target("MEM", "pf-redis", lambda v, s: v < 50, "MB", worst=True),
        ),
        Target(
            "Memory: Redis used_memory grows < 64 MB (worst run)",
            _figure_target(
                "MEM", "pf-redis", lambda v, s: v < 64, "MB", "redis_MB", worst=True
            ),
        ),
        Target(
            "Memory: master RSS grows < 50 MB on the local backend (worst run)",
            _figure_target("MEM", "pf-local", lambda v, s: v < 50, "MB", worst=True),
        ),
    ]
    return found


def _repeat_check(results: Results, sizes: Sizes) -> tuple[bool | None, str]:
    inbound = _median(results, "W3r", "pf-redis", "in_MB")
    outbound = _median(results, "W3r", "pf-redis", "out_MB")
    if inbound is None or outbound is None:
        return None, "not measured"
    ok = inbound.high < 1 and outbound.high < 1
    return ok, f"worst in {fmt(inbound.high)} MB, out {fmt(outbound.high)} MB"


def target_lines(results: Results, sizes: Sizes) -> list[str]:
    lines = []
    for target in targets(sizes):
        ok, measured = target.check(results, sizes)
        status = "n/a" if ok is None else ("MET" if ok else "MISSED")
        lines.append(f"- **{status}** {target.text}: {measured}")
    return lines


# -- the document -------------------------------------------------------------------------


@dataclass
class Record:
    """Everything one benchmark run produced: what the table and page are made of.

    It round-trips through JSON, so that a page can be rendered again from a
    run's saved results (``--render``) without measuring anything.
    """

    sizes: Sizes
    systems: list[str]
    machine: dict[str, str]
    versions: dict[str, str]
    results: Results
    load_after: str = "unknown"
    minutes: float = 0.0
    note: str = ""
    when: str = ""

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Record:
        data = json.loads(text)
        data["sizes"] = Sizes(**data["sizes"])
        data["results"] = {
            row: {key: Cell(**cell) for key, cell in cells.items()}
            for row, cells in data["results"].items()
        }
        return cls(**data)


def document(record: Record, systems: list[System]) -> str:
    """docs/benchmarks.md: method, machine, table, targets, and the round trips."""
    sizes, results = record.sizes, record.results
    machine_lines = "\n".join(f"| {k} | {v} |" for k, v in record.machine.items())
    machine_lines += f"\n| load average at end | {record.load_after} |"
    version_lines = "\n".join(f"| {k} | {v} |" for k, v in record.versions.items())
    note_text = f"\n!!! note\n    {record.note}\n" if record.note else ""
    return TEMPLATE.format(
        when=record.when,
        minutes=record.minutes,
        runs=sizes.runs,
        note=note_text,
        machine=machine_lines,
        versions=version_lines,
        table=table(results, systems, sizes),
        targets="\n".join(target_lines(results, sizes)),
        ftinterval=f"{FTINTERVAL:g}",
        alive=ALIVE_TTL,
        fault_s=f"{sizes.fault_seconds:g}",
        bound=f"{_fault_bound(sizes):g}",
        workers=WORKERS,
    )


def now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


TEMPLATE = """\
# Benchmarks

How much does a task cost? This page measures pforeach and the usual
alternatives side by side, in one run, on one machine: joblib (loky),
`concurrent.futures.ProcessPoolExecutor`, RQ, Celery and Dask distributed.
`make bench` (or `python -m benchmarks`) reproduces it and rewrites this page;
`python -m benchmarks --help` lists the options (a subset of systems or
workloads, more runs, `--smoke` for a quick check).

Measured {when}: every workload ran {runs} time(s) on every system,
{minutes:.0f} minutes in all.
{note}
## Method

- **Same conditions.** Every system has {workers} worker processes with one
  thread each, started and warmed up (a small loop run through them) before
  any clock starts. The Redis-based systems (pforeach's Redis backend, RQ,
  Celery) share one private `redis-server` (`RedisServer`, no persistence),
  each in its own database; only one system runs at a time.
- **Figures.** Each cell is the median of the runs, with their minimum and
  maximum. The `redis x` and `local x` columns give pforeach's Redis and
  local backends' median against that row's median, oriented so that above 1
  means pforeach did better (more per second, or less time).
- **NumPy is loaded** in the benchmark's process from the start, as in a
  numeric script; pforeach then seeds NumPy's global generator (as well as
  Python's) before every iteration, so that random draws are reproducible.
- **Answers are checked.** A run whose result is wrong counts as failed, not
  as a figure.
- **Systems.**
  - *pforeach sequential*: `SequentialBackend`, in the benchmark's process.
  - *pforeach local*: `LocalBackend(2)`.
  - *pforeach redis*: `RedisBackend(ftinterval={ftinterval})` with two workers
    from `start_local_workers(2, alive_ttl={alive})`.
  - *joblib*: `Parallel(n_jobs=2, backend="loky", batch_size=1)`; one call is
    one task, as in the other systems (joblib's automatic batching would merge
    W1's calls into larger tasks).
  - *concurrent.futures*: `ProcessPoolExecutor(max_workers=2)`, `map`.
  - *RQ*: two `rq worker --worker-class rq.worker.SimpleWorker` processes
    (no fork per job, RQ's fastest worker); jobs enqueued with `enqueue_many`,
    results read with `latest_result`.
  - *Celery*: `celery worker --pool=prefork --concurrency 2`, Redis broker
    and result backend; tasks sent as a `group`.
  - *Dask*: `LocalCluster(n_workers=2, threads_per_worker=1)`, `Client.map`.
- **Workloads.**
  - *W1 overhead*: a trivial body, one iteration per task: tasks per second.
  - *W1b chunked*: the same body, 100 iterations per task (`chunksize=100`;
    the peers run a function that loops over 100 values): iterations per
    second.
  - *W2 pi*: the doRedis vignette's Monte Carlo estimate of pi, 10 tasks, and
    a heavier variant; speedup over a plain `for` loop over the same tasks,
    timed in the benchmark's process just before each run (so that a change
    in the machine's load hits both sides of the ratio alike).
  - *W3 environment*: the body reads a captured 40 MB float64 array, 100
    tasks; wall time, and for the Redis-based systems the bytes the server
    received and sent (deltas of `total_net_input_bytes` and
    `total_net_output_bytes` from `INFO stats`). Then the same loop again.
    Each peer ships the array its documented way: joblib memory-maps it,
    `ProcessPoolExecutor` pickles it into every task, Dask scatters it to
    every worker; RQ and Celery have no way to ship a value once per job, so
    the benchmark stores it in Redis once and the body fetches it once per
    worker process (caching a user writes by hand).
  - *W4 latency*: one trivial task submitted and its result received, 50
    times; the median in milliseconds (for pforeach, a whole one-iteration
    loop).
  - *W5 fault*: a loop of two tasks of {fault_s} s; the worker process that
    holds task 0 is killed (SIGKILL) as soon as the task starts; the figure is
    the time from the kill to the right result. Celery's task uses
    `acks_late=True, reject_on_worker_lost=True` and RQ's `Retry(max=2)`,
    their documented protections; joblib and `concurrent.futures` have none
    and fail the loop. The host-lost variant (pforeach Redis only) kills the
    worker's supervisor too, so nothing reports the loss: the master finds
    it by its fault check once the task's heartbeat key expires. Its bound is
    ftinterval + alive TTL + task time = {bound} s.
  - *Memory*: 1,000,000 iterations from a generator, `combine=sum`,
    `inorder=False`, `chunksize=1000`; the peak growth of the master's RSS
    (sampled every 5 ms) and of Redis's `used_memory`. The peers get the same
    iterations as lists of 1000 values through their own APIs.

## Machine

| | |
|---|---|
{machine}

## Versions

| package | version |
|---|---|
{versions}

## Results

{table}

## Targets

{targets}

## What one task costs on the Redis backend

Every key and message is described in the docstring of
`pforeach/backends/redis/keys.py`. A task's trip through Redis:

**Per loop (job), the master** makes three round trips before the first
result arrives, whatever the number of tasks, and one to clean up:

1. one pipeline: renew `Q.env.H` (and its parts) if an identical environment
   is already stored, which is the case when the same loop runs again, so
   that nothing is uploaded (otherwise one more round trip `SET`s it, in
   parts above the part size); `HSET` + `EXPIRE` of the job record,
   `SADD Q.jobs`, `SET Q.live` (what `pforeach jobs` and the workers read);
   and `INFO server`, whose run id tells a server that restarted and lost
   the job apart from one that did not. Only if this fails does the master
   `PING`, to fail the loop at once with the server's address;
2. tasks are `RPUSH`ed in pipelined batches (32 first, so that workers start
   at once, then up to 512);
3. results are drained with `LPOP Q.out.J 1000` while they stream in, and a
   `BLPOP` waits when the list is empty;
4. at the end, one pipeline deletes the job's result list, record and
   attempt counters (a loop cut short runs the `DROP_JOB` script instead,
   which also takes its queued tasks back out of the queue).

A thread refreshes the job's TTLs and progress counts about once a second,
and every `ftinterval` the master runs its fault check (one pipeline over the
tasks in flight).

**Per task, a worker** makes two round trips, each one Lua script that does
several things atomically:

1. `TAKE`: `LMOVE` the task from the queue into the worker's own processing
   list, check that the job still exists, set the task's *start* and *alive*
   keys, and count the attempt (`HINCRBY`). When the queue is empty the worker
   blocks in `BLMOVE` instead and `TAKE` only marks the task, a third round
   trip, but only when idle.
2. `FINISH`: push the result to the job's result list if the job still
   exists (and renew the list's TTL), and delete the task's start and alive
   keys and the worker's processing entry.

The environment is fetched once per worker and job environment (by content
hash, so running the same loop again fetches nothing), and the worker tells
its supervisor over a pipe when a task starts and ends, so that the
supervisor can keep the task's alive key fresh even when the body holds the
GIL.

**Why each step exists.** Moving a task into a per-worker list in the same
atomic step that takes it means a task is never only in a worker's memory: if
the worker dies, the supervisor (at once) or the master's fault check (after
the alive key expires) moves it back to the queue. The start and alive keys
are how a master that cannot see the worker tells *running* from *lost*; the
attempt counter enforces `max_attempts` even when every attempt kills its
worker; and checking that the job exists before taking or answering keeps a
cancelled job from running on or leaving results behind. The price is two
script calls per task on the worker side. Each call costs far more in the
client library and in the server's handling of a request than in the Lua
work itself, so these calls, with the master's own round trips, are what
bound W1 and W4.

**W1b, and what else an iteration costs.** Chunking amortizes the round
trips over 100 iterations. What remains is per-iteration work, and most of
it is seeding: pforeach seeds Python's global generator, and NumPy's when
NumPy is loaded, before every iteration, so that an iteration's random draws
depend only on the loop's seed and its own index, on any backend, worker
count or chunk size. With a trivial body that seeding is most of what an
iteration costs; the peers, which do not seed, run W1b's iterations faster.
"""
