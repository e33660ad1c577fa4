"""What a loop ships to its workers: exports, packages, worker_init, capture checks."""

# Tests take the imported `backend` fixture as a parameter of the same name.
# ruff: noqa: F811

from __future__ import annotations

import functools
import os
import socket
import sys
import threading
import uuid
from pathlib import Path

import pytest
from backend_fixtures import append_line, backend, read_lines  # noqa: F401

from pforeach import (
    OptionError,
    SequentialBackend,
    SerializationError,
    foreach,
    set_options,
)

pytestmark = pytest.mark.timeout(60)

SHARED_SETTING = "module value"
MODULE_LOCK = threading.Lock()

#: Set by ``remember`` (a worker_init) in whichever process runs it.
INIT_TOKEN = None


def read_setting(x):
    return (x, SHARED_SETTING)


def scaled(x):
    return x * EXPORTED_SCALE  # noqa: F821 - provided by export=


def read_token(x):
    return INIT_TOKEN


def remember(token):
    global INIT_TOKEN
    INIT_TOKEN = token


def uses_module_lock(x):
    with MODULE_LOCK:
        return x


# -- export and noexport ---------------------------------------------------------


def test_export_mapping_provides_a_global(backend):
    loop = foreach(x=range(4), export={"EXPORTED_SCALE": 3})
    assert loop.dopar(scaled) == [0, 3, 6, 9]
    assert foreach(x=range(2)).export(EXPORTED_SCALE=-1).dopar(scaled) == [0, -1]


def test_export_by_name_from_the_caller(backend):
    EXPORTED_SCALE = 5  # the body reads it as a global
    assert foreach(x=range(3)).export("EXPORTED_SCALE").dopar(scaled) == [0, 5, 10]
    assert EXPORTED_SCALE == 5


def test_set_options_export_adds_names(backend):
    EXPORTED_SCALE = 2  # the body reads it as a global
    with set_options(export=["EXPORTED_SCALE"]):
        assert foreach(x=range(3)).dopar(scaled) == [0, 2, 4]
        with pytest.raises(OptionError, match="mapping"):
            foreach(x=range(3), export={"other": 1}).dopar(scaled)
    assert EXPORTED_SCALE == 2


def test_without_export_the_global_is_missing(backend):
    result = foreach(x=range(2), errorhandling="pass").dopar(scaled)
    assert all(isinstance(r, NameError) for r in result)
    assert "EXPORTED_SCALE" in str(result[0])


def test_export_takes_precedence_over_a_module_global(backend):
    loop = foreach(x=range(2), export={"SHARED_SETTING": "exported"})
    assert loop.dopar(read_setting) == [(0, "exported"), (1, "exported")]
    assert foreach(x=range(1)).dopar(read_setting) == [(0, "module value")]
    assert SHARED_SETTING == "module value"


def test_noexport_hides_a_global(backend):
    loop = foreach(x=range(3), errorhandling="pass").noexport("SHARED_SETTING")
    result = loop.dopar(read_setting)
    assert all(isinstance(r, NameError) for r in result)
    assert "SHARED_SETTING" in str(result[0])
    lam = loop.dopar(lambda x: SHARED_SETTING)
    assert all(isinstance(r, NameError) for r in lam)
    assert SHARED_SETTING == "module value"


def test_export_and_noexport_need_a_plain_function(backend):
    with pytest.raises(OptionError, match="plain function"):
        foreach(x=range(2), export={"a": 1}).dopar(functools.partial(read_setting))


# -- packages -----------------------------------------------------------------------


def test_packages_are_imported_where_the_body_runs(backend):
    def body(x):
        fractions = sys.modules["fractions"]
        return fractions.Fraction(x, 3) * 3 == x

    assert foreach(x=range(4), packages=["fractions"]).dopar(body) == [True] * 4
    assert foreach(x=range(2)).packages("fractions", "decimal").dopar(
        lambda x: "decimal" in sys.modules
    ) == [True, True]


def test_packages_failure_names_the_package(backend):
    result = (
        foreach(x=range(2), packages="not_a_real_package_abc")
        .errorhandling("pass")
        .dopar(lambda x: x)
    )
    assert all(isinstance(r, ImportError) for r in result)
    assert "not_a_real_package_abc" in str(result[0])


