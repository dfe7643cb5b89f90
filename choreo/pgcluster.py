"""A throwaway PostgreSQL cluster for tests and benchmarks, started from the installed server binaries.

`PostgresCluster` runs `initdb` in a temporary folder and starts the server with
`pg_ctl` on a free loopback port, its Unix socket in that folder; `stop()` stops
it by the PID in `postmaster.pid`, and `start()` again brings it back on the same
port with its data (a server that went away and came back, for fault tests).
Run as root, every command runs as the `postgres` user (`runuser`), which owns the
folder. The pytest fixtures in `choreo.pytest_plugin` wrap it.

The binaries are looked for in `$PG_BIN`, on `PATH`, then in Debian's
`/usr/lib/postgresql/<version>/bin`. This module imports no database driver: it
creates databases with `createdb`.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from choreo.errors import ChoreoError
from choreo.tansu import free_port

_TOOLS = ("initdb", "pg_ctl", "createdb", "postgres")


class PostgresUnavailable(ChoreoError):
    """The PostgreSQL server binaries are not installed (or cannot be run here)."""


def postgres_bin() -> Path:
    """Return the folder holding `initdb`, `pg_ctl`, `createdb` and `postgres`; `PostgresUnavailable` if none does."""
    candidates = []
    if os.environ.get("PG_BIN"):
        candidates.append(os.environ["PG_BIN"])
    found = shutil.which("initdb")
    if found:
        candidates.append(os.path.dirname(os.path.realpath(found)))
        candidates.append(os.path.dirname(found))
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)
    for folder in candidates:
        if all(os.access(os.path.join(folder, tool), os.X_OK) for tool in _TOOLS):
            return Path(folder)
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl, createdb, postgres) not found on PATH, in $PG_BIN or in "
        "/usr/lib/postgresql/*/bin: install them (Debian: apt-get install postgresql)"
    )


def _version(folder: str) -> float:
    try:
        return float(Path(folder).parent.name)
    except ValueError:
        return 0.0


class PostgresCluster:
    """One PostgreSQL server on 127.0.0.1 in a temporary folder; a context manager, or `start()`/`stop()`.

    `fsync=False` (the default, for tests) skips the server's fsyncs; a benchmark passes
    `fsync=True` to measure durable commits.
    """

    def __init__(self, folder: str | None = None, *, fsync: bool = False, max_connections: int = 300) -> None:
        self.bin = postgres_bin()
        self.folder = Path(folder or tempfile.mkdtemp(prefix="choreo-pg-"))
        self.data = self.folder / "data"
        self.fsync = fsync
        self.max_connections = max_connections
        self.port = 0
        self.user = "postgres"
        self._as_postgres = os.geteuid() == 0
        self._databases = 0

    @property
    def socket_dir(self) -> str:
        """The folder holding the server's Unix socket."""
        return str(self.folder)

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        return self.folder / "server.log"

    def url(self, database: str = "postgres", *, socket: bool = False) -> str:
        """A `postgresql://` URL of `database`: over TCP on the loopback, or (`socket`) the Unix socket."""
        if socket:
            return f"postgresql://{self.user}@/{database}?host={self.socket_dir}&port={self.port}"
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              cwd=self.folder)

    def _check(self, result: subprocess.CompletedProcess[str], what: str) -> None:
        if result.returncode != 0:
            raise ChoreoError(f"{what} failed ({result.returncode}): {(result.stderr or result.stdout).strip()}"
                              f" (server log: {self.log_path})")

    def start(self, attempts: int = 5) -> PostgresCluster:
        """Create the cluster (the first time) and start the server; wait until it accepts connections.

        A restart keeps the port; the first start retries on a new port if it lost a race.
        """
        if self._as_postgres:
            shutil.chown(self.folder, "postgres", "postgres")
        if not (self.data / "PG_VERSION").exists():
            self._check(self._run("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8",
                                  "--no-sync", "--no-instructions", "--locale=C"), "initdb")
        for attempt in range(attempts):
            if not self.port or attempt:
                self.port = self.port if (self.port and attempt == 0) else free_port()
            options = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                       f"-c max_connections={self.max_connections} -c fsync={'on' if self.fsync else 'off'} "
                       f"-c synchronous_commit={'on' if self.fsync else 'off'} -c full_page_writes={'on' if self.fsync else 'off'}")
            result = self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log_path),
                               "-o", options)
            if result.returncode == 0:
                return self
            if attempt == attempts - 1:
                self._check(result, "pg_ctl start")
            time.sleep(0.2)
        return self

    @property
    def pid(self) -> int | None:
        """The server's PID (from `postmaster.pid`), or None if it is not running."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def stop(self, mode: str = "fast") -> None:
        """Stop the server by its PID: SIGINT (fast shutdown; `mode="immediate"`: SIGQUIT), SIGKILL after 10 s."""
        pid = self.pid
        if pid is None:
            return
        os.kill(pid, signal.SIGQUIT if mode == "immediate" else signal.SIGINT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                return
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)

    def create_database(self, name: str | None = None) -> str:
        """Create a new, empty database (a fresh name unless given); return its name."""
        if name is None:
            self._databases += 1
            name = f"t{os.getpid()}_{self._databases}_{os.urandom(3).hex()}"
        self._check(self._run("createdb", "-h", self.socket_dir, "-p", str(self.port), "-U", self.user,
                              "-T", "template0", name), f"createdb {name}")
        return name

    def destroy(self) -> None:
        """Stop the server and delete its folder."""
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.destroy()
