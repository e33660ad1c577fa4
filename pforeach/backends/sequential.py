"""The sequential backend: every iteration in this process, one after another."""

from __future__ import annotations

from collections.abc import Generator

from .. import rng
from ..job import Job, LoadedEnv, TaskResult
from .base import Backend


class SequentialBackend(Backend):
    """Runs the loop in the calling process, as R's ``%do%`` does.

    Nothing is serialized, so the body sees the caller's objects themselves.
    Iterations are still seeded one by one, so random numbers come out as on
    any other backend, and the caller's generator states are restored after
    the loop. ``timeout`` is not enforced here.
    """

    name = "sequential"

    def run(self, job: Job) -> Generator[TaskResult, None, None]:
        env = LoadedEnv(job.env, job.job_id)
        with rng.preserved_state():
            for task in job.tasks:
                yield env.run(task, job.seeds)
