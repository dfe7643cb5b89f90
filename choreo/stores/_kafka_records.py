"""The Kafka record format of an envelope: key, JSON value, headers. Plain Python, no kafka-python.

Any Kafka client can read a record (docs/kafka.md, "The record format"):

- the key is the saga id, UTF-8;
- the value is a UTF-8 JSON object with the envelope's fields and `payload`, the event;
- the headers `choreo-type`, `choreo-event-id` and, when set, `choreo-outcome` let a
  consumer skip the records it does not want without decoding their value;
- with tracing, the value's `trace` and the W3C `traceparent` header carry the trace
  context of the span that wrote the record.

`choreo.stores.kafka` re-exports these functions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from choreo.events import Envelope

#: the envelope's fields in a record's value, besides `payload`
WIRE_FIELDS = ("event_id", "type", "version", "saga_id", "causation_id", "service", "step", "outcome", "occurred_at")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
#: a record's length, attributes, timestamp and offset deltas (kafka-python's MAX_RECORD_OVERHEAD)
_RECORD_OVERHEAD = 21


def encode_record(env: Envelope) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """Return the Kafka key, value and headers of an envelope.

    The value is a UTF-8 JSON object with the envelope's fields (`occurred_at` as ISO 8601)
    and `payload`, the event itself as a JSON object. The key is the saga id.
    """
    record: dict[str, Any] = {name: getattr(env, name) for name in WIRE_FIELDS}
    record["occurred_at"] = env.occurred_at.isoformat()
    record["payload"] = json.loads(env.payload)
    # Few headers: consumers parse each one of every record; the type and outcome let them skip
    # the records they do not want without decoding the value.
    headers = [("choreo-type", env.type.encode()), ("choreo-event-id", env.event_id.encode())]
    if env.outcome:
        headers.append(("choreo-outcome", env.outcome.encode()))
    if env.trace:
        record["trace"] = env.trace
        headers.append(("traceparent", env.trace.encode()))
    return env.saga_id.encode(), json.dumps(record, ensure_ascii=False).encode(), headers


def record_size(key: bytes, value: bytes, headers: Sequence[tuple[str, bytes]]) -> int:
    """The most bytes a record takes in a Kafka record batch (every length counted as a 5-byte varint)."""
    size = _RECORD_OVERHEAD + 15 + len(key) + len(value)
    for name, data in headers:
        size += 10 + len(name.encode()) + len(data)
    return size


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
            position=position, source=source, trace=d["trace"] if isinstance(d.get("trace"), str) else None,
        )
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        return Envelope(
            event_id=f"{source}:{offset}", type="", version=0,
            saga_id=key.decode("utf-8", "replace") if key else "", causation_id=None, service="",
            step=None, outcome=None, occurred_at=_EPOCH, payload=repr(value)[:10_000],
            position=position, source=source,
            malformed=f"{source} offset {offset} is not a choreo envelope: {e}",
        )
