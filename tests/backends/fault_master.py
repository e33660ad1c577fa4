"""A master in its own process, for tests that interrupt or kill it.

Usage::

    python fault_master.py URL QUEUE LOG N SLEEP [NAME=VALUE ...]

Runs ``foreach(i=range(N)).dopar(logged_square)`` (each iteration sleeps
SLEEP seconds and logs to LOG) on a RedisBackend for QUEUE at URL; the
NAME=VALUE pairs are backend options (numbers). Prints one line:

* ``RESULT <list>`` and exits 0 when the loop returns;
* ``INTERRUPTED`` and exits 130 on KeyboardInterrupt (Ctrl+C, SIGINT);
* ``CANCELLED <message>`` and exits 3 on JobCancelledError;
* ``ERROR <type>: <message>`` and exits 4 on any other error.
"""

from __future__ import annotations

import functools
import sys

from fault_bodies import logged_square

from pforeach import JobCancelledError, foreach, register_backend
from pforeach.backends.redis import RedisBackend


def main() -> int:
    url, queue, log, n, sleep, *pairs = sys.argv[1:]
    options = {name: float(value) for name, value in (p.split("=", 1) for p in pairs)}
    register_backend(RedisBackend(queue, url, **options))
    body = functools.partial(logged_square, log=log, sleep=float(sleep))
    try:
        result = foreach(i=range(int(n))).dopar(body)
    except KeyboardInterrupt:
        print("INTERRUPTED", flush=True)
        return 130
    except JobCancelledError as exc:
        print(f"CANCELLED {exc}", flush=True)
        return 3
    except Exception as exc:
        print(f"ERROR {type(exc).__name__}: {exc}", flush=True)
        return 4
    print(f"RESULT {result}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
