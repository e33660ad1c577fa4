"""The benchmark suite runs end to end (tiny sizes, no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402
from benchmarks.systems import PfSequential, System  # noqa: E402
from benchmarks.workloads import ROWS, SMOKE, Bench, run_benchmark  # noqa: E402

#: Rows where a peer may legitimately give no figure: its loop fails when a
#: worker is killed (joblib, concurrent.futures) or waits beyond the deadline (RQ).
_MAY_FAIL = {"W5"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    doc = ROOT / "docs" / "benchmarks.md"
    before = doc.stat().st_mtime_ns if doc.exists() else None
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--quiet", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = doc.stat().st_mtime_ns if doc.exists() else None
    assert before == after, "--smoke must not rewrite docs/benchmarks.md"
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.timeout(180)
def test_smoke_prints_one_table_with_every_system_and_workload(
    smoke: tuple[str, dict],
) -> None:
    stdout, data = smoke
    lines = stdout.splitlines()
    assert lines[0].startswith("| Workload | System | Median | Min | Max | Unit")
    # Each workload's title heads its group of rows, one row per system.
    seen = set()
    title = ""
    for line in lines[2:]:
        if not line.startswith("| "):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        title = cells[0] or title
        seen.add((title, cells[1]))
    titles = report.titles(SMOKE)
    labels = [cls().label for cls in _all_systems()]
    for row in ROWS:
        for label in labels:
            assert (titles[row.key], label) in seen, f"no table row: {row.key}, {label}"
    assert "Targets" in stdout
    assert set(data["results"]) == {row.key for row in ROWS}


@pytest.mark.timeout(180)
def test_smoke_pforeach_systems_give_figures(smoke: tuple[str, dict]) -> None:
    _, data = smoke
    for row, cells in data["results"].items():
        for key in ("pf-seq", "pf-local", "pf-redis"):
            cell = cells[key]
            if cell["text"] and cell["text"].startswith("n/a"):
                continue
            assert cell["errors"] == [], f"{key} {row}: {cell['errors']}"
            assert len(cell["runs"]) == 1 and cell["runs"][0]["value"] >= 0, (key, row)


@pytest.mark.timeout(180)
def test_smoke_peers_run_or_say_not_installed(smoke: tuple[str, dict]) -> None:
    _, data = smoke
    for cls in _all_systems():
        system = cls()
        if system.is_pforeach:
            continue
        installed = all(importlib.util.find_spec(m) for m in system.requires)
        for row, cells in data["results"].items():
            cell = cells[system.key]
            if not installed:
                assert cell["text"] == "not installed", (system.key, row)
            elif cell["text"] is None and row not in _MAY_FAIL:
                assert cell["runs"], f"{system.key} {row}: {cell['errors']}"


@pytest.mark.timeout(30)
def test_missing_peer_is_a_row_not_a_failure(tmp_path: Path) -> None:
    class Missing(System):
        key = "missing"
        label = "a peer that is not installed"
        requires = ("pfbench_no_such_module_xyz",)

    systems = [Missing(), PfSequential()]
    from benchmarks.systems import Context

    bench = Bench(Context(None, tmp_path, smoke=True), SMOKE)
    results = run_benchmark(systems, bench, ["W1", "W4"], progress=lambda line: None)
    assert results["W1"]["missing"].text == "not installed"
    assert results["W1"]["pf-seq"].runs, results["W1"]["pf-seq"].errors
    text = report.table(results, systems, SMOKE)
    assert "| a peer that is not installed | not installed |" in text


@pytest.mark.timeout(30)
def test_wrong_answer_is_an_error_not_a_figure(tmp_path: Path) -> None:
    class Wrong(PfSequential):
        key = "wrong"
        label = "a system that loses an iteration"

        def trivial(self, n: int) -> list[int]:
            return super().trivial(n)[:-1]

    from benchmarks.systems import Context

    system = Wrong()
    bench = Bench(Context(None, tmp_path, smoke=True), SMOKE)
    results = run_benchmark([system], bench, ["W1"], progress=lambda line: None)
    cell = results["W1"]["wrong"]
    assert cell.runs == []
    assert cell.errors and "wrong result" in cell.errors[0]


def _all_systems() -> tuple[type[System], ...]:
    from benchmarks.systems import ALL

    return ALL
