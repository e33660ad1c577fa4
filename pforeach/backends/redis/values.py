"""Values of any size in Redis: one key when they fit, numbered parts otherwise.

Redis refuses strings over 512 MB, and large single writes stall the server,
so a value above the part size is cut into parts stored at ``K.part.0`` ...
``K.part.N-1`` and the message carries only ``b"#N"``. Readers put the parts
back together before the payload is checked and unpickled.
"""

from __future__ import annotations

from typing import Any

from ...errors import PayloadError
from ...serialize import split
from .keys import part_key

INLINE = b"="
PARTS = b"#"

#: Default part size: well under Redis's 512 MB limit on one value.
DEFAULT_PART_SIZE = 128 * 1024 * 1024

#: The most parts a blob may name: far beyond any real value, and low enough
#: that a forged ``#<huge>`` costs a reader nothing.
MAX_PARTS = 1_000_000


def _part_count(key: str, blob: bytes) -> int:
    digits = blob[1:21]
    if not digits.isdigit() or len(blob) > 21 or not 1 <= int(digits) <= MAX_PARTS:
        raise PayloadError(f"{key}: malformed part count {blob[1:20]!r}")
    return int(digits)


def write_value(pipe: Any, key: str, data: bytes, part_size: int, ttl: float) -> bytes:
    """Queues the writes of ``data`` on ``pipe`` and returns its blob.

    A value that fits is returned inline (nothing is written); a larger one
    is written as parts under ``key`` that expire after ``ttl`` seconds.
    """
    if len(data) <= part_size:
        return INLINE + data
    parts = split(data, part_size)
    for number, part in enumerate(parts):
        pipe.set(part_key(key, number), part, ex=max(1, int(ttl)))
    return PARTS + str(len(parts)).encode()


def read_value(client: Any, key: str, blob: bytes) -> bytes:
    """The bytes a blob made by :func:`write_value` stands for.

    Raises:
        PayloadError: the blob is malformed or a part has expired.
    """
    if blob[:1] == INLINE:
        return blob[1:]
    if blob[:1] != PARTS:
        raise PayloadError(f"{key}: unknown value encoding {blob[:1]!r}")
    count = _part_count(key, blob)
    chunks = []
    for number in range(count):
        part = client.get(part_key(key, number))
        if part is None:
            raise PayloadError(f"{key}: part {number} of {count} is missing")
        chunks.append(part)
    return b"".join(chunks)


def part_keys(key: str, blob: bytes) -> list[str]:
    """The part keys a blob refers to (none for an inline value)."""
    if blob[:1] != PARTS:
        return []
    try:
        return [part_key(key, n) for n in range(_part_count(key, blob))]
    except PayloadError:
        return []
