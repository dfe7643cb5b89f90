from __future__ import annotations

from typing import ClassVar

import pytest

from choreo import Event, EventValidationError, UnknownEventType, WiringError
from choreo.events import decode_payload, event_class


class ParcelWeighed(Event):
    parcel_id: str
    grams: int


def test_event_is_frozen_and_rejects_unknown_fields() -> None:
    e = ParcelWeighed(parcel_id="p1", grams=3)
    with pytest.raises(Exception):
        e.grams = 4  # type: ignore[misc]
    with pytest.raises(Exception):
        ParcelWeighed(parcel_id="p1", grams=3, colour="red")  # type: ignore[call-arg]


def test_registry_finds_class_by_type_and_version() -> None:
    assert event_class("ParcelWeighed") is ParcelWeighed
    with pytest.raises(UnknownEventType, match="ParcelWeighed"):
        event_class("ParcelWeighed", 2)


def test_schema_violation_names_the_type_and_field() -> None:
    with pytest.raises(EventValidationError) as info:
        decode_payload("ParcelWeighed", 1, '{"parcel_id": "p1", "grams": "heavy"}')
    assert info.value.event_type == "ParcelWeighed"
    assert info.value.field == "grams"
    assert "ParcelWeighed.grams" in str(info.value)


def test_missing_field_is_named() -> None:
    with pytest.raises(EventValidationError, match=r"ParcelWeighed\.grams"):
        decode_payload("ParcelWeighed", 1, '{"parcel_id": "p1"}')


def test_garbage_payload_is_a_validation_error() -> None:
    with pytest.raises(EventValidationError, match="ParcelWeighed"):
        decode_payload("ParcelWeighed", 1, b"\x00\xffnot json")


def test_two_classes_with_one_type_name_fail_at_definition() -> None:
    with pytest.raises(WiringError, match="ParcelWeighed"):

        class Other(Event):
            event_type: ClassVar[str] = "ParcelWeighed"
