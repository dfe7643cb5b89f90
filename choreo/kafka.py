"""The Kafka event log, on kafka-python. This is the only module that imports `kafka`.

- Integration events live in one topic (default `choreo.events`), keyed by saga id,
  so one saga's events stay in order in one partition. The message value is the
  envelope as UTF-8 JSON (see `encode_record`); headers repeat the metadata.
- Each service is a consumer group; its replicas split the partitions. A service
  keeps its own SQLite file (`STATE/svc-NAME.db`) with its aggregates, its tracking
  per `topic:partition` (position = offset + 1), the ids it handled, its dead letters,
  and an outbox of emitted events, all written in the handler's one transaction.
- The outbox is published by `_KafkaServiceStore.flush()` (after each commit and
  before each poll), which marks what the broker acknowledged. A crash between send
  and mark sends again; consumers skip the copy by its event id.
- The service's tracking is the truth for offsets: on (re)assignment each partition
  is sought to the tracked position. Offsets are not committed to Kafka.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qsl, urlsplit
from uuid import UUID

from eventsourcing.persistence import StoredEvent

from choreo.deadlines import Deadline
from choreo.errors import StoreError, StoreURLError
from choreo.events import Envelope
from choreo.sqlite import SQLiteStore
from choreo.store import (
    DeadLetter, DocumentStore, EventStore, Feed, Interest, ServiceStore, Tracking, check_service_name,
)

try:
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.consumer.subscription_state import ConsumerRebalanceListener
    from kafka.errors import KafkaConnectionError, KafkaError, TopicAlreadyExistsError
except ModuleNotFoundError:  # pragma: no cover - exercised only without the extra
    raise StoreURLError("kafka:// needs kafka-python: pip install 'choreo[kafka]'") from None

log = logging.getLogger("choreo.kafka")

#: kafka-python checks record CRCs with the crc32c package when it is installed
_FAST_CRC = importlib.util.find_spec("crc32c") is not None

_WIRE_FIELDS = ("event_id", "type", "version", "saga_id", "causation_id", "service", "step", "outcome", "occurred_at")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass
class KafkaSettings:
    """Where the Kafka log is and how choreo talks to it; every field can be set in the URL query."""

    servers: str
    topic: str = "choreo.events"
    partitions: int = 6
    state: str = ""  # default: $CHOREO_STATE, else choreo-state/TOPIC
    group_prefix: str = "choreo."
    durability: str = "full"
    wait: float = 0.0
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 2000
    fetch_max_wait_ms: int = 15
    request_timeout_ms: int = 10000
    producer: dict[str, Any] = field(default_factory=dict)
    consumer: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_url(cls, url: str) -> KafkaSettings:
        """Parse `kafka://HOST:PORT[,HOST:PORT]?topic=..&partitions=..&state=DIR&wait=SECONDS&...`."""
        parts = urlsplit(url)
        if parts.scheme != "kafka" or not parts.netloc:
            raise StoreURLError(f"not a Kafka URL: {url!r} (expected kafka://HOST:PORT)")
        types = {f.name: f.type for f in fields(cls) if f.name not in ("servers", "producer", "consumer")}
        values: dict[str, Any] = {}
        for key, text in parse_qsl(parts.query, keep_blank_values=True):
            if key not in types:
                raise StoreURLError(f"unknown setting {key!r} in Kafka URL {url!r} (known: {sorted(types)})")
            kind = types[key]
            try:
                values[key] = int(text) if kind == "int" else float(text) if kind == "float" else text
            except ValueError:
                raise StoreURLError(f"setting {key!r} must be a number in {url!r}, got {text!r}") from None
        return cls(servers=parts.netloc, **values)


def encode_record(env: Envelope) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """Return the Kafka key, value and headers of an envelope.

    The value is a UTF-8 JSON object with the envelope's fields (`occurred_at` as ISO 8601)
    and `payload`, the event itself as a JSON object. The key is the saga id.
    """
    record: dict[str, Any] = {name: getattr(env, name) for name in _WIRE_FIELDS}
    record["occurred_at"] = env.occurred_at.isoformat()
    record["payload"] = json.loads(env.payload)
    # Few headers: consumers parse each one of every record; the type and outcome let them skip
    # the records they do not want without decoding the value.
    headers = [("choreo-type", env.type.encode()), ("choreo-event-id", env.event_id.encode())]
    if env.outcome:
        headers.append(("choreo-outcome", env.outcome.encode()))
    return env.saga_id.encode(), json.dumps(record, ensure_ascii=False).encode(), headers


def decode_record(key: bytes | None, value: bytes | None, topic: str, partition: int, offset: int) -> Envelope:
    """Return the envelope in a Kafka record; a record that is not one comes back `malformed`."""
    source, position = f"{topic}:{partition}", offset + 1
    try:
        d = json.loads(value or b"")
        if not isinstance(d, dict):
            raise ValueError(f"the value is JSON {type(d).__name__}, not an object")
        missing = [name for name in ("event_id", "type", "version", "occurred_at", "payload") if name not in d]
        if missing:
            raise ValueError(f"missing field(s) {', '.join(missing)}")
        occurred = datetime.fromisoformat(d["occurred_at"])
        return Envelope(
            event_id=str(d["event_id"]), type=str(d["type"]), version=int(d["version"]),
            saga_id=str(d.get("saga_id") or ""), causation_id=d.get("causation_id"),
            service=str(d.get("service") or ""), step=d.get("step"), outcome=d.get("outcome"),
            occurred_at=occurred if occurred.tzinfo else occurred.replace(tzinfo=timezone.utc),
            payload=json.dumps(d["payload"], ensure_ascii=False, separators=(",", ":")),
            position=position, source=source,
        )
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        return Envelope(
            event_id=f"{source}:{offset}", type="", version=0,
            saga_id=key.decode("utf-8", "replace") if key else "", causation_id=None, service="",
            step=None, outcome=None, occurred_at=_EPOCH, payload=repr(value)[:10_000],
            position=position, source=source,
            malformed=f"{source} offset {offset} is not a choreo envelope: {e}",
        )


class KafkaStore(EventStore):
    """The log in a Kafka topic; each service's and read model's own state in SQLite files under `state`."""

    idle_timeout = 0.5

    def __init__(self, settings: KafkaSettings) -> None:
        settings.state = settings.state or os.environ.get("CHOREO_STATE") or os.path.join("choreo-state", settings.topic)
        self.settings = settings
        self.url = f"kafka://{settings.servers}?topic={settings.topic}"
        self.topic = settings.topic
        self._guard = threading.Lock()
        self._local: dict[tuple[str, str], SQLiteStore] = {}
        self._producer: KafkaProducer | None = None
        os.makedirs(settings.state, exist_ok=True)
        if not _FAST_CRC:
            log.warning("the crc32c package is not installed: kafka-python checks record CRCs in pure "
                        "Python, which halves throughput (pip install 'choreo[kafka]')")
        self._connect()

    # -- connection ----------------------------------------------------------------------
    def _common(self) -> dict[str, Any]:
        return {"bootstrap_servers": self.settings.servers.split(","),
                "request_timeout_ms": self.settings.request_timeout_ms}

    def _connect(self) -> None:
        """Make sure the broker answers and the topic exists; wait for it if `wait` is set."""
        deadline = time.monotonic() + self.settings.wait
        attempt = 0
        while True:
            attempt += 1
            try:
                self._reachable()
                admin = KafkaAdminClient(**self._common())
                try:
                    admin.create_topics(
                        {self.topic: {"num_partitions": self.settings.partitions, "replication_factor": -1}}
                    )
                except TopicAlreadyExistsError:
                    pass
                finally:
                    admin.close()
                return
            except KafkaError as e:
                if time.monotonic() >= deadline:
                    raise StoreError(
                        f"Kafka broker not reachable at {self.settings.servers} "
                        f"({type(e).__name__}: {e}); is it running? Add ?wait=SECONDS to wait for it"
                    ) from None
                log.warning("waiting for Kafka at %s (attempt %d): %s", self.settings.servers, attempt, e)
                time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))

    def _reachable(self) -> None:
        """Raise `KafkaConnectionError` unless one bootstrap server accepts a TCP connection."""
        errors = []
        for server in self.settings.servers.split(","):
            host, _, port = server.rpartition(":")
            try:
                socket.create_connection((host or "localhost", int(port or 9092)), timeout=2.0).close()
                return
            except (OSError, ValueError) as e:
                errors.append(f"{server}: {e}")
        raise KafkaConnectionError("; ".join(errors))

    def producer(self) -> KafkaProducer:
        """The store's producer: acks from all in-sync replicas, idempotent, order kept per partition."""
        with self._guard:
            if self._producer is None:
                config = {**self._common(), "acks": "all", "enable_idempotence": True, "linger_ms": 0,
                          "max_in_flight_requests_per_connection": 5, **self.settings.producer}
                self._producer = KafkaProducer(**config)
            return self._producer

    def consumer(self, group: str | None) -> KafkaConsumer:
        """A consumer with choreo's settings: no auto-commit, earliest offsets, short fetch waits."""
        config = {**self._common(), "group_id": group, "enable_auto_commit": False,
                  "auto_offset_reset": "earliest", "fetch_max_wait_ms": self.settings.fetch_max_wait_ms,
                  "session_timeout_ms": self.settings.session_timeout_ms,
                  "heartbeat_interval_ms": self.settings.heartbeat_interval_ms, **self.settings.consumer}
        try:
            return KafkaConsumer(**config)
        except KafkaError as e:
            raise StoreError(f"cannot consume from Kafka at {self.settings.servers}: {e}") from None

    def publish(self, envelopes: Sequence[Envelope]) -> list[int]:
        """Send envelopes and wait until the broker acknowledged each; return their positions."""
        producer = self.producer()
        try:
            futures = []
            for env in envelopes:
                key, value, headers = encode_record(env)
                futures.append(producer.send(self.topic, key=key, value=value, headers=headers))
            producer.flush(timeout=self.settings.request_timeout_ms / 1000)
            return [f.get(timeout=self.settings.request_timeout_ms / 1000).offset + 1 for f in futures]
        except KafkaError as e:
            raise StoreError(f"Kafka at {self.settings.servers} did not take the events: {e}") from None

    # -- EventStore ----------------------------------------------------------------------
    def append(self, envelopes: Sequence[Envelope]) -> list[int]:
        return self.publish(envelopes)

    def feed(
        self, reader: str, tracking: Callable[[], Tracking], *, group: bool = True, interest: Interest | None = None
    ) -> Feed:
        """Kafka cannot filter on the broker; with `interest`, records are left out by their headers."""
        return _KafkaFeed(self, self.settings.group_prefix + reader if group else None, tracking, interest)

    def local(self, file: str, durability: str | None = None) -> SQLiteStore:
        """The SQLite store in `STATE/file` (opened once per durability)."""
        durability = durability or self.settings.durability
        with self._guard:
            if (file, durability) not in self._local:
                self._local[file, durability] = SQLiteStore(
                    os.path.join(self.settings.state, file), durability=durability, dedupe=True
                )
            return self._local[file, durability]

    def service(self, name: str) -> ServiceStore:
        check_service_name(name)
        return _KafkaServiceStore(self, name)

    def documents(self, name: str) -> DocumentStore:
        check_service_name(name)
        return self.local("readmodels.db").documents(name)

    def close(self) -> None:
        with self._guard:
            producer, self._producer = self._producer, None
            stores, self._local = list(self._local.values()), {}
        if producer is not None:
            producer.close(timeout=5)
        for s in stores:
            s.close()


