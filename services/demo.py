"""The demo: place N orders with a seeded mix of outcomes, run every service, audit the result.

The demo only ever replaces its own data. Its saga ids are derived from the seed and the
order's number (`demo_saga_id`), so a store whose every event belongs to a saga whose
`OrderPlaced` carries a matching order id holds only demo data; anything else is refused
unless `reset=True` (`choreo demo --reset`).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, TextIO
from uuid import NAMESPACE_URL, uuid4, uuid5

from choreo import ChoreoError, EventStore, Runner, SagaProjection, open_store
from choreo.errors import StoreNotFound
from choreo.operations import list_dead_letters
from choreo.store import DEFAULT_URL
from services import TARGETS, system
from services.checks import END_TYPES, check_invariants, read_facts
from services.contracts import OrderPlaced

#: The demo's mix: (weight, expected final state, failure cause or None).
MIX = (
    (70, "completed", None),
    (10, "failed", "out of stock"),
    (10, "failed", "payment declined"),
    (10, "failed", "address undeliverable"),
)


def plan(orders: int, seed: int) -> list[tuple[str, OrderPlaced, str, str | None]]:
    """Return (saga id, order, expected state, expected cause) for each order, from the seed."""
    rng = random.Random(seed)
    weights = [w for w, _, _ in MIX]
    result = []
    for i in range(orders):
        _, state, cause = rng.choices(MIX, weights)[0]
        order = OrderPlaced(
            order_id=f"order-{seed}-{i}",
            customer_id=f"broke-{i}" if cause == "payment declined" else (
                f"flaky-{i}" if state == "completed" and rng.random() < 0.1 else f"customer-{rng.randrange(50)}"
            ),
            sku="rare-gem" if cause == "out of stock" else rng.choice(["widget", "gadget"]),
            quantity=rng.randint(1, 5),
            amount=rng.randint(500, 50_000),
            address="nowhere" if cause == "address undeliverable" else f"{rng.randint(1, 999)} Main St",
        )
        result.append((demo_saga_id(seed, i), order, state, cause))
    return result


def demo_saga_id(seed: int, number: int) -> str:
    """The saga id of the demo's order `number` with `seed` (its order id is `order-SEED-NUMBER`)."""
    return str(uuid5(NAMESPACE_URL, f"choreo-demo/{seed}/{number}"))


class NotDemoData(ChoreoError, FileExistsError):
    """The demo's store holds data that the demo did not write; the demo refuses to replace it."""


_ORDER_ID = re.compile(r"order-(-?\d+)-(\d+)")


def foreign_data(store: EventStore) -> str | None:
    """The first event of `store`'s log that is not the demo's, described; None if every event is."""
    demo: set[str] = set()
    feed = store.feed(f"demo-check-{uuid4()}", dict, group=False)
    try:
        while rows := feed.poll_rows(5000, store.idle_timeout):
            for row in rows:
                event_id, kind, saga_id, payload = row[1], row[2], row[4], row[10]
                if saga_id in demo:
                    continue
                if kind == OrderPlaced.event_type and _is_demo_start(saga_id, payload):
                    demo.add(saga_id)
                    continue
                return f"event {event_id} ({kind}) of saga {saga_id}" if saga_id else f"event {event_id} ({kind})"
    finally:
        feed.close()
    return None


def _is_demo_start(saga_id: str | None, payload: object) -> bool:
    try:
        order_id = json.loads(str(payload)).get("order_id")
    except (ValueError, AttributeError):
        return False
    match = _ORDER_ID.fullmatch(str(order_id))
    return match is not None and saga_id == demo_saga_id(int(match[1]), int(match[2]))


def _sqlite_path(store_url: str) -> str | None:
    if not store_url.startswith("sqlite:///"):
        return None
    return store_url[len("sqlite:///") :].split("?", 1)[0]


