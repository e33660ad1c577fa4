"""The backend registry: which backend ``dopar`` runs on.

Code that calls ``foreach`` never names a backend; whoever runs it registers
one. With none registered, ``dopar`` runs sequentially and warns once, as R's
foreach does.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

from ..errors import UnknownBackendError
from .base import Backend
from .sequential import SequentialBackend

__all__ = [
    "Backend",
    "get_backend",
    "register_backend",
    "registered_backend",
    "workers",
]

_lock = threading.Lock()
_current: Backend | None = None
_warned = False


def _make(name: str, *args: Any, **kwargs: Any) -> Backend:
    if name in ("sequential", "seq"):
        return SequentialBackend(*args, **kwargs)
    if name == "local":
        from .local import LocalBackend

        return LocalBackend(*args, **kwargs)
    if name == "redis":
        from .redis import RedisBackend

        return RedisBackend(*args, **kwargs)
    raise UnknownBackendError(
        f"unknown backend {name!r}; the backends are: sequential, local, redis"
    )


def register_backend(
    backend: Backend | str | None, *args: Any, **kwargs: Any
) -> Backend | None:
    """Makes ``backend`` the one ``dopar`` runs on, and returns it.

    Args:
        backend: a backend instance, or a name ("sequential", "local",
            "redis") to build one with ``*args`` and ``**kwargs``; None
            unregisters.

    Raises:
        UnknownBackendError: a name that is not one of the backends.

    Example:
        >>> register_backend("local", 2)  # doctest: +SKIP
    """
    global _current
    if isinstance(backend, str):
        backend = _make(backend, *args, **kwargs)
    elif backend is not None and not isinstance(backend, Backend):
        raise UnknownBackendError(
            f"register_backend takes a Backend or a name, not {backend!r}"
        )
    with _lock:
        _current = backend
    return backend


def registered_backend() -> Backend | None:
    """The registered backend, or None."""
    return _current


def get_backend() -> Backend:
    """The backend ``dopar`` would use now (sequential if none is registered)."""
    return _current if _current is not None else SequentialBackend()


def workers() -> int:
    """How many workers the registered backend has (an estimate that may change)."""
    return get_backend().workers()


def _backend_for_dopar() -> Backend:
    global _warned
    if _current is not None:
        return _current
    if not _warned:
        _warned = True
        warnings.warn(
            "no parallel backend registered; dopar runs sequentially "
            "(call pforeach.register_backend to choose one)",
            RuntimeWarning,
            stacklevel=3,
        )
    return SequentialBackend()
