"""Benchmarks of pforeach against joblib, concurrent.futures, RQ, Celery and Dask.

Run ``python -m benchmarks`` (``make bench``) for the full suite, which prints
one table and rewrites ``docs/benchmarks.md``; ``python -m benchmarks --smoke``
runs every workload at a tiny size, for the test suite. Peers that are not
installed appear as "not installed" rows.
"""