# -- worker_init ----------------------------------------------------------------------


def test_worker_init_runs_once_per_job_per_process(backend, tmp_path):
    log = str(tmp_path / "init.log")

    def init():
        append_line(log, str(os.getpid()))

    loop = foreach(x=range(24), chunksize=2, worker_init=init)
    body_pids = set(loop.dopar(lambda x: os.getpid()))
    first = read_lines(log)
    assert len(first) == len(set(first))
    assert 1 <= len(first) <= backend.workers()
    assert {str(pid) for pid in body_pids} <= set(first)

    loop.dopar(lambda x: os.getpid())
    second = read_lines(log)[len(first) :]
    assert 1 <= len(second) <= backend.workers()
    assert len(second) == len(set(second))


def test_worker_init_state_is_seen_by_the_body(backend):
    token = uuid.uuid4().hex
    loop = foreach(x=range(6), worker_init=functools.partial(remember, token))
    assert loop.dopar(read_token) == [token] * 6
    other = uuid.uuid4().hex
    assert (
        loop.worker_init(functools.partial(remember, other)).dopar(read_token)
        == [other] * 6
    )


# -- capture checks -------------------------------------------------------------------


def expect_refusal(backend, run, name: str, marker: Path):
    """Runs ``run``; a backend that ships the body must refuse it, naming ``name``.

    The sequential backend never serializes: it runs the body on the caller's
    own objects, so the loop succeeds there.
    """
    if isinstance(backend, SequentialBackend):
        run()
        assert marker.exists()
        return
    with pytest.raises(SerializationError) as info:
        run()
    assert info.value.name == name
    assert repr(name) in str(info.value)
    assert not marker.exists(), "the body ran although the loop was refused"


def test_captured_lock_is_refused_before_anything_runs(backend, tmp_path):
    marker = tmp_path / "ran"
    guard = threading.Lock()

    def body(x):
        marker.touch()
        with guard:
            return x

    expect_refusal(backend, lambda: foreach(x=range(4)).dopar(body), "guard", marker)


def test_captured_open_file_is_refused_before_anything_runs(backend, tmp_path):
    marker = tmp_path / "ran"
    with open(tmp_path / "out.txt", "w") as handle:

        def body(x):
            marker.touch()
            handle.write(f"{x}\n")

        expect_refusal(
            backend, lambda: foreach(x=range(3)).dopar(body), "handle", marker
        )
    if isinstance(backend, SequentialBackend):
        assert (tmp_path / "out.txt").read_text() == "0\n1\n2\n"


def test_captured_socket_is_refused_before_anything_runs(backend, tmp_path):
    marker = tmp_path / "ran"
    with socket.socket() as sock:

        def body(x):
            marker.touch()
            return sock.family

        expect_refusal(backend, lambda: foreach(x=range(2)).dopar(body), "sock", marker)


def test_module_global_lock_is_refused(backend, tmp_path):
    marker = tmp_path / "ran"

    def run():
        foreach(x=range(2)).dopar(uses_module_lock)
        marker.touch()

    expect_refusal(backend, run, "MODULE_LOCK", marker)


def test_exported_lock_is_refused(backend, tmp_path):
    marker = tmp_path / "ran"

    def body(x):
        marker.touch()
        return x

    loop = foreach(x=range(2), export={"shared_lock": threading.Lock()})
    expect_refusal(backend, lambda: loop.dopar(body), "shared_lock", marker)


def test_lock_captured_by_worker_init_is_refused(backend, tmp_path):
    marker = tmp_path / "ran"
    init_lock = threading.RLock()

    def init():
        with init_lock:
            pass

    def body(x):
        marker.touch()
        return x

    loop = foreach(x=range(2), worker_init=init)
    expect_refusal(backend, lambda: loop.dopar(body), "init_lock", marker)


def test_sequential_body_sees_the_caller_objects(backend):
    items = []
    result = foreach(x=range(3)).dopar(lambda x: items.append(x) or id(items))
    if isinstance(backend, SequentialBackend):
        assert items == [0, 1, 2]
        assert result == [id(items)] * 3
    else:
        assert items == []
        assert id(items) not in result
