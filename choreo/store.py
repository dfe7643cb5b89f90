"""The event store interfaces, and opening a store by URL.

A store holds the log of integration events and, for each service, its private
state: aggregate events, its tracking (a position per source of the log), dead
letters and deadlines. `ServiceStore.commit()` writes a handler's new aggregate
events, the events it emitted and its tracking in one transaction, which makes
redelivery a no-op (guarantee 1). Readers get the log through a `Feed`. A read
model (`DocumentStore`) commits its documents and tracking together, optionally as a
compare-and-set against the tracking its batch started from, so several writers can
fold one log. `open_store(url, create=False)` opens a store to read only.

Replicas (docs/scaling.md, "Replicas"): a store whose service stores have `supports_claims` lets
several processes of one service split its work. The contract is four calls on
`ServiceStore` -- `segments()`, `claims()`, `acquire()`, `leave()` -- plus the `claim`
argument of `commit()`, which the store checks in the commit's own transaction
(`ClaimLost`, nothing written, if the replica no longer holds a segment). Lease expiry
is measured on the store's clock, so replicas on hosts whose clocks differ agree.
Implementations: `choreo.stores.sqlite`, `choreo.stores.postgres`, `choreo.stores.memory`
(on Kafka, a service's processes share the partitions instead).

Stores: `choreo.stores.sqlite`, `choreo.stores.postgres`, `choreo.stores.kafka`, `choreo.stores.memory`.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit
from uuid import UUID, uuid4

from eventsourcing.persistence import StoredEvent

from choreo.deadlines import Deadline
from choreo.errors import ClaimLost, ConcurrencyConflict, SegmentsMismatch, StoreURLError, WiringError
from choreo.events import Envelope

_SERVICE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,40}$")


def check_service_name(name: str) -> str:
    """Return `name` if it can name a service (lowercase letters, digits, underscores)."""
    if not isinstance(name, str) or not _SERVICE_NAME.match(name):
        raise WiringError(
            f"invalid service name {name!r}: use lowercase letters, digits and underscores, "
            "starting with a letter"
        )
    return name


@dataclass(frozen=True)
class DeadLetter:
    """An event a service could not handle, parked with the reason, never dropped."""

    service: str
    position: int
    event_id: str
    saga_id: str
    type: str
    reason: str
    error: str
    attempts: int
    first_failed_at: datetime
    last_failed_at: datetime
    envelope: dict[str, Any] = field(default_factory=dict)
    id: int | None = None
    status: str = "parked"
    #: with status `retrying`: when the next attempt is due (choreo's clock)
    due_at: datetime | None = None


PARKED, RETRYING = "parked", "retrying"
#: The statuses of a dead letter that hold its saga's later events in its service.
HOLDING = (PARKED, RETRYING)


Tracking = dict[str, int]
"""How far a reader got in each source of the log: {"log": 42} or {"orders:3": 17, ...}."""

LOG = "log"


def advance(batch: Sequence[Envelope]) -> Tracking:
    """Return the tracking that a reader reaches by processing `batch` (per source, the last position)."""
    reached: Tracking = {}
    for env in batch:
        reached[env.source] = env.position or 0
    return reached


#: The fields of a log row (`Feed.poll_rows()`), in order; `occurred_at` is ISO 8601 text.
ROW_FIELDS = ("position", "event_id", "type", "version", "saga_id", "causation_id", "service", "step",
              "outcome", "occurred_at", "payload", "source")
Row = tuple[Any, ...]


def row_of(env: Envelope) -> Row:
    """An envelope as a log row (see `ROW_FIELDS`)."""
    return (env.position, env.event_id, env.type, env.version, env.saga_id, env.causation_id, env.service,
            env.step, env.outcome, env.occurred_at.isoformat(), env.payload, env.source)


def advance_rows(rows: Sequence[Row]) -> Tracking:
    """`advance()` for log rows."""
    return {row[11]: row[0] or 0 for row in rows}


#: Where a split service's whole-service tracking keys are fenced: a processor still running the
#: service whole cannot move past it (its commit fails, it reloads and joins as a replica).
FENCE = 2**62


def segment_source(source: str, segment: int) -> str:
    """The tracking key of one segment of a source: "log#3" (a service split among replicas)."""
    return f"{source}#{segment}"


@dataclass(frozen=True)
class Claim:
    """One segment of a service's work and the replica that holds it (`owner` None: free)."""

    segment: int
    owner: str | None
    #: changes whenever the segment changes hands (taken, released), never on a renewal
    token: int
    #: when the lease ends, in seconds on the store's clock (see `ClaimState.now`)
    expires_at: float


