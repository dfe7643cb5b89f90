"""In-process sequential saga latency: choreo's single-threaded `Runner` next to eventsourcing's runners.

    python -m benchmarks.latency [--sequential 200] [--rounds 2] [--json]

One happy-path saga at a time, each started after the previous one ended, all in this
process and thread, on SQLite with durable defaults:

- choreo: `Runner.start()` then `Runner.run_until_idle()` (every service in turn, until
  no service has work: the saga has ended);
- eventsourcing: `Orders.place()` on its System (`benchmarks.baseline`), which runs the saga
  to its end before it returns, with `SingleThreadedRunner` and `NewSingleThreadedRunner`.

Benchmark 4 measures choreo with a thread per service (`Runner.start_threads()`), where a
saga waits for each service's thread to be woken; this is the like-for-like figure. The
runs alternate, `--rounds` times; each reports the p50/p99 of its best round (lowest p50).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any
from uuid import uuid4

from benchmarks import baseline
from benchmarks.sagas import happy_order


def choreo_latencies(sequential: int, folder: str) -> list[float]:
    """Seconds from starting a saga to the system being idle again (the saga ended), one at a time."""
    from choreo import Runner, open_store
    from services import system
    from services.checks import END_TYPES

    store = open_store(f"sqlite:///{os.path.join(folder, f'latency-{uuid4().hex[:6]}.db')}")
    try:
        runner = Runner(system, store)
        runner.start(happy_order(-1))
        runner.run_until_idle()
        out = []
        for i in range(sequential):
            t0 = time.perf_counter()
            saga_id = runner.start(happy_order(i))
            runner.run_until_idle()
            out.append(time.perf_counter() - t0)
        ends = [e for batch in store.scan() for e in batch if e.saga_id == saga_id and e.type in END_TYPES]
        assert ends, "the last saga did not end"
    finally:
        store.close()
    return out


def percentiles(seconds: list[float]) -> dict[str, float]:
    q = statistics.quantiles(seconds, n=100) if len(seconds) > 1 else [seconds[0] if seconds else 0.0] * 99
    return {"p50_ms": round(q[49] * 1000, 2), "p99_ms": round(q[98] * 1000, 2)}


def measure(sequential: int, rounds: int = 2) -> dict[str, Any]:
    """The best round (lowest p50) of each, and choreo's p50 over the faster eventsourcing runner's."""
    best: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(rounds):
            runs = {"choreo": percentiles(choreo_latencies(sequential, folder))}
            for runner in baseline.RUNNERS:
                runs[f"eventsourcing_{runner}"] = percentiles(
                    baseline.latencies(sequential, tempfile.mkdtemp(dir=folder), runner))
            for name, r in runs.items():
                if name not in best or r["p50_ms"] < best[name]["p50_ms"]:
                    best[name] = r
    peers = [name for name in best if name != "choreo"]
    fastest = min(peers, key=lambda name: best[name]["p50_ms"])
    return {
        "sequential": sequential, "rounds": rounds,
        **{f"{name}_{k}": v for name, r in best.items() for k, v in r.items()},
        "baseline_runner": fastest.removeprefix("eventsourcing_"),
        "choreo_p50_over_baseline_p50": round(best["choreo"]["p50_ms"] / best[fastest]["p50_ms"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequential", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = measure(args.sequential, args.rounds)
    print(json.dumps(result, indent=2) if args.json else "  ".join(f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
