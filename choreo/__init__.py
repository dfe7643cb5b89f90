"""choreo: choreography-based, event-sourced sagas for Python services."""

from __future__ import annotations

from choreo.aggregates import Aggregate, event, load_aggregate
from choreo.checks import Finding, check
from choreo.clock import Clock, ManualClock, SystemClock, use_clock
from choreo.context import Context
from choreo.errors import (
    AggregateExists,
    AggregateNotFound,
    ChoreoError,
    ClaimLost,
    CommandRefused,
    ConcurrencyConflict,
    DeadLetterNotFound,
    EventError,
    EventIdTaken,
    EventTooLarge,
    EventValidationError,
    LogRewound,
    PartitionLost,
    SagaNotFound,
    SegmentsMismatch,
    StepFailed,
    StoreCorrupt,
    StoreError,
    StoreLocked,
    StoreNotFound,
    StoreURLError,
    UnknownEventType,
    UpcastError,
    WiringError,
)
from choreo.events import Envelope, Event, Outcome, StepCompensated, StepSkipped
from choreo.stores.memory import InMemoryStore
from choreo.operations import CompensationForced
from choreo.processor import Processor
from choreo.replicas import ReplicaSettings, segment_of
from choreo.retry import RetryPolicy
from choreo.projection import SagaFilter, SagaProjection
from choreo.runner import AsyncRunner, Runner, run_service
from choreo.saga import SagaCompleted, SagaDefinition, SagaFailed
from choreo.service import Service
from choreo.store import (
    DeadLetter, DocumentStore, EventStore, Feed, LogStore, ServiceStore, open_store,
)
from choreo.system import System
from choreo.upcasting import upcaster

__version__ = "0.1.0"

__all__ = [
    "AsyncRunner",
    "Aggregate",
    "AggregateExists",
    "AggregateNotFound",
    "ChoreoError",
    "ClaimLost",
    "Clock",
    "CommandRefused",
    "CompensationForced",
    "ConcurrencyConflict",
    "Context",
    "DeadLetter",
    "DeadLetterNotFound",
    "DocumentStore",
    "Envelope",
    "Event",
    "EventError",
    "EventIdTaken",
    "EventStore",
    "EventTooLarge",
    "EventValidationError",
    "Feed",
    "Finding",
    "InMemoryStore",
    "LogRewound",
    "LogStore",
    "ManualClock",
    "Outcome",
    "PartitionLost",
    "Processor",
    "ReplicaSettings",
    "RetryPolicy",
    "Runner",
    "SagaCompleted",
    "SagaDefinition",
    "SagaFailed",
    "SagaFilter",
    "SagaNotFound",
    "SagaProjection",
    "SegmentsMismatch",
    "Service",
    "ServiceStore",
    "StepCompensated",
    "StepFailed",
    "StepSkipped",
    "StoreCorrupt",
    "StoreError",
    "StoreLocked",
    "StoreNotFound",
    "StoreURLError",
    "System",
    "SystemClock",
    "UnknownEventType",
    "UpcastError",
    "WiringError",
    "check",
    "event",
    "load_aggregate",
    "open_store",
    "run_service",
    "segment_of",
    "upcaster",
    "use_clock",
]
