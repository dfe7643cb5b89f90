"""A rebuild of the saga projection in several processes, each folding the sagas of one partition.

Sagas are independent, so the log up to its head is split by saga id (see
`SQLiteDocumentStore.partition_rows()`), and each forked process folds its partition with
the projection's own `_fold()`, in log order, writing documents without tracking; every
batch commits only while no tracking is stored and the rebuild's generation is. When all
have finished, the parent stores the tracking of the head, then goes on as `update()` does.

If another writer commits first, the processes' batches are refused and the parent folds
from what that writer stored: documents a process wrote are then found with the events
they hold, which the fold skips (each event is folded once), so the result is the same.
Only SQLite beside the log offers the partitions; elsewhere the rebuild runs in one process.
It is opt-in (`SagaProjection(workers=2)`, `choreo replay --workers 2`): it forks, and it
pays only with CPUs to spare (benchmark 5: about 1.1x eventsourcing's decode with two idle
CPUs, no faster than one process when the machine is busy).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import traceback
from typing import TYPE_CHECKING, Any

import orjson

from choreo.errors import ConcurrencyConflict, StoreError
from choreo.store import LOG

if TYPE_CHECKING:
    from choreo.projection import SagaProjection

def workers_for(projection: SagaProjection, workers: int) -> int:
    """How many processes rebuild the log: `workers`, or 1 if the store has no partitions or cannot fork."""
    if not hasattr(projection.documents, "partition_rows") or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return max(1, workers)


def rebuild(projection: SagaProjection, head: int, workers: int, meta: dict[str, Any]) -> int:
    """Fold positions 1..`head` in `workers` forked processes, then store the tracking; return events folded."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.SimpleQueue()
    procs = [ctx.Process(target=_child, args=(projection, part, workers, head, meta, results), daemon=True)
             for part in range(workers)]
    for p in procs:
        p.start()
    outcomes = [results.get() for _ in procs]
    for p in procs:
        p.join()
    errors = [error for _, error in outcomes if error]
    if any(error == "conflict" for error in errors):
        return 0  # another writer stored first: the update that follows folds from what it stored
    if errors:
        raise StoreError(f"saga projection: a rebuild process failed: {errors[0]}")
    try:
        projection.documents.put({}, tracking={LOG: head}, expected={}, expected_meta=meta)
    except ConcurrencyConflict:
        return 0
    return sum(count for count, _ in outcomes)


def _child(projection: SagaProjection, part: int, parts: int, head: int, meta: dict[str, Any],
           results: Any) -> None:
    """In a forked process: fold one partition, batch by batch; report (events, error or None)."""
    count, error = 0, None
    gc.disable()  # a short-lived process of many small acyclic objects
    try:
        documents = projection.documents.reopened()  # type: ignore[attr-defined]
        projection.documents = documents
        projection._cache, projection._fresh = {}, set()
        after = 0
        while rows := documents.partition_rows(after, head, part, parts, projection.batch_size):
            touched, timelines = projection._fold(rows)
            documents.put({k: orjson.dumps(v) for k, v in touched.items()}, tracking={}, appended=timelines,
                          expected={}, expected_meta=meta)
            projection._cache = touched
            projection._fresh.update(touched)
            after, count = rows[-1][0], count + len(rows)
        documents.store.close()
    except ConcurrencyConflict:
        error = "conflict"
    except BaseException:  # reported to the parent, which raises it
        error = traceback.format_exc(limit=5)
    results.put((count, error))
    os._exit(0)  # leave the parent's inherited connections and threads alone