@dataclass(frozen=True)
class ClaimState:
    """Every segment's claim, the replicas alive (by heartbeat) and the store's clock, read together."""

    claims: tuple[Claim, ...]
    #: the replicas whose heartbeat (renewed by `acquire()`) has not expired
    replicas: tuple[str, ...]
    #: the store's clock when this was read, in seconds
    now: float


@dataclass(frozen=True)
class Held:
    """What a replica commits under: its id and the token of each segment it holds (see `commit(claim=)`)."""

    owner: str
    tokens: Mapping[int, int]


def segments_mismatch(service: str, have: int, asked: int) -> SegmentsMismatch:
    """The error of a replica started with `asked` segments for a service split into `have`."""
    return SegmentsMismatch(
        f"service {service!r} is split into {have} segments, but this replica was started with {asked}: "
        "the number of segments is fixed for a service's life (see docs/scaling.md)")


def claim_lost(service: str, owner: str, segments: Iterable[int]) -> ClaimLost:
    """The error of a commit refused because `owner` no longer holds `segments`."""
    return ClaimLost(
        f"{service}: replica {owner} no longer holds segment(s) {', '.join(map(str, sorted(segments)))} "
        "(another replica took them after its lease expired, or it released them); nothing was written")


def check_unchanged(
    owner: str,
    expected: Mapping[str, int] | None,
    tracking: Callable[[], Mapping[str, int]],
    expected_meta: Mapping[str, Any] | None,
    meta: Callable[[], Mapping[str, Any]],
) -> None:
    """A read model's compare-and-set (`DocumentStore.put`): raise `ConcurrencyConflict` if another
    writer moved its tracking or changed its metadata since `expected`/`expected_meta` were read.
    Each is read (`tracking()`, `meta()`, inside the writer's transaction) only when it is checked."""
    if expected is not None:
        have = dict(tracking())
        if have != dict(expected):
            raise ConcurrencyConflict(f"{owner}: another writer moved it to {have} (this batch began at "
                                      f"{dict(expected)})")
    if expected_meta:
        stored = meta()
        changed = sorted(k for k, v in expected_meta.items() if stored.get(k) != v)
        if changed:
            raise ConcurrencyConflict(f"{owner}: another writer changed its {', '.join(changed)}")


