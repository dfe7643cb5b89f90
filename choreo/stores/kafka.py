"""The Kafka event log, on kafka-python. This is the only module that imports `kafka`.

- Integration events live in one topic (default `choreo.events`), keyed by saga id,
  so one saga's events stay in order in one partition. The message value is the
  envelope as UTF-8 JSON; headers repeat the metadata (`choreo.stores._kafka_records`).
- Each service is a consumer group; its replicas split the partitions. A service
  keeps its state in its own SQLite file (`STATE/svc-NAME.db`), or in the store that
  `state=URL` names (shared by its replicas): its aggregates, its tracking per
  `topic:partition` (position = offset + 1), the ids it handled, its dead letters, and
  an outbox of emitted events, all written in the handler's one transaction.
- A replica claims each partition the group gives it in that store, and commits only
  for partitions it owns: a replica that lost one is refused (`PartitionLost`,
  nothing written; see `choreo.stores._kafka_owner`). Each replica publishes the
  outbox of its own partitions.
- The outbox is published by the relay (`choreo.stores._kafka_relay`) through `deliver()`,
  which reports, record by record, what the broker acknowledged, what it refuses for
  good (too large, invalid) and what failed for now. A producer the broker no longer
  knows (it restarted empty) is replaced.
- The service's tracking is the truth for offsets: on (re)assignment each partition
  is sought to the tracked position, never to Kafka's committed offset. After each
  local commit the positions are also committed to Kafka, for ops tools to show the
  group's lag (advisory only; a failed commit there is logged at debug level).
- A partition that ends before a reader's position (the broker lost its data) raises
  `LogRewound`: the feed compares its position with the high watermark of each fetch
  response, confirmed by a ListOffsets request. (tansu answers ListOffsets with the
  base offset of the last batch + 1, below the true end, so that alone is not enough.)
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from choreo.stores._kafka_records import WIRE_FIELDS, decode_record, encode_record, record_size
from choreo.stores._kafka_relay import _KafkaServiceStore
from choreo.errors import EventTooLarge, LogRewound, StoreError, StoreNotFound, StoreURLError
from choreo.events import Envelope
from choreo.stores._sqlite_documents import SQLiteDocumentStore
from choreo.stores.sqlite import SQLiteStore
from choreo.store import (
    DocumentStore, EventStore, Feed, Interest, LogStore, ServiceStore, Tracking, check_service_name, open_store,
)

try:
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.consumer.subscription_state import ConsumerRebalanceListener
    from kafka.partitioner.default import murmur2
    from kafka.structs import OffsetAndMetadata
    from kafka.errors import (
        CorruptRecordError, InvalidProducerEpochError, InvalidProducerIdMappingError, InvalidRecordError,
        InvalidTimestampError, KafkaConnectionError, KafkaError, MessageSizeTooLargeError,
        OutOfOrderSequenceNumberError, RecordListTooLargeError, TopicAlreadyExistsError, UnknownProducerIdError,
    )
except ModuleNotFoundError:  # pragma: no cover - exercised only without the extra
    raise StoreURLError("kafka:// needs kafka-python: pip install 'choreo[kafka]'") from None

__all__ = ["Delivery", "KafkaSettings", "KafkaStore", "decode_record", "encode_record", "open_kafka", "record_size"]

log = logging.getLogger("choreo.stores.kafka")

#: kafka-python checks record CRCs with the crc32c package when it is installed
_FAST_CRC = importlib.util.find_spec("crc32c") is not None

#: kafka-python's default `max_request_size`: the producer refuses a larger record
_MAX_REQUEST_SIZE = 1_048_576
#: room left in a request for the record batch header (61 bytes) and the produce request around it
_BATCH_OVERHEAD = 512
#: errors that are about one record and will not pass by sending it again
_REFUSED = (MessageSizeTooLargeError, RecordListTooLargeError, InvalidRecordError, CorruptRecordError,
            InvalidTimestampError)
_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)
#: errors after which a producer is of no more use (the broker forgot its producer id, e.g. it restarted empty)
_BROKEN_PRODUCER = (UnknownProducerIdError, OutOfOrderSequenceNumberError, InvalidProducerEpochError,
                    InvalidProducerIdMappingError)
#: how many times one delivery replaces a broken producer before it gives up (the caller retries later)
_PRODUCER_RENEWALS = 2
#: how long one poll of a group feed waits for its group's join (see `_KafkaFeed._poll_consumer`)
_JOIN_WAIT = 10.0


@dataclass
class KafkaSettings:
    """Where the Kafka log is and how choreo talks to it; every field can be set in the URL query."""

    servers: str
    topic: str = "choreo.events"
    partitions: int = 6
    #: a folder of SQLite files (default: $CHOREO_STATE, else choreo-state/TOPIC), or a store URL
    #: (`sqlite:///FILE`, `postgresql://...`) that holds every service's state, for replicas across hosts
    state: str = ""
    group_prefix: str = "choreo."
    durability: str = "full"
    wait: float = 0.0
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 2000
    fetch_max_wait_ms: int = 15
    request_timeout_ms: int = 10000
    max_event_bytes: int = 0  # default: the producer's max_request_size minus _BATCH_OVERHEAD
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


@dataclass
class Delivery:
    """What became of envelopes sent in order: acknowledged, refused for good, or not (yet) taken."""

    #: for each envelope, its position (offset + 1) if the broker acknowledged it, else None
    positions: list[int | None]
    #: the envelopes (by index) that the producer or broker refuses for good, with the error
    refused: dict[int, Exception] = field(default_factory=dict)
    #: why the others were not taken (it may pass: the broker is away, a timeout); None if none is left
    error: str | None = None


class KafkaStore(EventStore):
    """The log in a Kafka topic; each service's and read model's own state in SQLite files under `state`,
    or in the store that `state` names by URL."""

    idle_timeout = 0.5

    def __init__(self, settings: KafkaSettings, *, create: bool = True) -> None:
        settings.state = settings.state or os.environ.get("CHOREO_STATE") or os.path.join("choreo-state", settings.topic)
        request_max = int(settings.producer.get("max_request_size", _MAX_REQUEST_SIZE))
        if settings.max_event_bytes <= 0:
            settings.max_event_bytes = request_max - _BATCH_OVERHEAD
        elif settings.max_event_bytes > request_max - _BATCH_OVERHEAD:
            log.warning("max_event_bytes=%d is more than the producer sends (max_request_size=%d): larger events "
                        "are refused by the producer and set aside by the relay", settings.max_event_bytes,
                        request_max)
        self.settings = settings
        self.url = f"kafka://{settings.servers}?topic={settings.topic}"
        self.topic = settings.topic
        self._guard = threading.Lock()
        self._local: dict[tuple[str, str], SQLiteStore] = {}
        self._services: dict[str, _KafkaServiceStore] = {}
        self._state: LogStore | None = None  # the store `state=URL` names, once opened
        self._partitions: int | None = None  # the topic's partition count, once read
        self._producer: KafkaProducer | None = None
        #: opened to read only (`open_store(url, create=False)`): no topic, folder or file is created
        self.read_only = not create
        #: whether `state` is a store URL (else a folder of SQLite files)
        self.state_url = "://" in settings.state
        if create and not self.state_url:
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
                if self.read_only:
                    self._require_topic()
                else:
                    self._create_topic()
                return
            except KafkaError as e:
                if time.monotonic() >= deadline:
                    raise StoreError(
                        f"Kafka broker not reachable at {self.settings.servers} "
                        f"({type(e).__name__}: {e}); is it running? Add ?wait=SECONDS to wait for it"
                    ) from None
                log.warning("waiting for Kafka at %s (attempt %d): %s", self.settings.servers, attempt, e)
                time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))

    def _require_topic(self) -> None:
        """Raise `StoreNotFound` unless the topic exists (a read-only store creates nothing)."""
        consumer = KafkaConsumer(**self._common())
        try:
            if not consumer.partitions_for_topic(self.topic):
                raise StoreNotFound(f"no Kafka topic {self.topic!r} at {self.settings.servers}")
        finally:
            consumer.close()

    def _create_topic(self) -> None:
        """Create the topic with choreo's partition count, unless it exists."""
        admin = KafkaAdminClient(**self._common())
        try:
            admin.create_topics({self.topic: {"num_partitions": self.settings.partitions, "replication_factor": -1}})
        except TopicAlreadyExistsError:
            pass
        finally:
            admin.close()

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

    def _renew_producer(self, broken: KafkaProducer, why: Exception) -> None:
        """Close a producer the broker no longer knows (it restarted empty, say); the next send makes a new one."""
        log.warning("Kafka at %s: %s: %s; replacing the producer", self.settings.servers, type(why).__name__, why)
        with self._guard:
            if self._producer is broken:
                self._producer = None
        try:
            broken.close(timeout=1)
        except KafkaError:
            pass
        try:  # a broker that lost its data lost the topic too: create it with its partitions again
            self._create_topic()
        except KafkaError as e:
            log.warning("could not create topic %r: %s", self.topic, e)

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

    # -- sending -------------------------------------------------------------------------
    def oversized(self, env: Envelope) -> str | None:
        """Why the topic cannot take `env` (its record is over `max_event_bytes`), or None if it can."""
        limit = self.settings.max_event_bytes
        # A cheap bound first, so most events are not encoded twice: encoding turns a character of these
        # texts into at most 4.5 bytes (4 in UTF-8; a JSON float like 1e15 is written 1000000000000000.0).
        rough = sum(len(str(getattr(env, name) or "")) for name in WIRE_FIELDS) + len(env.payload)
        if 8 * rough + 1024 <= limit:
            return None
        size = record_size(*encode_record(env))
        if size <= limit:
            return None
        return (f"event {env.type} is {size} bytes as a Kafka record, more than the {limit} bytes the "
                f"topic takes (setting max_event_bytes)")

    def deliver(self, envelopes: Sequence[Envelope]) -> Delivery:
        """Send envelopes in order and wait for the broker; report what became of each.

        A send that fails at once stops the sending: what follows it is not sent. A producer
        the broker no longer knows is replaced, and what it did not deliver sent again.
        """
        done = Delivery(positions=[None] * len(envelopes))
        if not envelopes:
            return done
        timeout = self.settings.request_timeout_ms / 1000
        for renewal in range(_PRODUCER_RENEWALS + 1):
            todo = [i for i in range(len(envelopes)) if done.positions[i] is None and i not in done.refused]
            failure: Exception | None = None
            futures = []
            try:
                producer = self.producer()
            except KafkaError as e:
                done.error = f"{type(e).__name__}: {e}"
                return done
            for i in todo:
                key, value, headers = encode_record(envelopes[i])
                try:
                    futures.append((i, producer.send(self.topic, key=key, value=value, headers=headers)))
                except _REFUSED as e:  # larger than the producer sends: refused before it left
                    done.refused[i] = e
                except KafkaError as e:
                    failure = e
                    break  # in order: nothing after a record that did not leave
            try:
                producer.flush(timeout=timeout)
            except KafkaError as e:
                failure = failure or e
            for i, future in futures:
                try:
                    done.positions[i] = future.get(timeout=0 if failure else timeout).offset + 1
                except _REFUSED as e:
                    done.refused[i] = e
                except KafkaError as e:
                    failure = failure or e
            if failure is None:
                done.error = None
                return done
            done.error = f"{type(failure).__name__}: {failure}"
            if not _broken(failure) or renewal == _PRODUCER_RENEWALS:
                return done
            self._renew_producer(producer, failure)
        return done

    def publish(self, envelopes: Sequence[Envelope]) -> list[int]:
        """Send envelopes and wait until the broker acknowledged each; return their positions.

        Raises `EventTooLarge` (sending nothing) if one is over `max_event_bytes` or the broker
        refuses it as too large, and `StoreError` if the broker did not take them all.
        """
        for env in envelopes:
            if why := self.oversized(env):
                raise EventTooLarge(why)
        done = self.deliver(envelopes)
        for i, e in done.refused.items():
            error = EventTooLarge if isinstance(e, _TOO_LARGE) else StoreError
            raise error(f"Kafka refused event {envelopes[i].type} {envelopes[i].event_id}: {type(e).__name__}: {e}")
        if done.error is not None:
            raise StoreError(f"Kafka at {self.settings.servers} did not take the events: {done.error}")
        return [p or 0 for p in done.positions]

    # -- EventStore ----------------------------------------------------------------------
    def append(self, envelopes: Sequence[Envelope]) -> list[int]:
        return self.publish(envelopes)

    def feed(
        self, reader: str, tracking: Callable[[], Tracking], *, group: bool = True, interest: Interest | None = None
    ) -> Feed:
        """Kafka cannot filter on the broker; with `interest`, records are left out by their headers."""
        own = self._services.get(reader) if group else None
        return _KafkaFeed(self, reader, self.settings.group_prefix + reader if group else None, tracking, interest,
                          own)

    def local(self, file: str, durability: str | None = None) -> SQLiteStore:
        """The SQLite store in `STATE/file` (opened once per durability)."""
        durability = durability or self.settings.durability
        with self._guard:
            if (file, durability) not in self._local:
                self._local[file, durability] = SQLiteStore(
                    os.path.join(self.settings.state, file), durability=durability, dedupe=True,
                    create=not self.read_only,
                )
            return self._local[file, durability]

    def state_store(self) -> LogStore:
        """The store that `state=URL` names, opened once; services' state and read models live there."""
        with self._guard:
            if self._state is None:
                # it must record handled ids: Kafka can deliver one event twice
                store = open_store(self.settings.state, create=not self.read_only, dedupe=True)
                if not isinstance(store, LogStore):
                    store.close()
                    raise StoreURLError(f"state={self.settings.state!r} cannot hold an outbox: use a folder, "
                                        "sqlite:///FILE or postgresql://...")
                self._state = store
            return self._state

    def state_of(self, name: str) -> tuple[LogStore, DocumentStore, bool]:
        """A service's state store, its relay's marks, and whether other services' outboxes share its log."""
        if self.state_url:
            state = self.state_store()
            return state, state.documents(f"relay_{name}"), True
        file = f"svc-{name}.db"
        return self.local(file), self.local(file, durability="normal").documents("outbox_relay"), False

    def service(self, name: str) -> ServiceStore:
        """The service's own store: one per name and `KafkaStore` (a process is one replica)."""
        check_service_name(name)
        if self.read_only and not self.state_url and not os.path.exists(
            os.path.join(self.settings.state, f"svc-{name}.db")
        ):
            raise StoreNotFound(f"no service {name!r} in {self.settings.state} (its state for topic {self.topic!r})")
        with self._guard:
            own = self._services.get(name)
        if own is None:
            own = _KafkaServiceStore(self, name)
            with self._guard:
                own = self._services.setdefault(name, own)
        return own

    def partition_count(self) -> int:
        """How many partitions the topic has (read from the broker once)."""
        if self._partitions is None:
            try:
                found = self.producer().partitions_for(self.topic)
            except KafkaError as e:
                raise StoreError(f"reading the partitions of Kafka topic {self.topic!r} failed: {e}") from None
            if not found:
                raise StoreError(f"Kafka topic {self.topic!r} has no partitions at {self.settings.servers}")
            self._partitions = len(found)
        return self._partitions

    def partition_of(self, saga_id: str) -> int:
        """The partition a saga's events go to (the producer's default partitioner: murmur2 of the key)."""
        return (murmur2(saga_id.encode()) & 0x7FFFFFFF) % self.partition_count()

    def documents(self, name: str) -> DocumentStore:
        check_service_name(name)
        if self.state_url:
            return self.state_store().documents(name)
        if self.read_only and not os.path.exists(os.path.join(self.settings.state, "readmodels.db")):
            from choreo.stores.memory import InMemoryStore

            return InMemoryStore().documents(name)  # never written: it reads as empty
        return SQLiteDocumentStore(self.local("readmodels.db"), name)  # not beside the log: timelines are copied

    # -- after the broker lost data ------------------------------------------------------
    def partition_ends(self) -> dict[int, int]:
        """The end (offset of the next record) of each partition of the topic, as the broker has it now.

        Read from fetch responses' high watermarks, which are exact on tansu too.
        """
        consumer = self.consumer(None)
        try:
            partitions = [TopicPartition(self.topic, p) for p in sorted(consumer.partitions_for_topic(self.topic) or ())]
            if not partitions:
                raise StoreError(f"Kafka topic {self.topic!r} has no partitions at {self.settings.servers}")
            consumer.assign(partitions)
            listed = consumer.end_offsets(partitions, timeout_ms=self.settings.request_timeout_ms)
            for tp, end in listed.items():  # at most the end (tansu answers less): fetch little
                consumer.seek(tp, max(0, end - 1))
            deadline = time.monotonic() + self.settings.request_timeout_ms / 1000
            while any(consumer.highwater(tp) is None for tp in partitions):
                if time.monotonic() > deadline:
                    raise StoreError(f"Kafka at {self.settings.servers} did not tell where topic {self.topic!r} ends")
                consumer.poll(timeout_ms=100, max_records=1)
            return {tp.partition: int(consumer.highwater(tp)) for tp in partitions}
        except KafkaError as e:
            raise StoreError(f"reading the ends of Kafka topic {self.topic!r} failed: {e}") from None
        finally:
            consumer.close()

    def reset_positions(self, service: str) -> dict[str, int]:
        """Move a service's position in each partition that ends before it back to the partition's start.

        For after the broker lost data (see `LogRewound`): the service then handles every
        record the partition holds now, and skips by id the copies of events it handled
        before. Returns the positions changed, by `topic:partition` (all 0).
        """
        own = _KafkaServiceStore(self, check_service_name(service))
        tracked = own.tracking()
        changed = {
            source: 0 for p, end in self.partition_ends().items()
            if tracked.get(source := f"{self.topic}:{p}", 0) > end
        }
        if changed:
            own.inner.set_tracking(changed)
            log.warning("%s: positions reset to the start of %s", service, ", ".join(sorted(changed)))
        return changed

    def close(self) -> None:
        with self._guard:
            producer, self._producer = self._producer, None
            stores, self._local = list(self._local.values()), {}
            state, self._state = self._state, None
            self._services = {}
        if state is not None:
            stores.append(state)  # type: ignore[arg-type]
        if producer is not None:
            try:
                producer.close(timeout=5)
            except KafkaError as e:
                log.warning("closing the Kafka producer: %s", e)
        for s in stores:
            s.close()


