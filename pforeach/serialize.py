"""Serialization: dill round trips, capture checks, sealed envelopes, splitting.

Three concerns live here, each used by every backend that crosses a process
boundary:

* :func:`dumps` / :func:`loads` turn values into bytes and back. Plain data
  goes through the C pickler; anything it cannot handle by reference (a
  lambda, a closure, a class defined in ``__main__``) goes through dill, which
  ships code by value.
* :func:`check_capturable` looks at what a loop body captures before anything
  is submitted, so that a lock, an open file or a socket fails early with the
  name of the variable that holds it.
* :func:`seal` / :func:`unseal` wrap a payload in a versioned envelope that
  can carry an HMAC-SHA256 over the payload and its identity (queue, job,
  task). A payload is checked before a single byte of it is unpickled.
"""

from __future__ import annotations

import dis
import hashlib
import hmac
import io
import pickle
import socket
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import dill

from .errors import PayloadError, SerializationError

PROTOCOL = 5

#: Envelope layout: magic, format version, flags, [32-byte MAC], payload.
MAGIC = b"PF"
VERSION = 1
_FLAG_SIGNED = 1
_MAC_SIZE = 32
_HEADER = len(MAGIC) + 2


def dumps(value: Any) -> bytes:
    """Serializes ``value``, shipping code by value where it must.

    Raises:
        SerializationError: neither pickle nor dill can serialize it.
    """
    try:
        data = pickle.dumps(value, PROTOCOL)
    except Exception:
        data = b""
    # pickle stores functions and classes by reference; one defined in the
    # master's __main__ would not resolve on a worker, so dill ships it whole.
    if data and b"__main__" not in data:
        return data
    try:
        return _dill_dumps(value)
    except Exception as exc:
        raise SerializationError(
            f"cannot serialize a {type(value).__name__}: {exc}"
        ) from exc


def _dill_dumps(value: Any) -> bytes:
    try:
        return dill.dumps(value, protocol=PROTOCOL, recurse=True)
    except RecursionError:
        # dill's recurse mode never ends on a closure that calls itself; such a
        # function still travels with its globals taken whole, not name by name.
        return dill.dumps(value, protocol=PROTOCOL, recurse=False)


def loads(data: bytes | memoryview) -> Any:
    """Deserializes bytes made by :func:`dumps` (dill output included)."""
    try:
        return pickle.loads(data)
    except Exception as exc:
        raise SerializationError(f"cannot deserialize payload: {exc}") from exc