class ServiceStore(ABC):
    """One service's private state: aggregate events, tracking, handled ids, dead letters."""

    name: str

    @abstractmethod
    def load(self, aggregate_id: UUID) -> list[StoredEvent]:
        """Return the stored events of one aggregate, in version order."""

    def load_many(self, aggregate_ids: Iterable[UUID]) -> dict[UUID, list[StoredEvent]]:
        """Return the stored events of several aggregates (an empty list for an unknown id)."""
        return {i: self.load(i) for i in aggregate_ids}

    @abstractmethod
    def load_latest(self, aggregate_id: UUID) -> tuple[StoredEvent | None, list[StoredEvent]]:
        """Return the aggregate's latest snapshot (None if it has none) and its stored events after it."""

    @abstractmethod
    def tracking(self) -> Tracking:
        """Return how far this service has processed each source of the log."""

    def position(self, source: str = LOG) -> int:
        """Return the position this service has processed up to in `source` (0 if none)."""
        return self.tracking().get(source, 0)

    @abstractmethod
    def commit(
        self,
        *,
        events: Sequence[StoredEvent],
        emitted: Sequence[Envelope],
        tracking: Mapping[str, int],
        parked: Sequence[DeadLetter] = (),
        handled: Sequence[str] = (),
        updated: Sequence[DeadLetter] = (),
        deadlines: Sequence[Deadline] = (),
        claim: Held | None = None,
        snapshots: Sequence[StoredEvent] = (),
    ) -> None:
        """Atomically record aggregate events, emitted events, dead letters, deadlines, handled ids and tracking.

        `snapshots` are aggregate snapshots (`choreo.snapshots`) at versions recorded by
        this commit or before; each replaces an older snapshot of its aggregate.

        `parked` are new dead letters; `updated` are existing ones (by id) with a new
        status or attempt count. A deadline `scheduled` is added unless one with its id
        exists; `cancelled` cancels a scheduled one (or pre-empts it); `fired` marks a
        scheduled one fired. Raises `ConcurrencyConflict` if an aggregate version was
        already recorded, a tracked position would not move forward, or a deadline was
        fired already; `EventIdTaken` (naming the id) if an emitted event's id is already
        in the log or twice among `emitted`. Either way nothing is written.

        With `claim` (a replica's commit), first check in the same transaction that
        `claim.owner` still holds every segment of `claim.tokens` with that token; if not,
        raise `ClaimLost` and write nothing. Expiry is not checked here: a lease that ran
        out but that no replica took yet still holds (its token did not change).
        """

    def set_tracking(self, tracking: Mapping[str, int]) -> None:
        """Overwrite tracking positions, backwards too (an operator's reset after the log lost data)."""
        raise NotImplementedError(f"{type(self).__name__} cannot reset its tracking")

    @abstractmethod
    def due_deadlines(self, now: datetime, limit: int = 100) -> list[Deadline]:
        """Return scheduled deadlines due at `now`, earliest first."""

    def seen(self, event_ids: Sequence[str]) -> set[str]:
        """Return those of `event_ids` this service already handled.

        Only stores whose log can deliver one event id twice (Kafka) record handled
        ids; on a log with unique ids the tracking alone rules out redelivery.
        """
        return set()

    @abstractmethod
    def dead_letters(self, status: str | None = "parked") -> list[DeadLetter]:
        """Return this service's dead letters, optionally only those with `status`."""

    def due_retries(self, now: datetime, limit: int = 100) -> list[DeadLetter]:
        """Return the letters whose next attempt is due at `now` (status `retrying`), earliest first."""
        due = [d for d in self.dead_letters(RETRYING) if d.due_at is not None and d.due_at <= now]
        return sorted(due, key=lambda d: (d.due_at, d.id or 0))[:limit]

    # -- replicas: claims on segments (docs/scaling.md, "Replicas") ----------------------------
    #: whether this store can split the service's work among replicas (the four calls below)
    supports_claims: bool = False

    def segments(self) -> int | None:
        """Return how many segments the service's work is split into, or None if it is not split."""
        return None

    def claims(self, segments: int) -> ClaimState:
        """Return every segment's claim, the live replicas and the store's clock, read together.

        The first call records the layout, in one transaction: `segments` free segments
        (token 0), each starting its tracking where the service's whole tracking was (for
        each whole-service key `source` without "#", or `LOG` at 0 if there is none,
        `segment_source(source, s)` keys at its position), and those whole-service keys set
        to `FENCE`. `SegmentsMismatch` if the
        service is already split into another number of segments.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot split a service among replicas")

    def acquire(self, owner: str, segments: Sequence[int], lease: float, *,
                release: Sequence[int] = (), dead: Sequence[str] = ()) -> dict[int, int]:
        """In one transaction: keep `owner` alive for `lease` seconds, free its claims on `release`,
        then claim or renew each of `segments` that is free, expired, `owner`'s, or held by one of
        `dead` (replicas known to have died; their heartbeats are dropped); return the segments
        `owner` holds afterwards, with their tokens.

        A segment that changes hands (taken or released) gets a new token; a renewal keeps
        it and moves `expires_at` to the store's now + `lease`.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot split a service among replicas")

    def leave(self, owner: str) -> None:
        """Free every claim of `owner` and drop its heartbeat (a replica stopping cleanly)."""
        raise NotImplementedError(f"{type(self).__name__} cannot split a service among replicas")

    def flush(self) -> None:
        """Publish whatever the service emitted that is not yet in the log (Kafka's outbox)."""

    def oversized(self, env: Envelope) -> str | None:
        """Why the log cannot take `env` (it is too large), or None if it can.

        The processor asks before it commits what a handler emitted, so an event the log
        would refuse parks its trigger instead of jamming the service's outbox.
        """
        return None


