"""The example's services as `choreo run` processes, for the observability tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from services import TARGETS

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def env_with(**extra: str) -> dict[str, str]:
    """The environment of a service process: this checkout first on the path, and `extra`."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


@contextmanager
def running(url: str, args: Callable[[str], list[str]] = lambda name: [],
            env: Callable[[str], dict[str, str]] = lambda name: env_with(),
            names: tuple[str, ...] = tuple(TARGETS), log_dir: Path | None = None,
            ) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """Run the named services (each `choreo run ... --store url *args(name)`), stopped with SIGTERM after."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    files = []
    try:
        for name in names:
            out = open(log_dir / f"{name}.log", "wb") if log_dir else None
            if out is not None:
                files.append(out)
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "choreo", "run", TARGETS[name], "--store", url, *args(name)],
                cwd=REPO, env=env(name), stdin=subprocess.DEVNULL, stdout=out or subprocess.DEVNULL,
                stderr=out or subprocess.DEVNULL,
            )
        yield procs
    finally:
        for f in files:
            f.close()
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 60.0,
             procs: dict[str, subprocess.Popen[bytes]] | None = None) -> T:
    """Call `probe` until it returns something truthy; fail after `timeout` seconds or if a process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        dead = {n: p.returncode for n, p in (procs or {}).items() if p.poll() is not None}
        assert not dead, f"service process(es) exited while waiting for {what}: {dead}"
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