def digest(data: bytes) -> str:
    """A short content hash, used to recognize identical job environments."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


# -- capture checks -------------------------------------------------------------

_FORBIDDEN: tuple[type, ...] = (
    type(threading.Lock()),
    type(threading.RLock()),
    threading.Condition,
    threading.Event,
    threading.Semaphore,
    io.IOBase,
    socket.socket,
    types.GeneratorType,
)


def captured_variables(func: Callable[..., Any]) -> Iterator[tuple[str, Any]]:
    """Yields the (name, value) pairs a function reads from outside itself.

    That is the free variables of its closure and the globals its code (and
    the code of functions nested in it) refers to. Modules are skipped: they
    are imported on the worker, not shipped.
    """
    code = getattr(func, "__code__", None)
    if code is None:
        return
    closure = getattr(func, "__closure__", None) or ()
    for name, cell in zip(code.co_freevars, closure):
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell: assigned after the function was made
            continue
        if not isinstance(value, types.ModuleType):
            yield name, value
    func_globals = getattr(func, "__globals__", {})
    seen: set[str] = set()
    for name in _global_names(code):
        if name in func_globals and name not in seen:
            seen.add(name)
            value = func_globals[name]
            if not isinstance(value, types.ModuleType):
                yield name, value


_GLOBAL_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME"})


def _global_names(code: types.CodeType) -> Iterator[str]:
    # Only names loaded as globals: co_names also holds attribute names, and
    # `obj.lock` must not be mistaken for a module-level `lock`.
    for instruction in dis.get_instructions(code):
        if instruction.opname in _GLOBAL_LOADS:
            yield instruction.argval
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _global_names(const)


def check_capturable(name: str, value: Any, trial: bool = True) -> None:
    """Raises SerializationError if ``value`` cannot be shipped to a worker.

    Locks, open files, sockets and generators are refused even where dill
    could copy them, because the copy would not be the same object: a lock
    that locks nothing, a file at another offset on another machine.

    Args:
        name: the variable's name, for the message.
        value: its value.
        trial: also serialize ``value`` on its own, to tell whether it is
            what cannot be serialized; False checks its type only.
    """
    if isinstance(value, _FORBIDDEN):
        raise SerializationError(
            f"the loop captures {name!r}, a {type(value).__name__}, which cannot "
            "be sent to another process; create it inside the body or in "
            "worker_init instead",
            name,
        )
    if not trial:
        return
    try:
        _dill_dumps(value)
    except Exception as exc:
        raise SerializationError(
            f"the loop captures {name!r} ({type(value).__name__}), which cannot "
            f"be serialized: {exc}",
            name,
        ) from exc


# -- sealed envelopes ------------------------------------------------------------


def _mac(secret: bytes, identity: str, payload: bytes | memoryview) -> bytes:
    mac = hmac.new(secret, digestmod=hashlib.sha256)
    mac.update(MAGIC + bytes((VERSION,)))
    mac.update(identity.encode() + b"\0")
    mac.update(payload)
    return mac.digest()


def seal(payload: bytes, identity: str, secret: bytes | None) -> bytes:
    """Wraps ``payload`` in an envelope, signed when ``secret`` is given.

    Args:
        payload: the serialized bytes.
        identity: what the payload belongs to (for example
            ``"jobs/task/JOB/7"``); a payload copied to another identity
            fails :func:`unseal`.
        secret: the shared HMAC key, or None for an unsigned envelope.
    """
    if secret is None:
        return MAGIC + bytes((VERSION, 0)) + payload
    return (
        MAGIC
        + bytes((VERSION, _FLAG_SIGNED))
        + _mac(secret, identity, payload)
        + payload
    )


def unseal(data: bytes, identity: str, secret: bytes | None) -> memoryview:
    """Checks an envelope made by :func:`seal` and returns its payload.

    Raises:
        PayloadError: the bytes are not an envelope, come from a format
            version this pforeach does not know, are unsigned or forged while
            a secret is configured, or are signed while none is.
    """
    if len(data) < _HEADER or data[:2] != MAGIC:
        raise PayloadError(f"{identity}: not a pforeach payload")
    version, flags = data[2], data[3]
    if version != VERSION:
        raise PayloadError(
            f"{identity}: payload format version {version}, this pforeach "
            f"reads version {VERSION}"
        )
    if flags & ~_FLAG_SIGNED:
        # Unknown flags are not covered by the MAC: refuse them rather than
        # let an envelope be altered without the check noticing.
        raise PayloadError(f"{identity}: unknown envelope flags {flags:#04x}")
    view = memoryview(data)
    signed = bool(flags & _FLAG_SIGNED)
    if secret is None:
        if signed:
            raise PayloadError(
                f"{identity}: payload is signed but no secret is configured here"
            )
        return view[_HEADER:]
    if not signed:
        raise PayloadError(f"{identity}: payload is not signed; a secret is required")
    if len(data) < _HEADER + _MAC_SIZE:
        raise PayloadError(f"{identity}: truncated payload")
    payload = view[_HEADER + _MAC_SIZE :]
    expected = _mac(secret, identity, payload)
    if not hmac.compare_digest(expected, data[_HEADER : _HEADER + _MAC_SIZE]):
        raise PayloadError(
            f"{identity}: signature check failed (a different secret, or a "
            "tampered or misplaced payload)"
        )
    return payload


def split(data: bytes, part_size: int) -> list[bytes]:
    """Cuts ``data`` into parts of at most ``part_size`` bytes (at least one)."""
    if part_size < 1:
        raise ValueError("part_size must be >= 1")
    if len(data) <= part_size:
        return [data]
    view = memoryview(data)
    return [bytes(view[i : i + part_size]) for i in range(0, len(data), part_size)]