def _check_existing(store_url: str, *, reset: bool) -> bool:
    """Whether the store at `store_url` may be replaced: it is missing, or holds only demo data.

    Raises `NotDemoData` if it holds anything else and `reset` is not set (with `reset`, a
    SQLite file is replaced whatever it holds; a Kafka topic cannot be).
    """
    path = _sqlite_path(store_url)
    if path is not None and (not os.path.exists(path) or os.path.getsize(path) == 0):
        return True
    try:
        with open_store(store_url, create=False) as store:
            found = foreign_data(store)
    except ChoreoError as e:  # e.g. a SQLite file that is not a choreo store
        if isinstance(e, StoreNotFound) and store_url.startswith(("postgresql:", "postgres:")):
            return True  # a database without choreo's tables: the demo creates them beside any others
        if isinstance(e, NotDemoData) or path is None:
            raise
        found = f"it is not a readable choreo store: {e}"
    if found is None:
        return True
    if reset and path is not None:
        return True
    advice = ("give another --store, or --reset to delete it" if path is not None
              else "name another topic (topic=...), or leave topic= out for a new one")
    raise NotDemoData(f"{store_url} holds data that the demo did not write ({found}): {advice}")


def run_demo(
    store_url: str | None = None,
    *,
    orders: int = 300,
    seed: int = 7,
    processes: bool = False,
    external: bool = False,
    timeout: float = 300.0,
    progress: TextIO | None = None,
    fresh: bool = True,
    reset: bool = False,
) -> dict[str, Any]:
    """Run the example system on `store_url` and return the summary (see `choreo demo --help`).

    The default store is `$CHOREO_STORE` or `sqlite:///choreo.db`, as for every command.
    A previous demo's data is replaced (`fresh`) or kept; other data is refused
    (`NotDemoData`) unless `reset` deletes the SQLite file anyway.
    """
    store_url = store_url or os.environ.get("CHOREO_STORE") or DEFAULT_URL
    fresh = fresh and not external  # never wipe a store that running services use
    path = _sqlite_path(store_url)
    if fresh and store_url.startswith("kafka://") and "topic=" not in store_url:
        sep = "&" if "?" in store_url else "?"
        store_url += f"{sep}topic=choreo-demo-{uuid4().hex[:8]}"  # a new topic; its state folder follows it
    elif not store_url.startswith("memory:"):
        _check_existing(store_url, reset=reset and not external)
        if (fresh or reset) and path is not None:
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(path + suffix):
                    os.remove(path + suffix)
    store = open_store(store_url)
    planned = plan(orders, seed)
    saga_ids = {saga_id for saga_id, *_ in planned}
    workers: list[subprocess.Popen[bytes]] = []
    runner = None
    started = time.perf_counter()
    try:
        if external:
            pass  # the services run elsewhere, on the same store
        elif processes:
            workers = spawn_services(store_url)
        else:
            runner = Runner(system, store)
            runner.start_threads()
        for saga_id, order, _, _ in planned:
            system.start(store, order, saga_id=saga_id)
        ended = _wait_for_end(store, saga_ids, timeout, progress, workers)
        elapsed = time.perf_counter() - started
    finally:
        if runner is not None:
            runner.stop()
        stop_services(workers)
    facts = read_facts(store, saga_ids)
    invariants = check_invariants(store, facts)
    projection = SagaProjection(store, sagas=system.sagas)
    projection.update()
    sagas = {s["saga_id"]: s for s in projection.list() if s["saga_id"] in saga_ids}
    invariants["projection_agrees_with_the_log_audit"] = all(
        sagas.get(saga_id, {}).get("state") == f.state for saga_id, f in facts.items()
    )
    expected_ok = all(
        facts.get(saga_id) is not None and facts[saga_id].state == state and facts[saga_id].cause == cause
        for saga_id, _, state, cause in planned
    )
    invariants["final_states_match_the_seeded_plan"] = expected_ok
    parked = len(list_dead_letters(store, TARGETS))
    store.close()
    states = Counter(s["state"] for s in sagas.values())
    return {
        "store": store_url,
        "mode": "external" if external else "processes" if processes else "in-process",
        "seed": seed,
        "sagas": len(planned),
        "ended": ended,
        "states": dict(sorted(states.items())),
        "failures": dict(sorted(Counter(f.cause for f in facts.values() if f.cause).items())),
        "compensated_steps": dict(sorted(Counter(
            name for s in sagas.values() for name, step in s["steps"].items() if step["status"] == "compensated"
        ).items())),
        "compensations": sum(len(f.compensated) for f in facts.values()),
        "retried_handlers": sum(f.retries for f in facts.values()),
        "parked_events": parked,
        "elapsed_s": round(elapsed, 3),
        "sagas_per_s": round(len(planned) / elapsed, 1) if elapsed else None,
        "invariants": invariants,
        "invariants_ok": all(invariants.values()) and ended == len(planned),
        "final_states": {saga_id: sagas[saga_id]["state"] for saga_id in sorted(sagas)},
    }


