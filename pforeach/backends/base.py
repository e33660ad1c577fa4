"""The interface every backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator
from types import TracebackType

from ..job import Job, TaskResult


class Backend(ABC):
    """Runs the tasks of a job somewhere and streams their results back.

    A backend only *runs* tasks: ordering, combining, error handling and
    progress are the loop's business, so that every backend gives the same
    answer. Its contract:

    * :meth:`run` yields exactly one :class:`TaskResult` per task of the job,
      in any order, or raises an error that says which task and why. A task
      whose process died or ran past ``job.timeout`` yields a result whose
      iterations are failures (:meth:`TaskResult.failed`), after at most
      ``job.max_attempts`` tries.
    * It pulls ``job.tasks`` lazily and only from the thread iterating
      :meth:`run`, so that a loop over a huge or endless iterable never
      materializes it.
    * If the generator is closed before the end (an error in the body with
      ``errorhandling='stop'``, Ctrl+C), it cancels the job's remaining work
      and leaves itself ready for the next loop.
    """

    #: The name the registry knows the backend by.
    name: str = ""

    @abstractmethod
    def run(self, job: Job) -> Generator[TaskResult, None, None]:
        """Runs every task of ``job`` and yields their results as they come."""

    def workers(self) -> int:
        """How many workers serve this backend now (an estimate)."""
        return 1

    def close(self) -> None:  # noqa: B027 - a backend with nothing to release
        """Releases processes and connections; the backend can start again."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
