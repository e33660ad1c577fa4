"""The Redis backend across hosts: network namespaces joined by veth pairs.

Three test hosts are built as network namespaces, each with one veth
interface plugged into a bridge in a fourth ("the switch"):

    redis   10.77.0.1   redis-server, bound to that address only
    workers 10.77.0.2   ``pforeach-worker start`` and its worker processes
    master  10.77.0.3   the loop, run as a subprocess

Loopback is of no use between them, so every byte between master, Redis and
workers crosses real veth interfaces; the tests check that on both ends
(Redis's client list, the interfaces' byte counters, the namespace the loop
body ran in). Building namespaces needs root and the ``ip`` command; without
them the tests are skipped, saying so.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pforeach.backends.redis.server import find_redis_server

pytestmark = pytest.mark.timeout(150)

SUBNET = "10.77.0"
REDIS_PORT = 6379
DEADLINE = 30.0


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=DEADLINE)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def _why_no_namespaces() -> str | None:
    """None if this process can build network namespaces, else the reason."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "building network namespaces needs root"
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    probe = f"pfprobe{os.getpid()}"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


@dataclass
class Lab:
    """The namespaces, their addresses, and every process started in them."""

    tag: str
    directory: Path
    hosts: dict[str, tuple[str, str]] = field(default_factory=dict)  # role -> (ns, ip)
    switch: str = ""
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return self.hosts[role][0]

    def ip(self, role: str) -> str:
        return self.hosts[role][1]

    @property
    def url(self) -> str:
        return f"redis://{self.ip('redis')}:{REDIS_PORT}/0"

    def start(
        self, role: str, *cmd: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        """Starts ``cmd`` on host ``role`` (``ip netns exec`` execs it: same pid)."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(role), *cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.procs.append(proc)
        return proc

    def python(
        self, role: str, code: str, *args: str, env: dict[str, str] | None = None
    ) -> str:
        """Runs Python code on host ``role`` and returns its standard output."""
        proc = self.start(role, sys.executable, "-c", code, *args, env=env)
        out, err = proc.communicate(timeout=2 * DEADLINE)
        assert proc.returncode == 0, err
        return out

    def netns_id(self, role: str) -> str:
        return _run(
            "ip", "netns", "exec", self.ns(role), "readlink", "/proc/self/ns/net"
        ).stdout.strip()

    def byte_counts(self, role: str) -> tuple[int, int]:
        """(received, sent) bytes of the host's veth interface."""
        shown = _run(
            "ip", "-n", self.ns(role), "-j", "-s", "link", "show", "eth0"
        ).stdout
        stats = json.loads(shown)[0]["stats64"]
        return stats["rx"]["bytes"], stats["tx"]["bytes"]

    def build(self) -> None:
        self.switch = f"{self.tag}sw"
        _run("ip", "netns", "add", self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        for number, role in enumerate(("redis", "workers", "master"), start=1):
            ns, ip = f"{self.tag}{role[0]}", f"{SUBNET}.{number}"
            self.hosts[role] = (ns, ip)
            inside, outside = f"{self.tag}{role[0]}0", f"{self.tag}{role[0]}1"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", inside, "type", "veth", "peer", "name", outside)
            _run("ip", "link", "set", inside, "netns", ns)
            _run("ip", "link", "set", outside, "netns", self.switch)
            _run("ip", "-n", ns, "link", "set", inside, "name", "eth0")
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", self.switch, "link", "set", outside, "master", "br0")
            _run("ip", "-n", self.switch, "link", "set", outside, "up")

    def teardown(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.communicate(timeout=10)
            except (subprocess.TimeoutExpired, ValueError):
                pass
        namespaces = [ns for ns, _ in self.hosts.values()] + (
            [self.switch] if self.switch else []
        )
        for ns in namespaces:
            # Anything still running in our namespaces was started by this test.
            pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _run("ip", "netns", "del", ns, check=False)
        for role in ("redis", "workers", "master"):  # a veth left half-moved
            _run("ip", "link", "del", f"{self.tag}{role[0]}0", check=False)
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    reason = _why_no_namespaces()
    if reason is not None:
        pytest.skip(reason)
    lab = Lab(
        f"pf{os.getpid() % 100000}", Path(tempfile.mkdtemp(prefix="pforeach-netns-"))
    )
    try:
        lab.build()
        redis_dir = lab.directory / "redis"
        redis_dir.mkdir()
        lab.start(
            "redis",
            find_redis_server(),
            "--bind",
            lab.ip("redis"),
            "--port",
            str(REDIS_PORT),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--dir",
            str(redis_dir),
            "--logfile",
            str(redis_dir / "redis.log"),
        )
        lab.python("master", WAIT_FOR_REDIS, lab.url)
        yield lab
    finally:
        lab.teardown()


WAIT_FOR_REDIS = """
import sys, time, redis
client = redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1)
deadline = time.monotonic() + 30
while True:
    try:
        client.ping()
        break
    except redis.ConnectionError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
"""

REDIS_QUERY = """
import json, sys, redis
client = redis.Redis.from_url(sys.argv[1])
print(json.dumps(sorted(k.decode() for k in client.keys(sys.argv[2]))))
"""

MASTER = """
import json, os, sys, time, warnings

# A non-loopback Redis without a secret warns; with one it must not.
warnings.simplefilter("error", RuntimeWarning)

from pforeach import PayloadError, foreach, register_backend
from pforeach.backends.redis import RedisBackend

url, queue = sys.argv[1], sys.argv[2]
backend = RedisBackend(queue, url, ftinterval=3, key_ttl=30)
deadline = time.monotonic() + 30
while backend.workers() < 2:
    if time.monotonic() > deadline:
        sys.exit("no workers on the queue")
    time.sleep(0.05)
register_backend(backend)
here = os.readlink("/proc/self/ns/net")
report = {"netns": here, "own": backend.client.client_info()["addr"]}
try:
    report["squares"] = foreach(x=range(20), chunksize=3).dopar(
        lambda x: (x * x, os.readlink("/proc/self/ns/net"))
    )
    # 4 x 300 kB results: the workers' interface must carry at least that.
    blobs = foreach(i=range(4)).dopar(lambda i: bytes([i]) * 300_000)
    report["blobs"] = [len(b) == 300_000 and b[-1] == i for i, b in enumerate(blobs)]
except PayloadError as exc:
    report["refused"] = str(exc)
report["clients"] = sorted({c["addr"].rsplit(":", 1)[0] for c in backend.client.client_list()})
print(json.dumps(report))
"""


def start_workers(lab: Lab, queue: str, secret: str) -> subprocess.Popen[str]:
    script = Path(sys.executable).with_name("pforeach-worker")
    command = (
        [str(script)]
        if script.exists()
        else [
            sys.executable,
            "-c",
            "from pforeach.cli import worker_main; worker_main()",
        ]
    )
    env = {**os.environ, "PFOREACH_SECRET": secret}
    env.pop("PFOREACH_REDIS_URL", None)
    return lab.start(
        "workers",
        *command,
        "start",
        "-n",
        "2",
        "--queue",
        queue,
        "--url",
        lab.url,
        "--linger",
        "1",
        "--loglevel",
        "WARNING",
        env=env,
    )


def run_master(lab: Lab, queue: str, secret: str) -> dict:
    env = {**os.environ, "PFOREACH_SECRET": secret}
    return json.loads(lab.python("master", MASTER, lab.url, queue, env=env))


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=DEADLINE)
    return proc.returncode, err


def test_a_loop_crosses_real_network_interfaces(lab):
    secret = secrets.token_hex(16)
    workers = start_workers(lab, "net", secret)
    before = {role: lab.byte_counts(role) for role in ("workers", "master")}
    report = run_master(lab, "net", secret)

    assert "refused" not in report, report
    assert [square for square, _ in report["squares"]] == [x * x for x in range(20)]
    assert report["blobs"] == [True] * 4
    # The bodies ran on the workers' host, the loop on the master's.
    worker_ns, master_ns = lab.netns_id("workers"), lab.netns_id("master")
    assert {ns for _, ns in report["squares"]} == {worker_ns}
    assert report["netns"] == master_ns != worker_ns
    assert worker_ns != os.readlink("/proc/self/ns/net")
    # Redis saw its clients at their hosts' veth addresses, and only there.
    assert report["own"].rsplit(":", 1)[0] == lab.ip("master")
    assert report["clients"] == sorted([lab.ip("workers"), lab.ip("master")])
    # The results went out of the workers' interface and into the master's.
    after = {role: lab.byte_counts(role) for role in ("workers", "master")}
    assert after["workers"][1] - before["workers"][1] > 4 * 300_000
    assert after["master"][0] - before["master"][0] > 4 * 300_000

    code, err = stop(workers)
    assert code == 0, err
    assert "RuntimeWarning" not in err
    left = json.loads(lab.python("master", REDIS_QUERY, lab.url, "net.*"))
    assert [k for k in left if k.startswith(("net.worker.", "net.proc."))] == []


def test_a_master_without_the_workers_secret_is_refused(lab):
    secret = secrets.token_hex(16)
    workers = start_workers(lab, "guarded", secret)
    try:
        refused = run_master(lab, "guarded", "not-" + secret)
        assert "refused" in refused
        assert "secret" in refused["refused"]
        assert "squares" not in refused
        # The workers shrugged it off and serve a master that has the secret.
        assert workers.poll() is None
        served = run_master(lab, "guarded", secret)
        assert [square for square, _ in served["squares"]] == [x * x for x in range(20)]
    finally:
        code, err = stop(workers)
    assert code == 0, err
