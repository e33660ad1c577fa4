"""Measuring: clocks, memory samplers, Redis counters, processes, the machine."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 1_000_000


@dataclass(frozen=True)
class Stats:
    """Median, min and max of a workload's runs."""

    median: float
    low: float
    high: float
    runs: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Stats:
        data = list(values)
        if not data:
            raise ValueError("no values to summarize")
        return cls(statistics.median(data), min(data), max(data), len(data))


def rss_bytes(pid: int | None = None) -> int:
    """The resident set size of a process (this one by default), from /proc."""
    path = "/proc/self/statm" if pid is None else f"/proc/{pid}/statm"
    with open(path) as f:
        return int(f.read().split()[1]) * _PAGE


class PeakSampler:
    """Samples a quantity in a thread and keeps its peak.

    ``probe`` is called every ``interval`` seconds until :meth:`stop`; the
    baseline is taken when the sampler starts.
    """

    def __init__(self, probe: Callable[[], int], interval: float = 0.01) -> None:
        self.probe = probe
        self.interval = interval
        self.baseline = probe()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.peak = max(self.peak, self.probe())
            except Exception:  # a probe that fails once (a busy server) is retried
                continue

    def stop(self) -> int:
        """Stops sampling; returns the peak's growth over the baseline."""
        self._stop.set()
        self._thread.join()
        try:
            self.peak = max(self.peak, self.probe())
        except Exception:
            pass
        return self.peak - self.baseline


def redis_used_memory(client: Any) -> int:
    return int(client.info("memory")["used_memory"])


def redis_net_bytes(client: Any) -> tuple[int, int]:
    """The server's total_net_input_bytes and total_net_output_bytes."""
    stats = client.info("stats")
    return int(stats["total_net_input_bytes"]), int(stats["total_net_output_bytes"])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Polls ``predicate`` until it returns something true; fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done after {timeout:g}s")
        time.sleep(0.01)


def children(pid: int) -> list[int]:
    """The direct children of a process (Linux /proc)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(p) for p in f.read().split()]
        except OSError:
            continue
    return found


def parent(pid: int) -> int:
    """The parent of a process, or 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def kill(pid: int) -> None:
    """SIGKILLs a process that may already be gone."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- the machine -------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


PACKAGES = (
    "pforeach",
    "redis",
    "dill",
    "numpy",
    "joblib",
    "rq",
    "celery",
    "kombu",
    "dask",
    "distributed",
    "hiredis",
)


def package_versions() -> dict[str, str]:
    """Installed versions of pforeach, its peers and their Redis clients."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def machine(redis_version: str) -> dict[str, str]:
    """What the numbers were measured on."""
    total = _memory_total()
    return {
        "cores": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "memory": f"{total / 2**30:.1f} GiB" if total else "unknown",
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
        "redis-server": redis_version,
        "load average at start": load_average(),
    }
