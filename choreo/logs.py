"""Structured logs: every record of choreo's loggers carries `service`, `saga_id` and `event_id`.

The fields are attributes of the `logging.LogRecord` (as `extra=` sets them), None where
not known: a log call that knows the event passes them (`fields()`), and the service
running in the current thread or task is filled in by a filter on choreo's loggers
(`bind()`). `JsonFormatter` writes a record as one JSON object a line; `choreo
--log-format json` uses it.
"""

from __future__ import annotations

import contextvars
import json
import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from choreo.events import Envelope

#: The fields every choreo log record carries.
FIELDS = ("service", "saga_id", "event_id")
#: choreo's loggers (tests/test_logs.py checks that every logger in the package is one of them).
LOGGERS = ("choreo", "choreo.projection", "choreo.stores.kafka")
_service: contextvars.ContextVar[str | None] = contextvars.ContextVar("choreo_log_service", default=None)


def bind(service: str) -> None:
    """Say that what runs from now on in this thread or task works for `service` (for its log records)."""
    if _service.get() != service:
        _service.set(service)


def fields(service: str | None = None, env: Envelope | None = None, *, saga_id: str | None = None,
           event_id: str | None = None) -> dict[str, Any]:
    """The `extra=` of a log call about an event (`env`), or a saga and an event named by id."""
    if env is not None:
        saga_id, event_id = env.saga_id or None, env.event_id
    return {"service": service, "saga_id": saga_id, "event_id": event_id}


class ContextFilter(logging.Filter):
    """Gives a record the fields it lacks: the bound service, else None."""

    def filter(self, record: logging.LogRecord) -> bool:
        d = record.__dict__
        if d.get("service") is None:
            d["service"] = _service.get()
        d.setdefault("saga_id", None)
        d.setdefault("event_id", None)
        return True


_FILTER = ContextFilter()


def install() -> None:
    """Add the filter to choreo's loggers (done when choreo is imported; adding it again changes nothing)."""
    for name in LOGGERS:
        logging.getLogger(name).addFilter(_FILTER)


class JsonFormatter(logging.Formatter):
    """A record as one JSON object: time, level, logger, message, the choreo fields, and the exception if any."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            out[name] = getattr(record, name, None)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


install()