def _broken(error: Exception) -> bool:
    """Whether a producer that failed with `error` should be replaced (the broker forgot its id)."""
    return isinstance(error, _BROKEN_PRODUCER) or "InitProducerId" in str(error)


class _Assigned(ConsumerRebalanceListener):
    """Claims newly assigned partitions and seeks them to the reader's own tracking (the truth for offsets)."""

    def __init__(self, feed: _KafkaFeed) -> None:
        self.feed = feed

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.feed.joining = True  # (eager protocol) called before every join of the group, the first too
        self.feed.forget(revoked)

    def on_partitions_assigned(self, assigned: Any) -> None:
        # kafka-python logs what a listener raises and raises a vaguer KafkaError from poll();
        # the feed keeps the error and raises it itself from its next poll.
        self.feed.joining = False
        try:
            self.feed.take(assigned)
        except Exception as e:
            self.feed.failed_seek(assigned, e)


class _KafkaFeed(Feed):
    """A reader of the topic: every partition (no group), or its group's share of them."""

    def __init__(
        self, kafka: KafkaStore, reader: str, group: str | None, tracking: Callable[[], Tracking],
        interest: Interest | None, own: _KafkaServiceStore | None = None,
    ) -> None:
        self.kafka = kafka
        self.reader = reader
        self.group = group
        self.interest = interest
        self.topic = kafka.topic
        self._tracking = tracking
        self._next: dict[Any, int] = {}  # by partition: the offset of the next record this reader expects
        self._unsought: set[Any] = set()  # assigned partitions the listener could not seek
        self._unclaimed: set[Any] = set()  # of those, the ones not claimed yet
        self._failure: Exception | None = None  # why, to raise from the next poll
        self._moved = False  # partitions were assigned since `reassigned()` was last asked
        self._advice: dict[int, int] = {}  # positions committed locally, to commit to Kafka too
        #: the group is (re)joining: it revoked this reader's partitions and has not assigned them again
        self.joining = False
        #: the service's own store: a replica claims its partitions there and commits only for those
        self.own = own
        if own is not None:
            own.feed = self
            own.owner.active = True
        self.consumer = kafka.consumer(group)
        if group is not None:
            self.consumer.subscribe([self.topic], listener=_Assigned(self))
        else:
            partitions = self.consumer.partitions_for_topic(self.topic) or set()
            if not partitions:
                raise StoreError(f"Kafka topic {self.topic!r} has no partitions at {kafka.settings.servers}")
            self.consumer.assign([TopicPartition(self.topic, p) for p in sorted(partitions)])
            self.rewind()

    def take(self, partitions: Iterable[Any]) -> None:
        """Claim partitions the group assigned (in the service's store), then seek them to its tracking."""
        partitions = list(partitions)
        self._moved = True
        self._unclaimed.update(partitions)
        if self.own is not None:
            self.own.claim(tp.partition for tp in partitions)
        self._unclaimed.difference_update(partitions)
        self.consumer.resume(*partitions)  # paused if it was lost before: kafka-python keeps that across rebalances
        self.seek(partitions)

    def reassigned(self) -> bool:
        """Whether the group assigned partitions since the last call: other replicas changed their state."""
        moved, self._moved = self._moved, False
        return moved

    def advise(self, tracking: Tracking) -> None:
        """Note positions the service committed locally; the next poll commits them to Kafka (advisory)."""
        for source, position in tracking.items():
            topic, _, number = source.rpartition(":")
            if topic == self.topic and number.isdigit():
                self._advice[int(number)] = position

    def _commit_advice(self, partitions: Iterable[Any] | None = None, *, wait: bool = False) -> None:
        """Commit the noted positions to Kafka (of `partitions`, default all assigned); errors only logged."""
        if not self._advice or self.group is None:
            return
        wanted = set(self.consumer.assignment() if partitions is None else partitions)
        offsets = {tp: OffsetAndMetadata(self._advice.pop(tp.partition), "", -1)
                   for tp in wanted if tp.partition in self._advice}
        if not offsets:
            return
        try:
            if wait:  # bounded: a broker that is away must not hold a rebalance or a shutdown
                self.consumer.commit(offsets, timeout_ms=min(2000, self.kafka.settings.request_timeout_ms))
            else:
                self.consumer.commit_async(offsets, callback=self._advised)
        except KafkaError as e:
            log.debug("%s: committing offsets to Kafka (advisory) failed: %s", self.reader, e)

    def _advised(self, offsets: Any, result: Any) -> None:
        if isinstance(result, Exception):
            log.debug("%s: committing offsets to Kafka (advisory) failed: %s", self.reader, result)

    def seek(self, partitions: Iterable[Any]) -> None:
        """Continue each partition after the reader's tracked position in it."""
        partitions = list(partitions)
        tracked = self._tracking()
        for tp in partitions:
            position = tracked.get(f"{tp.topic}:{tp.partition}", 0)
            self.consumer.seek(tp, position)
            self._next[tp] = position
        self._unsought.difference_update(partitions)

    def failed_seek(self, partitions: Iterable[Any], error: Exception) -> None:
        """Remember partitions the listener could not seek, and why; the next poll seeks or raises."""
        self._unsought.update(partitions)
        self._failure = error

    def forget(self, partitions: Iterable[Any]) -> None:
        """Stop watching partitions the group took away (committing their last positions to Kafka first)."""
        partitions = list(partitions)
        self._commit_advice(partitions, wait=True)
        if self.own is not None:
            self.own.release(tp.partition for tp in partitions)
        for tp in partitions:
            self._next.pop(tp, None)
            self._unsought.discard(tp)
            self._unclaimed.discard(tp)

    def rewind(self) -> None:
        self.seek(self.consumer.assignment())

    def poll(self, limit: int, timeout: float = 0.0) -> list[Envelope]:
        self._failure = None
        if self._unclaimed:
            self.take(set(self._unclaimed) & self.consumer.assignment())
        if self._unsought:
            self.seek(set(self._unsought) & self.consumer.assignment())
        self._commit_advice()
        if self.own is not None:  # partitions another replica claimed: read no more of them till the group says
            lost = {tp for tp in self.consumer.assignment() if tp.partition not in self.own.owner.owned}
            lost -= self._unclaimed
            if lost - self.consumer.paused():
                self.consumer.pause(*lost)
        try:
            got = self._poll_consumer(limit, timeout)
        except KafkaError as e:
            if self._failure is not None:
                raise self._failure from None
            raise StoreError(f"reading Kafka topic {self.topic!r} failed: {e}") from None
        if self._failure is not None:
            raise self._failure
        self._check(got)
        return [
            decode_record(r.key, r.value, r.topic, r.partition, r.offset)
            for tp in sorted(got, key=lambda tp: tp.partition)
            for r in got[tp]
            if self._wanted(r.headers)
        ]

    def _poll_consumer(self, limit: int, timeout: float) -> Any:
        """Poll the consumer; if its group is joining, then wait (up to `_JOIN_WAIT` seconds) until the join ends.

        kafka-python sends JoinGroup and SyncGroup in the background; a poll whose timeout ends
        first leaves them under way, and the next poll takes their result. But a join that
        completes between two polls is thrown away and a new one is sent (kafka-python 3.0.12),
        which makes the whole group join again. A replica that polls with short timeouts and
        works between polls (every busy replica on a loaded machine) could keep its group
        rejoining for minutes, its partitions unowned. So the feed waits for the join in one
        call, with no gap in which it could complete; the replica has nothing else to do
        meanwhile (the join revoked its partitions). The wait is kafka-python's own
        (`ensure_active_group()` of the consumer's coordinator, a private attribute); without it,
        polls in 1-second slices.
        """
        got = self.consumer.poll(timeout_ms=int(timeout * 1000), max_records=limit)
        if got:
            self.joining = False  # records come only to a member of a formed group
            return got
        join = getattr(getattr(self.consumer, "_coordinator", None), "ensure_active_group", None)
        deadline = time.monotonic() + max(timeout, _JOIN_WAIT)
        while self.joining and self._failure is None and (left := deadline - time.monotonic()) > 0:
            if join is not None:  # True once the group assigned the partitions (and the listener ran)
                if join(timeout_ms=max(1, int(left * 1000))):
                    self.joining = False
            elif got := self.consumer.poll(timeout_ms=max(1, int(min(left, 1.0) * 1000)), max_records=limit):
                self.joining = False
        return got

    def next_offsets(self) -> dict[str, int]:
        """The offset of the next record this reader expects, by `TOPIC:PARTITION` (for its lag)."""
        return {f"{tp.topic}:{tp.partition}": n for tp, n in dict(self._next).items()}

    def caught_up(self) -> bool:
        """Whether the reader has read each of its partitions up to the end the broker last reported."""
        assigned = self.consumer.assignment()
        if not assigned or self._unsought:
            return False
        for tp in assigned:
            end = self.consumer.highwater(tp)
            if end is None or self._next.get(tp, 0) < end:
                return False
        return True

    def _check(self, got: dict[Any, list[Any]]) -> None:
        """Raise `LogRewound` if a partition now ends before this reader's position in it."""
        for tp, records in got.items():
            if records:
                expected = self._next.get(tp, 0)
                if records[0].offset < expected:  # the consumer went back: it found its offset out of range
                    raise self._rewound(tp, expected, self.consumer.highwater(tp) or 0)
                self._next[tp] = records[-1].offset + 1
        assigned = self.consumer.assignment()
        for tp, expected in self._next.items():
            if expected and tp in assigned:
                end = self.consumer.highwater(tp)
                if end is not None and end < expected:
                    # a new leader's high watermark may lag for a moment: ask the leader where the log ends
                    try:
                        listed = self.consumer.end_offsets([tp], timeout_ms=self.kafka.settings.request_timeout_ms)[tp]
                    except KafkaError as e:
                        raise StoreError(f"reading where Kafka topic {self.topic!r} ends failed: {e}") from None
                    if listed < expected:
                        raise self._rewound(tp, expected, max(end, listed))

    def _rewound(self, tp: Any, position: int, end: int) -> LogRewound:
        fix = (f"run `choreo run --reset-positions` for service {self.reader!r} to read the partition again from "
               "its start (events it handled before are skipped by their ids)"
               if self.group is not None else
               "rebuild this read model from what the log holds now (for the saga projection: `choreo replay`)")
        return LogRewound(
            f"{self.reader}: Kafka topic {tp.topic!r} partition {tp.partition} ends at offset {end}, before the "
            f"saved position {position}: the broker lost data (a fresh broker, or the topic recreated). Restore "
            f"the broker's data, or {fix}"
        )

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
        if self.group is not None:
            try:
                self._commit_advice(wait=True)
            except Exception as e:  # leaving the group matters more
                log.debug("%s: committing offsets to Kafka (advisory) failed: %s", self.reader, e)
        if self.own is not None and self.own.feed is self:
            self.own.feed = None
            self.own.release(list(self.own.owner.owned))
        self.consumer.close()


def open_kafka(url: str, *, create: bool = True, **options: Any) -> KafkaStore:
    """Open the Kafka store named by a `kafka://` URL; keyword options override URL settings.

    With `create=False` it reads only: a missing topic, service or read model raises
    `StoreNotFound` (or reads as empty), and no topic, folder or file is created.
    """
    settings = KafkaSettings.from_url(url)
    for key, value in options.items():
        if not hasattr(settings, key):
            raise StoreURLError(f"unknown Kafka setting {key!r}")
        setattr(settings, key, value)
    return KafkaStore(settings, create=create)