class _KafkaServiceStore(ServiceStore):
    """A service's own SQLite store; its log table is the outbox, published by `flush()`."""

    def __init__(self, kafka: KafkaStore, name: str) -> None:
        self.kafka = kafka
        self.name = name
        self.local = kafka.local(f"svc-{name}.db")
        self.inner = self.local.service(name)
        # what Kafka acknowledged: written without fsync (losing a mark only means sending again)
        self.relay = kafka.local(f"svc-{name}.db", durability="normal").documents("outbox_relay")
        self._unsent = True  # unknown until the first flush looks

    def load(self, aggregate_id: UUID) -> list[StoredEvent]:
        return self.inner.load(aggregate_id)

    def load_many(self, aggregate_ids: Iterable[UUID]) -> dict[UUID, list[StoredEvent]]:
        return self.inner.load_many(aggregate_ids)

    def tracking(self) -> Tracking:
        return self.inner.tracking()

    def seen(self, event_ids: Sequence[str]) -> set[str]:
        return self.inner.seen(event_ids)

    def dead_letters(self, status: str | None = "parked") -> list[DeadLetter]:
        return self.inner.dead_letters(status)

    def due_deadlines(self, now: datetime, limit: int = 100) -> list[Deadline]:
        return self.inner.due_deadlines(now, limit)

    def commit(self, **changes: Any) -> None:
        self.inner.commit(**changes)
        if changes.get("emitted"):
            self._unsent = True
            self.flush()

    def flush(self) -> None:
        """Publish the outbox to Kafka, then mark what the broker acknowledged."""
        if not self._unsent:
            return
        while pending := self.local.read(self.relay.position(), 1000):
            self.kafka.publish(pending)
            self.relay.put({}, tracking={"log": pending[-1].position or 0})
        self._unsent = False

    def pending(self) -> int:
        """How many emitted events are not yet acknowledged by Kafka."""
        return self.local.last_position() - self.relay.position()


