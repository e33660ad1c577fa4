"""pforeach: write a loop once, run it sequentially, on local processes, or on
an elastic pool of workers that listen on a Redis queue.

    >>> from pforeach import foreach
    >>> foreach(j=range(10), combine=sum).do(lambda j: j * j)
    285
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .backends import get_backend, register_backend, registered_backend, workers
from .backends.base import Backend
from .backends.local import LocalBackend
from .backends.sequential import SequentialBackend
from .errors import (
    BackendUnavailableError,
    IterationError,
    JobCancelledError,
    OptionError,
    PayloadError,
    PforeachError,
    RemoteError,
    SerializationError,
    TaskTimeoutError,
    UnknownBackendError,
    WorkerLostError,
)
from .loop import Foreach, foreach, times
from .options import get_overrides, set_options
from .rng import iteration_seed

if TYPE_CHECKING:
    from .backends.redis import RedisBackend

__version__ = "0.1.0"

__all__ = [
    # writing loops
    "Foreach",
    "foreach",
    "times",
    "iteration_seed",
    "set_options",
    "get_overrides",
    # choosing where they run
    "Backend",
    "LocalBackend",
    "RedisBackend",
    "SequentialBackend",
    "get_backend",
    "register_backend",
    "registered_backend",
    "workers",
    # errors
    "BackendUnavailableError",
    "IterationError",
    "JobCancelledError",
    "OptionError",
    "PayloadError",
    "PforeachError",
    "RemoteError",
    "SerializationError",
    "TaskTimeoutError",
    "UnknownBackendError",
    "WorkerLostError",
]


def __getattr__(name: str) -> Any:
    # The Redis backend imports redis-py; load it only when asked for.
    if name == "RedisBackend":
        from .backends.redis import RedisBackend

        return RedisBackend
    raise AttributeError(f"module 'pforeach' has no attribute {name!r}")
