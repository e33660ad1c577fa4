"""The examples run as a user would run them, and say the right things.

Each runs as a subprocess with ``--backend redis`` and no Redis URL in its
environment, so it starts its own redis-server and workers; sizes are cut
down where the example allows it.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.timeout(180)


def run_example(name: str, *args: str) -> str:
    """Runs ``examples/<name>`` and returns its standard output."""
    env = {k: v for k, v in os.environ.items() if k != "PFOREACH_REDIS_URL"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=150,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    # Clean output: nothing on standard error (no worker logs, no warnings).
    assert proc.stderr.strip() == "", proc.stderr
    return proc.stdout


def field(output: str, label: str) -> str:
    """The text after ``label:`` on its line of ``output``."""
    match = re.search(rf"^{re.escape(label)}:\s*(.+)$", output, re.MULTILINE)
    assert match, f"no {label!r} line in:\n{output}"
    return match.group(1).strip()


def test_make_demo_estimates_pi_on_redis():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n\t(.+)$", makefile, re.MULTILINE)
    assert recipe, "no demo target in the Makefile"
    command = shlex.split(recipe.group(1))
    assert command[1:] == ["examples/pi.py", "--backend", "redis", "--workers", "2"]

    output = run_example("pi.py", *command[2:])
    estimate = float(field(output, "estimate"))
    assert abs(estimate - math.pi) < 0.01
    assert float(field(output, "error")) == pytest.approx(
        abs(estimate - math.pi), abs=1e-7
    )
    assert "10 tasks of 1,000,000 points" in field(output, "time")
    assert field(output, "workers") == "2 (redis)"


def test_pi_gives_the_same_estimate_on_every_backend_with_a_seed():
    small = ["--seed", "3", "--points", "200000", "--workers", "2"]
    estimates = {
        backend: float(
            field(run_example("pi.py", "--backend", backend, *small), "estimate")
        )
        for backend in ("seq", "local", "redis")
    }
    assert len(set(estimates.values())) == 1, estimates
    assert abs(estimates["redis"] - math.pi) < 0.01


def test_bootstrap_matches_a_sequential_run():
    output = run_example(
        "bootstrap.py",
        "--backend",
        "redis",
        "--replicates",
        "600",
        "--size",
        "200",
        "--chunksize",
        "50",
    )
    assert field(output, "same as a sequential run") == "yes"
    assert "600 replicates in chunks of 50 on 2 worker(s) (redis)" in output
    sample = re.search(r"mean (\S+), median (\S+)", output)
    assert sample
    for name, observed in zip(("mean", "median"), map(float, sample.groups())):
        row = re.search(
            rf"^{name}\s+(\S+)\s+(\S+)\s+\[(\S+), (\S+)\]$", output, re.MULTILINE
        )
        assert row, output
        estimate, stderr, low, high = map(float, row.groups())
        assert 0 < stderr < 1
        assert low < estimate < high
        # The bootstrap distribution is centred near the sample's statistic.
        assert abs(estimate - observed) < 3 * stderr


def test_large_data_sums_its_parts_in_redis():
    output = run_example(
        "large_data.py", "--backend", "redis", "--parts", "4", "--length", "200000"
    )
    assert field(output, "match") == "yes"
    assert field(output, "sum in the loop") == field(output, "sum directly")
    assert int(field(output, "sum directly")) > 0
    assert "in 4 parts" in output
    assert "on 2 worker(s) (redis)" in output


def test_worker_queues_serves_two_queues_with_one_pool():
    # One worker: it alone serves both queues, so it must run tasks of both
    # (with two, which worker takes which task is up to the scheduler).
    output = run_example("worker_queues.py", "--backend", "redis", "--workers", "1")
    pools = re.findall(
        r"^queue (\w+): (\d+) worker\(s\): (\[.*\])$", output, re.MULTILINE
    )
    assert [(queue, count) for queue, count, _ in pools] == [
        ("reports", "1"),
        ("simulations", "1"),
    ]
    assert pools[0][2] == pools[1][2]  # the same processes
    assert field(output, "reports") == "12 results, correct: yes"
    assert field(output, "simulations") == "20 results, same as sequential: yes"
    assert int(field(output, "worker processes that ran tasks of both queues")) == 1


@pytest.mark.parametrize(
    "name", ["pi.py", "bootstrap.py", "large_data.py", "worker_queues.py"]
)
def test_examples_explain_their_options(name):
    output = run_example(name, "--help")
    assert "--backend" in output
    assert "--url" in output
    assert "--workers" in output