class _Assigned(ConsumerRebalanceListener):
    """Seeks newly assigned partitions to the reader's own tracking (the truth for offsets)."""

    def __init__(self, feed: _KafkaFeed) -> None:
        self.feed = feed

    def on_partitions_revoked(self, revoked: Any) -> None:
        pass

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.feed.seek(assigned)


class _KafkaFeed(Feed):
    def __init__(
        self, kafka: KafkaStore, group: str | None, tracking: Callable[[], Tracking], interest: Interest | None
    ) -> None:
        self.kafka = kafka
        self.interest = interest
        self.topic = kafka.topic
        self._tracking = tracking
        self.consumer = kafka.consumer(group)
        if group is not None:
            self.consumer.subscribe([self.topic], listener=_Assigned(self))
        else:
            partitions = self.consumer.partitions_for_topic(self.topic) or set()
            if not partitions:
                raise StoreError(f"Kafka topic {self.topic!r} has no partitions at {kafka.settings.servers}")
            self.consumer.assign([TopicPartition(self.topic, p) for p in sorted(partitions)])
            self.rewind()

    def seek(self, partitions: Any) -> None:
        tracked = self._tracking()
        for tp in partitions:
            self.consumer.seek(tp, tracked.get(f"{tp.topic}:{tp.partition}", 0))

    def rewind(self) -> None:
        self.seek(self.consumer.assignment())

    def poll(self, limit: int, timeout: float = 0.0) -> list[Envelope]:
        try:
            got = self.consumer.poll(timeout_ms=int(timeout * 1000), max_records=limit)
        except KafkaError as e:
            raise StoreError(f"reading Kafka topic {self.topic!r} failed: {e}") from None
        return [
            decode_record(r.key, r.value, r.topic, r.partition, r.offset)
            for tp in sorted(got, key=lambda tp: tp.partition)
            for r in got[tp]
            if self._wanted(r.headers)
        ]

    def _wanted(self, headers: Sequence[tuple[str, bytes]]) -> bool:
        """Whether to decode a record: by its `choreo-type` and `choreo-outcome` headers, if any."""
        if self.interest is None:
            return True
        found = dict(headers)
        kind = found.get("choreo-type")
        if kind is None:  # not written by choreo: decode it, so that it is parked if malformed
            return True
        outcome = found.get("choreo-outcome")
        try:
            return self.interest.wants_type(kind.decode(), outcome.decode() if outcome else None)
        except UnicodeDecodeError:
            return True

    def close(self) -> None:
        self.consumer.close()


def open_kafka(url: str, **options: Any) -> KafkaStore:
    """Open the Kafka store named by a `kafka://` URL; keyword options override URL settings."""
    settings = KafkaSettings.from_url(url)
    for key, value in options.items():
        if not hasattr(settings, key):
            raise StoreURLError(f"unknown Kafka setting {key!r}")
        setattr(settings, key, value)
    return KafkaStore(settings)