class DocumentStore(ABC):
    """A read model's JSON documents by key, with its tracking and metadata, committed together.

    A read model that was never written reads as empty (no document, no entry, no
    tracking, no metadata); a store creates its tables on the first write.
    """

    @abstractmethod
    def get(self, key: str) -> dict[str, Any] | None:
        """Return the document stored under `key`, or None."""

    def get_many(self, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Return the stored documents among `keys`, by key (missing keys are left out)."""
        return {k: d for k in keys if (d := self.get(k)) is not None}

    @abstractmethod
    def put(
        self,
        docs: Mapping[str, dict[str, Any] | bytes],
        *,
        tracking: Mapping[str, int],
        appended: Mapping[str, Sequence[Any]] | None = None,
        expected: Mapping[str, int] | None = None,
        expected_meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Store documents, append `appended[key]` to each key's entries, and move the tracking
        forward, atomically. A document is a dict, or its JSON already encoded (UTF-8 `bytes`).

        Raises `ConcurrencyConflict`, writing nothing, if a position would not move forward;
        with `expected` (the tracking read before the batch), also if the stored tracking is
        not exactly `expected`; with `expected_meta`, also if a stored metadata value differs.
        That compare-and-set is what lets two writers fold the same log: the one that lost
        discards its batch and reads again.
        """

    @abstractmethod
    def entries(self, key: str) -> list[Any]:
        """Return every entry (a JSON value) appended under `key`, oldest first."""

    #: whether `log_rows()` reads the log this read model folds (it is stored beside it)
    beside_log: bool = False

    def log_rows(self, saga_id: str) -> list[Row] | None:
        """Return the log's rows (see `ROW_FIELDS`) with this saga id, in log order, or None.

        A read model stored beside the log it folds (in the same database, with an index on
        saga id) returns them, so a saga's timeline is read from the log instead of copied
        into entries; any other returns None (the default), and timelines are appended.
        """
        return None

    @abstractmethod
    def scan(self) -> Iterator[dict[str, Any]]:
        """Yield every document, one at a time."""

    @abstractmethod
    def tracking(self) -> Tracking:
        """Return how far the read model has processed each source of the log."""

    def position(self, source: str = LOG) -> int:
        """Return the position the read model has processed up to in `source`."""
        return self.tracking().get(source, 0)

    @abstractmethod
    def meta(self) -> dict[str, Any]:
        """Return the read model's metadata (JSON values by name), set by `clear()`."""

    @abstractmethod
    def clear(self, meta: Mapping[str, Any] | None = None) -> None:
        """Drop every document, every entry, the tracking and the metadata; then store `meta`, atomically."""


@dataclass(frozen=True)
class Interest:
    """Which events a reader wants; a log that can filter leaves the rest out of its batches.

    An event is wanted if its type is in `types`, or (with `failures`) it has the failed
    outcome, or (with `outcomes`) it has any step outcome, or (with `known` set) its type
    is not among `known` (so it can be parked).
    """

    types: frozenset[str]
    failures: bool = False
    known: frozenset[str] | None = None
    outcomes: bool = False

    def wants(self, env: Envelope) -> bool:
        """Whether the reader wants `env`."""
        return self.wants_type(env.type, env.outcome)

    def wants_type(self, type: str, outcome: str | None) -> bool:
        """Whether the reader wants an event of this type and outcome."""
        return (
            type in self.types
            or (self.failures and outcome == "failed")
            or (self.outcomes and bool(outcome))
            or (self.known is not None and type not in self.known)
        )


class Feed(ABC):
    """A reader's view of the log: new envelopes, batch by batch, after the reader's tracking."""

    @abstractmethod
    def poll(self, limit: int, timeout: float = 0.0) -> list[Envelope]:
        """Return up to `limit` new envelopes; wait up to `timeout` seconds when there are none."""

    def poll_rows(self, limit: int, timeout: float = 0.0) -> list[Row]:
        """`poll()` as plain rows (see `ROW_FIELDS`): cheaper for a reader that only looks at events."""
        return [row_of(env) for env in self.poll(limit, timeout)]

    @abstractmethod
    def rewind(self) -> None:
        """Continue after the reader's recorded tracking again (after a conflict or a restart)."""

    def reassigned(self) -> bool:
        """Whether the reader was given other parts of the log since the last call (Kafka: partitions).

        Other replicas of the reader may have changed its state meanwhile, so it reads its state again.
        """
        return False

    def caught_up(self) -> bool:
        """Whether this reader's last poll reached the end of the log as it was then.

        A service fires its due deadlines only when this is true, so that it never times
        out a saga whose end is already in the log (after downtime, say).
        """
        return True

    def close(self) -> None:
        """Leave the log (and, on Kafka, the consumer group)."""


class EventStore(ABC):
    """The append-only log of integration events, plus each service's and read model's own store."""

    url: str
    #: How long a scan waits for more before it decides it reached the end of the log.
    idle_timeout: float = 0.0
    #: Whether the store was opened to read only (`open_store(url, create=False)`): it writes nothing.
    read_only: bool = False

    @abstractmethod
    def append(self, envelopes: Sequence[Envelope]) -> list[int]:
        """Append events to the log (used to start sagas); return their positions in their sources.

        On a log with unique ids, `ConcurrencyConflict` (nothing appended) if an id is taken:
        starting the same saga twice is a no-op for the caller.
        """

    @abstractmethod
    def feed(
        self, reader: str, tracking: Callable[[], Tracking], *, group: bool = True, interest: Interest | None = None
    ) -> Feed:
        """Return a feed for `reader`, starting after `tracking()`.

        With `group=True` the readers of one name share the log (on Kafka: a consumer
        group whose members split the partitions); with `group=False` this reader sees all
        of it. With `interest`, the feed may leave out events the reader does not want.
        """

    @abstractmethod
    def service(self, name: str) -> ServiceStore:
        """Return the private store of the service called `name`.

        On a read-only store, `StoreNotFound` if the service has no tables (none are created).
        """

    @abstractmethod
    def documents(self, name: str) -> DocumentStore:
        """Return the document store of the read model called `name` (empty if it was never written)."""

    def size_hint(self) -> int | None:
        """Return about how many events the log holds, or None if the log cannot tell cheaply."""
        return None

    def scan(self, batch: int = 5000) -> Iterator[list[Envelope]]:
        """Yield the whole log, batch by batch, from the beginning to where it goes quiet."""
        from choreo.upcasting import upcasting_feed

        feed = upcasting_feed(self.feed(f"scan-{uuid4()}", dict, group=False))
        try:
            while got := feed.poll(batch, self.idle_timeout):
                yield got
        finally:
            feed.close()

    def close(self) -> None:
        """Release connections and files."""

    def __enter__(self) -> EventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LogStore(EventStore):
    """A store whose log has one global order (SQLite, memory): positions are in source "log"."""

    @abstractmethod
    def read(self, after: int, limit: int = 500, *, upto: int | None = None,
             interest: Interest | None = None) -> list[Envelope]:
        """Return up to `limit` events with a position greater than `after` (and at most `upto`), in log order.

        With `interest`, only the events it wants.
        """

    def read_rows(self, after: int, limit: int = 500) -> list[Row]:
        """`read()` as plain rows (see `ROW_FIELDS`)."""
        return [row_of(env) for env in self.read(after, limit)]

    @abstractmethod
    def last_position(self) -> int:
        """Return the position of the last event in the log (0 if empty)."""

    @abstractmethod
    def wait(self, after: int, timeout: float) -> bool:
        """Block until the log has an event after `after`, or `timeout` seconds pass."""

    def feed(
        self, reader: str, tracking: Callable[[], Tracking], *, group: bool = True, interest: Interest | None = None
    ) -> Feed:
        return _LogFeed(self, tracking, interest)

    def size_hint(self) -> int | None:
        return self.last_position()


class _LogFeed(Feed):
    def __init__(self, store: LogStore, tracking: Callable[[], Tracking], interest: Interest | None) -> None:
        self.store = store
        self._tracking = tracking
        self.interest = interest
        self.rewind()

    def rewind(self) -> None:
        self.position = self._tracking().get(LOG, 0)
        self._at_head = False  # until a read reaches the end of the log

    def caught_up(self) -> bool:
        return self._at_head

    def poll(self, limit: int, timeout: float = 0.0) -> list[Envelope]:
        batch = self._read(limit)
        if not batch and timeout > 0 and self.store.wait(self.position, timeout):
            batch = self._read(limit)
        return batch

    def poll_rows(self, limit: int, timeout: float = 0.0) -> list[Row]:
        if self.interest is not None:
            return super().poll_rows(limit, timeout)
        rows = self.store.read_rows(self.position, limit)
        if not rows and timeout > 0 and self.store.wait(self.position, timeout):
            rows = self.store.read_rows(self.position, limit)
        if rows:
            self.position = rows[-1][0]
        self._at_head = len(rows) < limit
        return rows

    def _read(self, limit: int) -> list[Envelope]:
        if self.interest is None:
            batch = self.store.read(self.position, limit)
            if batch:
                self.position = batch[-1].position or self.position
            self._at_head = len(batch) < limit
            return batch
        upto = self.store.last_position()
        batch = self.store.read(self.position, limit, upto=upto, interest=self.interest)
        # a short batch means every event up to `upto` (the end of the log when read) was looked at
        self._at_head = len(batch) < limit
        self.position = upto if self._at_head else batch[-1].position or self.position
        return batch


DEFAULT_URL = "sqlite:///choreo.db"


def open_store(url: str | None = None, *, create: bool = True, **options: Any) -> EventStore:
    """Open the event store named by `url` (default: `$CHOREO_STORE` or `sqlite:///choreo.db`).

    Understood: `memory://`; `sqlite:///relative.db` and `sqlite:////absolute.db`, with
    optional query settings `durability=full|normal` and `lock_timeout=SECONDS`;
    `postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE` (or `postgres://`), with the settings of
    `choreo.stores.postgres` (`durability`, `lock_timeout`, `poll_interval`; the rest go to libpq;
    needs `pip install choreo[postgres]`); and `kafka://HOST:PORT[,HOST:PORT]` with the settings of
    `choreo.stores.kafka.KafkaSettings`.

    With `create=False` the store is opened to read only and nothing is created or
    written: on SQLite a missing file raises `StoreNotFound` naming it (on PostgreSQL a missing
    database, or one without choreo's log), and so does `service(name)` of a service without tables. A memory store is new either way. On
    Kafka the topic must exist and no topic, state folder or file is created.
    """
    url = url or os.environ.get("CHOREO_STORE") or DEFAULT_URL
    parts = urlsplit(url)
    if parts.scheme == "memory":
        from choreo.stores.memory import InMemoryStore

        return InMemoryStore()
    if parts.scheme == "sqlite" and url.startswith("sqlite:///"):
        from choreo.stores.sqlite import SQLiteStore

        settings: dict[str, Any] = dict(parse_qsl(parts.query))
        unknown = set(settings) - {"durability", "lock_timeout"}
        if unknown:
            raise StoreURLError(f"unknown setting(s) {sorted(unknown)} in store URL {url!r}")
        if "lock_timeout" in settings:
            try:
                settings["lock_timeout"] = float(settings["lock_timeout"])
            except ValueError:
                raise StoreURLError(f"lock_timeout must be a number of seconds in {url!r}") from None
        path = url[len("sqlite:///") :].split("?", 1)[0]
        return SQLiteStore(path, **{**settings, **options, "create": create})
    if parts.scheme == "kafka":
        from choreo.stores.kafka import open_kafka

        return open_kafka(url, create=create, **options)
    if parts.scheme in ("postgresql", "postgres"):
        try:
            from choreo.stores.postgres import PostgresStore
        except ModuleNotFoundError as e:
            if e.name not in ("psycopg", "psycopg_binary"):
                raise
            raise StoreURLError(
                f"{parts.scheme}:// stores need psycopg 3: pip install 'choreo[postgres]' ({e})"
            ) from None
        return PostgresStore(url, **{**options, "create": create})
    raise StoreURLError(
        f"unsupported store URL {url!r}: expected sqlite:///PATH, postgresql://USER@HOST:PORT/DATABASE, "
        "kafka://HOST:PORT or memory://"
    )
