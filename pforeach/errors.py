"""The exceptions pforeach raises.

Every exception derives from :class:`PforeachError`, so ``except PforeachError``
catches anything the library itself raises. Errors in the user's loop body
reach the caller as :class:`IterationError`, with the original exception (or
a stand-in when it could not cross a process boundary) chained as
``__cause__``.
"""

from __future__ import annotations


class PforeachError(Exception):
    """Base class of every pforeach exception."""


class OptionError(PforeachError, ValueError):
    """A loop option, an argument or the loop body is not acceptable."""


class UnknownBackendError(PforeachError, LookupError):
    """A backend name that is not registered."""


class SerializationError(PforeachError):
    """A value could not be serialized or deserialized.

    Attributes:
        name: the variable (or role, such as ``"body"``) that failed, if known.
    """

    def __init__(self, message: str, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name

    def __reduce__(self) -> tuple[type, tuple[str, str | None]]:
        return (type(self), (str(self), self.name))


class PayloadError(PforeachError):
    """A payload read from a queue is malformed, of an unknown format or forged."""


class BackendUnavailableError(PforeachError, ConnectionError):
    """The backend's server could not be reached within the allowed time."""


class JobCancelledError(PforeachError):
    """The job was removed (for example by ``remove_job``) while it ran."""


class TaskTimeoutError(PforeachError):
    """A task ran longer than the loop's ``timeout`` and was stopped."""


class WorkerLostError(PforeachError):
    """The process running a task died, every time it was tried."""


class RemoteError(PforeachError):
    """Stands in for an exception that could not be sent back from a worker.

    Attributes:
        type_name: the qualified name of the original exception's class.
    """

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.type_name, self.message))


class IterationError(PforeachError):
    """An iteration of the loop failed and ``errorhandling`` was ``'stop'``.

    Attributes:
        index: the position of the failed iteration in the loop (0-based,
            counting only iterations kept by ``when``).
        values: short reprs of the loop variables of that iteration.
        job_id: the job the iteration belonged to.
        remote_traceback: the traceback text captured where the body ran.
    """

    def __init__(
        self,
        index: int,
        values: dict[str, str] | None,
        error: BaseException,
        remote_traceback: str,
        job_id: str = "",
    ) -> None:
        shown = ", ".join(f"{k}={v}" for k, v in (values or {}).items())
        where = f"iteration {index}" + (f" ({shown})" if shown else "")
        job = f" of job {job_id}" if job_id else ""
        text = f"{where}{job} failed: {type(error).__name__}: {error}"
        if remote_traceback:
            text += "\n\nTraceback where the body ran:\n" + remote_traceback.rstrip()
        super().__init__(text)
        self.index = index
        self.values = values
        self.error = error
        self.job_id = job_id
        self.remote_traceback = remote_traceback

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        args = (self.index, self.values, self.error, self.remote_traceback, self.job_id)
        return (type(self), args)
