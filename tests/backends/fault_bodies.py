"""Loop bodies for the Redis fault and cancel tests.

Workers import this module by name (the tests put its folder on the workers'
PYTHONPATH), so the bodies travel by reference and stay small. Each body
reports through files, appending one line per event in a single write, so
that the test can see what ran where and how often.
"""

from __future__ import annotations

import ctypes
import os
import random
import threading
import time


def append_line(path: str, text: str) -> None:
    """Appends one line to ``path`` in a single write (safe across processes)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


def lines(path: str) -> list[str]:
    """The lines of ``path``, or none if it does not exist yet."""
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def wait_for_file(path: str, timeout: float) -> bool:
    """Polls until ``path`` exists; False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def die_in_first_seconds(j: int, start: float, log: str) -> int:
    """The vignette's body: any worker that takes a task early exits."""
    if time.time() - start < 5:
        append_line(log, f"died {j} {os.getpid()}")
        os._exit(1)
    return j


def logged_square(
    i: int, log: str, sleep: float = 0.0, slow: int = -1, slow_sleep: float = 0.0
) -> int:
    """Logs ``start i pid``, sleeps (longer for iteration ``slow``), logs ``done``."""
    append_line(log, f"start {i} {os.getpid()}")
    time.sleep(slow_sleep if i == slow else sleep)
    append_line(log, f"done {i} {os.getpid()}")
    return i * i


def first_run_waits(i: int, log: str, hold: int, release: str, timeout: float) -> int:
    """Iteration ``hold`` waits for the file ``release`` on its first run only."""
    runs = sum(1 for line in lines(log) if line.startswith(f"start {i} "))
    append_line(log, f"start {i} {os.getpid()}")
    if i == hold and runs == 0:
        wait_for_file(release, timeout)
    append_line(log, f"done {i} {os.getpid()}")
    return i * i


def waits_for(i: int, log: str, hold: int, release: str, timeout: float) -> int:
    """Iteration ``hold`` waits for the file ``release`` on every run."""
    append_line(log, f"start {i} {os.getpid()}")
    if i == hold:
        wait_for_file(release, timeout)
    append_line(log, f"done {i} {os.getpid()}")
    return i * i


def poison(i: int, bad: int, log: str) -> int:
    """Iteration ``bad`` kills its worker process every time it runs."""
    if i == bad:
        append_line(log, f"died {i} {os.getpid()}")
        os._exit(7)
    return i * 10


def sleeps_past_limit(i: int, slow: int, seconds: float) -> int:
    """Iteration ``slow`` sleeps for ``seconds``; the others return at once."""
    if i == slow:
        time.sleep(seconds)
    return i + 100


def hold_gil(i: int, seconds: int, log: str) -> tuple[int, float, int, int]:
    """Spends ``seconds`` in one C call that keeps the GIL, and proves it does.

    ``ctypes.PyDLL`` calls a C function without releasing the GIL; libc's
    ``sleep`` then blocks the whole interpreter. A ticker thread records the
    time every 50 ms: it can tick before and after the call, never during.

    Returns:
        (i, seconds spent in the call, ticks during the call, ticks in all).
    """
    append_line(log, f"start {i} {os.getpid()}")
    ticks: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.05)

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    time.sleep(0.3)
    before = time.monotonic()
    ctypes.PyDLL(None).sleep(int(seconds))
    after = time.monotonic()
    time.sleep(0.3)
    stop.set()
    ticker.join()
    during = [t for t in ticks if before + 0.1 < t < after - 0.1]
    append_line(log, f"done {i} {os.getpid()}")
    return i, after - before, len(during), len(ticks)


def long_task(i: int, seconds: float, log: str) -> int:
    """Sleeps for ``seconds`` (a task that runs for minutes)."""
    append_line(log, f"start {i} {os.getpid()}")
    time.sleep(seconds)
    append_line(log, f"done {i} {os.getpid()}")
    return i + 1000


def late_body(i: int, log: str, release: str, timeout: float) -> int:
    """Task 0 waits for ``release.first`` on its first run only; task 2 waits
    for ``release.last`` on every run; the others return at once."""
    if i == 0:
        return first_run_waits(i, log, 0, release + ".first", timeout)
    return waits_for(i, log, 2, release + ".last", timeout)


def stress_body(i: int, k: int, log: str) -> int:
    """A short task of master ``k``: logs ``done k i pid``."""
    time.sleep(random.uniform(0.03, 0.09))
    append_line(log, f"done {k} {i} {os.getpid()}")
    return k * 1000 + i


def fails_on(i: int, bad: int, log: str, sleep: float) -> int:
    """Iteration ``bad`` raises ValueError at once; the others sleep, then return."""
    append_line(log, f"start {i} {os.getpid()}")
    if i == bad:
        append_line(log, f"done {i} {os.getpid()}")
        raise ValueError(f"iteration {i} is bad")
    time.sleep(sleep)
    append_line(log, f"done {i} {os.getpid()}")
    return i * i


def long_or_poison(i: int, runs: str, deaths: str) -> int:
    """Iteration 0 runs for 10 s; iteration 1 kills its worker every time."""
    if i == 0:
        return long_task(0, 10, runs)
    return poison(i, 1, deaths)