def spawn_services(store_url: str) -> list[subprocess.Popen[bytes]]:
    """Start each example service as its own `choreo run` process on `store_url`.

    The processes find the example where this module was found, whatever their working directory.
    """
    checkout = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (checkout, os.environ.get("PYTHONPATH")) if p)}
    return [
        subprocess.Popen(
            [sys.executable, "-m", "choreo", "run", target, "--store", store_url, "--log-level", "WARNING"],
            stdin=subprocess.DEVNULL, env=env,
        )
        for target in TARGETS.values()
    ]


def stop_services(workers: list[subprocess.Popen[bytes]], timeout: float = 30) -> None:
    """Stop service processes with SIGTERM (each finishes its batch) and wait for them."""
    for w in workers:
        w.terminate()
    for w in workers:
        w.wait(timeout)


def _wait_for_end(
    store: EventStore,
    saga_ids: set[str],
    timeout: float,
    progress: TextIO | None,
    workers: list[subprocess.Popen[bytes]],
) -> int:
    ended: set[str] = set()
    feed = store.feed(f"demo-{uuid4()}", dict, group=False)
    deadline = time.monotonic() + timeout
    while len(ended) < len(saga_ids) and time.monotonic() < deadline:
        batch = feed.poll(5000, 0.1)
        if not batch:
            dead = [w for w in workers if w.poll() is not None]
            if dead:
                raise ChoreoError(f"a service process exited with code {dead[0].returncode}: {dead[0].args!r}")
            continue
        before = len(ended)
        ended.update(e.saga_id for e in batch if e.type in END_TYPES and e.saga_id in saga_ids)
        if progress is not None and len(ended) != before:
            _draw(progress, len(ended), len(saga_ids))
    feed.close()
    if progress is not None:
        _draw(progress, len(ended), len(saga_ids))
        progress.write("\n")
    return len(ended)


def _draw(out: TextIO, done: int, total: int, width: int = 40) -> None:
    filled = width * done // max(total, 1)
    out.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} sagas ended")
    out.flush()


def format_summary(s: dict[str, Any]) -> str:
    """Render the summary for people."""
    lines = [
        f"choreo demo — {s['sagas']} orders on {s['store']} ({s['mode']}, seed {s['seed']})",
        f"  ended:          {s['ended']}/{s['sagas']} in {s['elapsed_s']:.2f}s ({s['sagas_per_s']} sagas/s)",
        "  final states:   " + ", ".join(f"{k} {v}" for k, v in s["states"].items()),
        "  failures:       " + (", ".join(f"{k} {v}" for k, v in s["failures"].items()) or "none"),
        f"  compensations:  {s['compensations']} ("
        + (", ".join(f"{k} {v}" for k, v in s["compensated_steps"].items()) or "none") + ")",
        f"  retries:        {s['retried_handlers']} handler(s) succeeded after a transient error",
        f"  parked events:  {s['parked_events']}" + (" (see choreo dlq list)" if s["parked_events"] else ""),
        "  invariants:",
    ]
    lines += [f"    [{'ok' if ok else 'FAILED'}] {name.replace('_', ' ')}" for name, ok in s["invariants"].items()]
    lines.append("  result:         " + ("all invariants hold" if s["invariants_ok"] else "INVARIANT VIOLATED"))
    return "\n".join(lines)
