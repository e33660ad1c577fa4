"""The workloads: what one run of each does, what it measures, and the runner.

A workload run returns, for each table row it feeds, a dict of metrics whose
``"value"`` is the row's headline figure. Every run checks the answer it got;
a wrong answer is an error, never a number.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import bodies
from .measure import (
    MB,
    PeakSampler,
    Stats,
    redis_net_bytes,
    redis_used_memory,
    rss_bytes,
    wait_for,
)
from .systems import ALIVE_TTL, FTINTERVAL, WORKERS, Context, PfRedis, System

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sizes:
    """How big each workload is; :data:`FULL` and :data:`SMOKE` are the two used."""

    runs: int = 3
    w1_tasks: int = 2_000
    w1b_iterations: int = 20_000
    w1b_chunk: int = 100
    pi_tasks: int = 10
    pi_samples: int = 1_000_000
    pi_heavy_samples: int = 40_000_000
    env_bytes: int = 40_000_000
    env_tasks: int = 100
    latency_calls: int = 50
    fault_seconds: float = 1.0
    fault_tasks: int = WORKERS
    fault_deadline: float = 20.0
    memory_iterations: int = 1_000_000
    memory_chunk: int = 1_000


FULL = Sizes()
SMOKE = Sizes(
    runs=1,
    w1_tasks=20,
    w1b_iterations=400,
    w1b_chunk=100,
    pi_tasks=2,
    pi_samples=10_000,
    pi_heavy_samples=20_000,
    env_bytes=1_000_000,
    env_tasks=4,
    latency_calls=3,
    fault_seconds=0.3,
    fault_deadline=3.0,
    memory_iterations=2_000,
    memory_chunk=100,
)


@dataclass(frozen=True)
class Row:
    """One row group of the table: a figure measured for every system."""

    key: str
    title: str
    unit: str
    higher_better: bool


class WorkloadError(Exception):
    """A run that produced no figure (a wrong answer, a failure, a timeout)."""


@dataclass
class Bench:
    """Shared state of one benchmark run."""

    ctx: Context
    sizes: Sizes
    admin: Any = None  # a Redis client for INFO, or None
    #: Whether the run in progress is a workload's last on this system (then a
    #: fault run need not restore the workers it killed: the system stops).
    last_run: bool = False


# -- one run of each workload ------------------------------------------------------


def _timed(func: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = func()
    return value, time.perf_counter() - start


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise WorkloadError(f"wrong result: {what}")


def run_w1(system: System, bench: Bench) -> dict[str, dict[str, float]]:
    n = bench.sizes.w1_tasks
    result, seconds = _timed(lambda: system.trivial(n))
    _check(list(result) == list(range(n)), "W1 values")
    return {"W1": {"value": n / seconds}}


def run_w1b(system: System, bench: Bench) -> dict[str, dict[str, float]]:
    n, chunk = bench.sizes.w1b_iterations, bench.sizes.w1b_chunk
    result, seconds = _timed(lambda: system.chunked(n, chunk))
    _check(list(result) == list(range(n)), "W1b values")
    return {"W1b": {"value": n / seconds}}


def _run_pi(
    name: str, samples: int, system: System, bench: Bench
) -> dict[str, dict[str, float]]:
    """A speedup over the plain loop timed just before, in this process.

    Timing the plain loop next to each run, rather than once, keeps a busy
    machine's changing load from skewing the ratio.
    """
    tasks = bench.sizes.pi_tasks
    plain, plain_seconds = _timed(
        lambda: sum(bodies.pi_task(j, samples) for j in range(tasks)) / tasks
    )
    value, seconds = _timed(lambda: system.pi(tasks, samples))
    _check(math.isclose(value, plain, rel_tol=1e-12), f"{name} estimate {value}")
    return {
        name: {
            "value": plain_seconds / seconds,
            "wall_s": seconds,
            "plain_s": plain_seconds,
        }
    }


def run_w2(system: System, bench: Bench) -> dict[str, dict[str, float]]:
    return _run_pi("W2", bench.sizes.pi_samples, system, bench)


def run_w2h(system: System, bench: Bench) -> dict[str, dict[str, float]]:
    return _run_pi("W2h", bench.sizes.pi_heavy_samples, system, bench)


_env_runs = 0


def run_w3(system: System, bench: Bench) -> dict[str, dict[str, float]]:
    """The same loop twice over a fresh array (fresh, so the first loop is cold)."""
    import numpy as np

    global _env_runs
    _env_runs += 1
    tasks = bench.sizes.env_tasks
    data = np.random.default_rng(_env_runs).random(bench.sizes.env_bytes // 8)
    key = f"pfbench-env-{os.getpid()}-{_env_runs}"
    expected = [bodies.env_slice_sum(data, i, tasks) for i in range(tasks)]
    rows = {}
    for row in ("W3", "W3r"):
        before = redis_net_bytes(bench.admin) if system.uses_redis else (0, 0)
        result, seconds = _timed(lambda: system.env_loop(data, tasks, key))
        after = redis_net_bytes(bench.admin) if system.uses_redis else (0, 0)
        _check(
            all(math.isclose(a, b) for a, b in zip(result, expected))
            and len(result) == tasks,
            f"{row} sums",
        )
        metrics = {"value": seconds}
        if system.uses_redis:
            metrics["in_MB"] = (after[0] - before[0]) / MB
            metrics["out_MB"] = (after[1] - before[1]) / MB
        rows[row] = metrics
    return rows


def run_w4(system: System, bench: Bench) -> dict[str, dict[str, float]]:
    samples = []
    for _ in range(bench.sizes.latency_calls):
        value, seconds = _timed(system.one)
        _check(value == 0, "W4 value")
        samples.append(seconds)
    return {"W4": {"value": statistics.median(samples) * 1000}}


def _fault_run(
    row: str, make: Callable[[str], Any], after: Callable[[], None], bench: Bench
) -> dict[str, dict[str, float]]:
    """Runs a loop, kills the process holding task 0, times the right result."""
    s = bench.sizes
    marker = tempfile.mkdtemp(prefix="pfbench-fault-", dir=bench.ctx.scratch)
    fault = make(marker)
    outcome: dict[str, Any] = {}

    def loop() -> None:
        try:
            outcome["result"] = fault.run()
        except BaseException as exc:
            outcome["error"] = exc
        outcome["end"] = time.perf_counter()

    thread = threading.Thread(target=loop, daemon=True)
    start = time.perf_counter()
    thread.start()
    try:
        first = wait_for(
            lambda: sorted(n for n in os.listdir(marker) if n.startswith("0.")),
            120,
            "task 0 to start",
        )[0]
        pid = int(first.split(".")[1])
        killed = time.perf_counter()
        fault.kill_holder(pid)
        thread.join(
            s.fault_deadline + 3 * (FTINTERVAL + ALIVE_TTL + s.fault_seconds) + 30
        )
        if thread.is_alive():
            raise WorkloadError(
                f"no result {time.perf_counter() - killed:.0f}s after the kill"
            )
        if "error" in outcome:
            exc = outcome["error"]
            raise WorkloadError(
                f"no result: {type(exc).__name__} "
                f"{outcome['end'] - killed:.1f}s after the kill"
            )
        expected = [i * i for i in range(s.fault_tasks)]
        _check(
            list(outcome["result"]) == expected, f"{row} values {outcome['result']!r}"
        )
        return {
            row: {"value": outcome["end"] - killed, "total_s": outcome["end"] - start}
        }
    finally:
        if not bench.last_run:
            after()


def run_w5(system: System, bench: Bench) -> dict[str, dict[str, float]]:
    s = bench.sizes
    return _fault_run(
        "W5",
        lambda marker: system.fault(
            marker, s.fault_seconds, s.fault_tasks, s.fault_deadline
        ),
        system.after_fault,
        bench,
    )


def run_w5b(system: System, bench: Bench) -> dict[str, dict[str, float]]:
    assert isinstance(system, PfRedis)
    s = bench.sizes
    return _fault_run(
        "W5b",
        lambda marker: system.host_lost(marker, s.fault_seconds, s.fault_tasks),
        system.after_host_lost,
        bench,
    )


def run_memory(system: System, bench: Bench) -> dict[str, dict[str, float]]:
    n, chunk = bench.sizes.memory_iterations, bench.sizes.memory_chunk
    gc.collect()
    rss = PeakSampler(rss_bytes, 0.005)
    used = (
        PeakSampler(lambda: redis_used_memory(bench.admin), 0.01)
        if system.uses_redis
        else None
    )
    try:
        total, seconds = _timed(lambda: system.memory(n, chunk))
    finally:
        rss_growth = rss.stop()
        redis_growth = used.stop() if used is not None else None
    _check(total == n * (n - 1) // 2, f"MEM sum {total}")
    metrics = {"value": rss_growth / MB, "wall_s": seconds}
    if redis_growth is not None:
        metrics["redis_MB"] = redis_growth / MB
    return {"MEM": metrics}


# -- the table's rows and the order workloads run in ---------------------------------

ROWS = (
    Row("W1", "W1 overhead: trivial tasks, 1 iteration each", "tasks/s", True),
    Row("W1b", "W1b chunked: trivial iterations, 100 per task", "iterations/s", True),
    Row("W2", "W2 pi (vignette): 10 tasks", "speedup", True),
    Row("W2h", "W2 pi, heavier: 10 tasks", "speedup", True),
    Row("W3", "W3 environment: 40 MB captured array, first loop", "s", False),
    Row("W3r", "W3 environment: the same loop again", "s", False),
    Row("W4", "W4 latency: one trivial task (median of 50)", "ms", False),
    Row("W5", "W5 fault: worker process killed holding a task", "s after kill", False),
    Row(
        "W5b",
        "W5 fault: worker and its supervisor killed (host lost)",
        "s after kill",
        False,
    ),
    Row(
        "MEM",
        "Memory: 1,000,000 iterations from a generator, combine=sum",
        "MB RSS growth",
        False,
    ),
)
ROW_BY_KEY = {row.key: row for row in ROWS}


@dataclass(frozen=True)
class Workload:
    key: str
    rows: tuple[str, ...]
    run: Callable[[System, Bench], dict[str, dict[str, float]]]


#: Run order within a system: memory first, while the master's heap is fresh;
#: the fault workloads last, since they kill workers.
WORKLOADS = (
    Workload("MEM", ("MEM",), run_memory),
    Workload("W1", ("W1",), run_w1),
    Workload("W1b", ("W1b",), run_w1b),
    Workload("W2", ("W2",), run_w2),
    Workload("W2h", ("W2h",), run_w2h),
    Workload("W4", ("W4",), run_w4),
    Workload("W3", ("W3", "W3r"), run_w3),
    Workload("W5", ("W5",), run_w5),
    Workload("W5b", ("W5b",), run_w5b),
)


@dataclass
class Cell:
    """One system's figures for one row: per-run metrics, or why there are none."""

    runs: list[dict[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    text: str | None = None  # "not installed", "n/a: ...", when nothing ran

    def stats(self, metric: str = "value") -> Stats | None:
        values = [r[metric] for r in self.runs if metric in r]
        return Stats.of(values) if values else None


Results = dict[str, dict[str, Cell]]  # row key -> system key -> cell


def run_benchmark(
    systems: list[System],
    bench: Bench,
    workloads: list[str] | None = None,
    progress: Callable[[str], None] = print,
) -> Results:
    """Runs every selected workload on every system, one system at a time."""
    chosen = [w for w in WORKLOADS if not workloads or w.key in workloads]
    results: Results = {
        row.key: {} for row in ROWS if any(row.key in w.rows for w in chosen)
    }
    for system in systems:
        reason = system.unavailable(bench.ctx)
        if reason is not None:
            progress(f"[{system.key}] {reason}")
            for row in results:
                results[row][system.key] = Cell(text=reason)
            continue
        progress(f"[{system.key}] starting {WORKERS} workers")
        try:
            system.start(bench.ctx)
        except Exception as exc:
            logger.exception("%s did not start", system.key)
            for row in results:
                results[row][system.key] = Cell(
                    text=f"did not start: {type(exc).__name__}"
                )
            _stop(system)
            continue
        try:
            applicable = [w for w in chosen if w.key not in system.not_applicable]
            for workload in chosen:
                final = bool(applicable) and workload is applicable[-1]
                _run_workload(system, workload, bench, results, progress, final)
        finally:
            _stop(system)
    return results


def _stop(system: System) -> None:
    try:
        system.stop()
    except Exception:
        logger.exception("%s did not stop cleanly", system.key)


def _run_workload(
    system: System,
    workload: Workload,
    bench: Bench,
    results: Results,
    progress: Callable[[str], None],
    final: bool = False,
) -> None:
    cells = {row: Cell() for row in workload.rows}
    for row in workload.rows:
        results[row][system.key] = cells[row]
    reason = system.not_applicable.get(workload.key)
    if reason is not None:
        for cell in cells.values():
            cell.text = f"n/a: {reason}"
        return
    if workload.key == "W5b":
        assert isinstance(system, PfRedis)
        system.host_lost_setup()
    for number in range(1, bench.sizes.runs + 1):
        bench.last_run = final and number == bench.sizes.runs
        try:
            measured = workload.run(system, bench)
        except Exception as exc:
            text = (
                str(exc)
                if isinstance(exc, WorkloadError)
                else f"failed: {type(exc).__name__}: {exc}"
            )
            if not isinstance(exc, WorkloadError):
                logger.warning(
                    "%s %s run %d failed",
                    system.key,
                    workload.key,
                    number,
                    exc_info=True,
                )
            for cell in cells.values():
                cell.errors.append(text[:120])
            progress(f"[{system.key}] {workload.key} run {number}: {text[:120]}")
            continue
        for row, metrics in measured.items():
            cells[row].runs.append(metrics)
            unit = ROW_BY_KEY[row].unit
            progress(
                f"[{system.key}] {row} run {number}: {metrics['value']:.4g} {unit}"
            )


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="pfbench-"))
