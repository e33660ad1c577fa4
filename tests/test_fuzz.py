"""Random and mutated bytes through every function that reads what Redis holds.

A worker or a master reads messages and payloads that anyone with write
access to Redis may have put there. Whatever the bytes, the decode path must
answer with :class:`PayloadError` (or :class:`SerializationError` for a
payload that passed its checks but does not unpickle) and nothing else: no
IndexError, no UnicodeDecodeError, no AssertionError, no hang.

None of this needs a Redis: the worker's decode path is the pure function
:func:`~pforeach.backends.redis.worker.decode_task`, given a dict for the
part keys a large payload refers to.
"""

from __future__ import annotations

import pickle

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pforeach import serialize
from pforeach.backends.redis.keys import (
    Keys,
    TaskHeader,
    decode_outcome,
    encode_outcome,
    parse_result,
    parse_task,
    result_message,
)
from pforeach.backends.redis.values import read_value, write_value
from pforeach.backends.redis.worker import decode_task
from pforeach.errors import PayloadError, SerializationError
from pforeach.job import Task, TaskResult

EXPECTED = (PayloadError, SerializationError)
SECRET = b"fuzz-secret"
KEYS = Keys("fuzzq")
HEADER = TaskHeader("0123456789abcdef0123", 3, "ab" * 16, 3, 2.5, 12345, None, "6-7")

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,  # nothing to keep between runs: the examples are cheap
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class _Parts(dict):
    """Part keys as a worker would find them in Redis."""


def task_message(
    secret: bytes | None, part_size: int = 1 << 20
) -> tuple[bytes, _Parts]:
    """A genuine task message as the master makes it, and its part keys."""
    task = Task(3, [(6, {"x": 1}), (7, {"x": [1, 2, 3]})])
    head = HEADER.encode()
    identity = KEYS.identity("task", HEADER.job_id, HEADER.task_id, head.decode())
    sealed = serialize.seal(serialize.dumps(task), identity, secret)
    parts = _Parts()

    class Collect:
        def set(self, key: str, value: bytes, ex: int) -> None:
            parts[key] = value

    blob = write_value(
        Collect(), KEYS.task_value(HEADER.job_id, 3), sealed, part_size, 60
    )
    return head + blob, parts


GENUINE, _ = task_message(SECRET)
GENUINE_PARTED, GENUINE_PARTS = task_message(SECRET, part_size=64)
UNSIGNED, _ = task_message(None)


