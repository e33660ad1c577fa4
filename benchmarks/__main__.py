"""Command line: ``python -m benchmarks [--smoke] [--runs N] [--systems ...]``."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import measure, report
from .systems import ROOT, Context, System, make_systems
from .workloads import FULL, SMOKE, WORKLOADS, Bench, run_benchmark, scratch_dir

if TYPE_CHECKING:
    from pforeach.backends.redis.server import RedisServer

DOC = ROOT / "docs" / "benchmarks.md"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Per-task cost of pforeach and its peers, side by side.",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes and one run: checks that everything runs "
        "(the figures mean nothing)",
    )
    parser.add_argument(
        "--runs", type=int, help="runs per workload (default 3; 1 with --smoke)"
    )
    parser.add_argument(
        "--systems",
        help="comma-separated subset: " + ", ".join(s.key for s in make_systems()),
    )
    parser.add_argument(
        "--workloads",
        help="comma-separated subset: " + ", ".join(w.key for w in WORKLOADS),
    )
    parser.add_argument(
        "--doc",
        type=Path,
        help=f"write the Markdown report here (default: {DOC.relative_to(ROOT)} "
        "for a full run of everything, nowhere otherwise)",
    )
    parser.add_argument("--no-doc", action="store_true", help="do not write the report")
    parser.add_argument("--json", type=Path, help="also save the results as JSON here")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="measure nothing: print and write the report of results saved by --json",
    )
    parser.add_argument(
        "--note", default="", help="a note for the report (e.g. a shared machine)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be >= 1")
    return args


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _split(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    # Libraries that set their own loggers' levels (distributed) stay quiet too.
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)

    def progress(line: str) -> None:
        if not args.quiet:
            try:
                print(line, file=sys.stderr, flush=True)
            except OSError:  # a closed pipe must not stop the run or its clean-up
                pass

    # SIGTERM (a timeout, a CI cancel) unwinds like Ctrl+C, so that the Redis
    # server and every system's workers are stopped on the way out.
    signal.signal(signal.SIGTERM, _exit_on_signal)

    if args.render is not None:
        record = report.Record.from_json(args.render.read_text())
        if args.note:
            record.note = args.note
        systems = make_systems(record.systems)
        full_run = True
    else:
        sizes = SMOKE if args.smoke else FULL
        if args.runs is not None:
            sizes = replace(sizes, runs=args.runs)
        systems = make_systems(_split(args.systems))
        workloads = _split(args.workloads)
        if workloads:
            unknown = set(workloads) - {w.key for w in WORKLOADS}
            if unknown:
                raise SystemExit(f"unknown workload(s) {sorted(unknown)}")
        record = _measure(sizes, systems, workloads, args, progress)
        full_run = not (args.smoke or args.systems or args.workloads)

    print(report.table(record.results, systems, record.sizes))
    print()
    if args.smoke:
        print("Targets (smoke mode: sizes are tiny, so MET/MISSED means nothing here):")
    else:
        print("Targets:")
    print("\n".join(report.target_lines(record.results, record.sizes)))

    doc = args.doc if args.doc is not None else (DOC if full_run else None)
    if doc is not None and not args.no_doc:
        doc.write_text(report.document(record, systems))
        progress(f"wrote {doc}")
    if args.json is not None:
        args.json.write_text(record.to_json())
    return 0


def _measure(
    sizes: report.Sizes,
    systems: list[System],
    workloads: list[str] | None,
    args: argparse.Namespace,
    progress: Callable[[str], None],
) -> report.Record:
    # The master imports NumPy up front, as a numeric script would, so every
    # system and workload runs in the same kind of process (with NumPy loaded,
    # pforeach also seeds NumPy's global generator for every iteration).
    import numpy  # noqa: F401

    # Worker processes of every system import the bodies from this checkout.
    path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    os.chdir(ROOT)
    started = time.monotonic()
    when = report.now()
    scratch = scratch_dir()
    server = _start_redis(progress)
    try:
        ctx = Context(server, scratch, smoke=args.smoke)
        admin = server.client() if server is not None else None
        bench = Bench(ctx, sizes, admin)
        redis_version = server.version if server is not None else "not available"
        machine = measure.machine(redis_version)
        results = run_benchmark(systems, bench, workloads, progress)
        if admin is not None:
            admin.close()
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return report.Record(
        sizes=sizes,
        systems=[s.key for s in systems],
        machine=machine,
        versions=measure.package_versions(),
        results=results,
        load_after=measure.load_average(),
        minutes=(time.monotonic() - started) / 60,
        note=args.note,
        when=when,
    )


def _start_redis(progress: Callable[[str], None]) -> RedisServer | None:
    """The private redis-server every Redis-based system uses, if one can start."""
    from pforeach.backends.redis.server import RedisServer

    try:
        return RedisServer().start()
    except Exception as exc:  # no binary: the Redis-based rows say so
        progress(f"no redis-server: {exc}")
        return None


if __name__ == "__main__":
    sys.exit(main())