def decode(
    message: bytes, secret: bytes | None = SECRET, parts: dict | None = None
) -> None:
    try:
        decode_task(message, KEYS, secret, (parts or {}).get)
    except EXPECTED:
        pass


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` with a few bytes flipped, cut, inserted or deleted."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete", "truncate"]))
        if not data:
            data += draw(st.binary(min_size=1, max_size=8))
            continue
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at]
        else:
            del data[at:]
    return bytes(data)


def header_fields() -> st.SearchStrategy[bytes]:
    """Task headers whose fields are drawn from plausible and hostile values."""
    field = st.one_of(
        st.sampled_from(
            [
                b"-",
                b"0",
                b"1",
                b"nan",
                b"inf",
                b"-1",
                b"1e999",
                b"0x10",
                b"1_0",
                b" ",
                b"",
                b"9" * 5000,
                b"\xff",
                b"%w",
                b"a.b",
            ]
        ),
        st.binary(max_size=12).filter(lambda b: b" " not in b and b"\n" not in b),
    )
    return st.lists(field, min_size=0, max_size=10).map(
        lambda fs: b" ".join([b"PFT1", *fs])
    )


@FUZZ
@given(st.binary(max_size=2048))
@example(b"")
@example(b"PFT1")
@example(b"PFT1\n")
@example(b"PFT1 a 1 b 1 - 1 - 1\n")
@example(b"PFT1 a 1 b 1 - 1 - 1\n#")
@example(b"PFT1 a 1 b 1 - 1 - 1\n#99999999999999999999999")
@example(b"PFT1 a 1 b 1 - 1 - 1\n#-3")
@example(b"PFT1 a 1 b 1 - 1 - 1\n=PF\x01")
@example(b"PFT1 a 1 b 1 - 1 - 1\n=PF\x02\x00payload")
@example(b"PFT1 a 1 b 1 nan 1 - 1\n=PF\x01\x00")
def test_random_bytes_as_a_task_message(data):
    decode(data)
    decode(data, secret=None)


@FUZZ
@given(header_fields(), st.binary(max_size=64))
def test_hostile_header_fields(head, body):
    decode(head + b"\n" + body)
    try:
        header, _ = parse_task(head + b"\n" + body)
    except PayloadError:
        return
    # Whatever got through is something the worker and its supervisor can use.
    assert header.timeout is None or 0 < header.timeout < float("inf")
    assert header.task_id >= 0 and header.max_attempts >= 0
    assert header.job_id.isalnum() and header.job_id.isascii()


@FUZZ
@given(mutated(GENUINE))
def test_mutated_signed_task_message(data):
    if data == GENUINE:
        return
    with pytest.raises(PayloadError):
        decode_task(data, KEYS, SECRET, {}.get)


@FUZZ
@given(mutated(GENUINE_PARTED), st.integers(0, 100))
def test_mutated_message_of_a_task_in_parts(data, seed):
    decode(data, parts=GENUINE_PARTS)
    # and with one part damaged instead
    parts = dict(GENUINE_PARTS)
    key = sorted(parts)[seed % len(parts)]
    parts[key] = parts[key][: seed % 7] + b"\x00" + parts[key][seed % 7 :]
    with pytest.raises(PayloadError):
        decode_task(GENUINE_PARTED, KEYS, SECRET, parts.get)


@FUZZ
@given(mutated(UNSIGNED))
def test_mutated_unsigned_task_message(data):
    # Without a secret nothing vouches for the bytes: they may be unpickled,
    # but only the two expected errors may come out.
    decode(data, secret=None)


def test_genuine_messages_decode():
    for message, secret, parts in (
        (GENUINE, SECRET, {}),
        (GENUINE_PARTED, SECRET, GENUINE_PARTS),
        (UNSIGNED, None, {}),
    ):
        header, task = decode_task(message, KEYS, secret, parts.get)
        assert header == HEADER
        assert task == Task(3, [(6, {"x": 1}), (7, {"x": [1, 2, 3]})])


@FUZZ
@given(st.binary(max_size=256), st.binary(max_size=40), st.sampled_from([None, SECRET]))
def test_unseal_random_bytes(data, identity, secret):
    try:
        serialize.unseal(data, identity.decode(errors="replace"), secret)
    except PayloadError:
        pass


SEALED = serialize.seal(b"some payload bytes", "q/result/j/1", SECRET)


@FUZZ
@given(mutated(SEALED))
def test_unseal_mutated_envelope(data):
    if data == SEALED:
        return
    with pytest.raises(PayloadError):
        serialize.unseal(data, "q/result/j/1", SECRET)


@FUZZ
@given(
    st.binary(max_size=64), st.dictionaries(st.text(max_size=20), st.binary(max_size=8))
)
@example(b"#1000001", {})
@example(b"#0", {})
@example(b"#2", {"k.part.0": b"x"})
def test_read_value_random_blobs(blob, parts):
    try:
        value = read_value(parts, "k", blob)
    except PayloadError:
        return
    assert isinstance(value, bytes)


@FUZZ
@given(st.binary(max_size=512))
@example(b"PFR1 j 1 w\n")
@example(b"PFN1 j 1 w\n\xff\xfe")
@example(b"PFR1 j x w\n=")
@example(b"PFR1 \xff 1 w\n=")
def test_parse_result_random_bytes(data):
    try:
        _tag, job, task, wid, _body = parse_result(data)
    except PayloadError:
        return
    assert isinstance(task, int) and isinstance(job, str) and isinstance(wid, str)


RESULT = result_message(b"PFR1", "j0", 1, "w-1", b"=" + SEALED)


@FUZZ
@given(mutated(RESULT))
def test_parse_result_mutated(data):
    try:
        parse_result(data)
    except PayloadError:
        pass


OUTCOMES = [
    encode_outcome("ok", TaskResult(1, [(0, "value")], size=1)),
    encode_outcome("fail", ValueError("broken")),
    encode_outcome("noenv", None),
]


@FUZZ
@given(st.one_of(st.binary(max_size=256), *(mutated(o) for o in OUTCOMES)))
@example(b"ok\n" + pickle.dumps(42))
@example(b"fail\n" + pickle.dumps("not an exception"))
@example(b"noenv\n" + pickle.dumps([1]))
def test_decode_outcome(data):
    try:
        kind, value = decode_outcome(data)
    except EXPECTED:
        return
    # Whatever decodes keeps the promise its kind makes, so the master can
    # use it without further checks.
    assert {"ok": TaskResult, "fail": BaseException, "noenv": type(None)}[kind]
    assert isinstance(
        value, {"ok": TaskResult, "fail": BaseException, "noenv": type(None)}[kind]
    )


@pytest.mark.parametrize(
    "payload",
    [
        b"ok\n" + pickle.dumps(42),
        b"fail\n" + pickle.dumps("text"),
        b"noenv\n" + pickle.dumps(1),
    ],
)
def test_decode_outcome_refuses_a_value_of_the_wrong_type(payload):
    with pytest.raises(PayloadError, match="result holds a"):
        decode_outcome(payload)


def test_an_equivalent_rewrite_of_a_signed_header_fails_the_check():
    # "2.50" reads as the same time limit as "2.5", and "012345" as the same
    # seed, but the master signed the line it sent, not its meaning.
    for old, new in ((b" 2.5 ", b" 2.50 "), (b" 12345 ", b" 012345 ")):
        assert old in GENUINE
        with pytest.raises(PayloadError, match="signature check failed"):
            decode_task(GENUINE.replace(old, new, 1), KEYS, SECRET, {}.get)
