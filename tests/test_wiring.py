from __future__ import annotations

import pytest

from choreo import Event, SagaDefinition, Service, System, WiringError


class Begun(Event):
    ref: str


class Done(Event):
    ref: str


def test_handler_for_something_that_is_not_an_event_fails_at_decoration() -> None:
    svc = Service("alpha")
    with pytest.raises(WiringError, match=r"'alpha'.*Event subclass.*str"):
        svc.on(str)  # type: ignore[arg-type]


def test_compensation_for_a_step_nobody_owns_names_it() -> None:
    svc = Service("alpha")

    @svc.compensation("ghost_step")
    def undo(done: Done, ctx: object) -> None: ...

    with pytest.raises(WiringError, match=r"ghost_step.*'alpha' does not own"):
        System([svc])


def test_two_services_owning_one_step_fail_at_startup() -> None:
    a, b = Service("alpha"), Service("beta")
    a.step("shared", on=Begun)(lambda e, c: Done(ref=e.ref))
    b.step("shared", on=Begun)(lambda e, c: Done(ref=e.ref))
    with pytest.raises(WiringError, match=r"'shared'.*'alpha'.*'beta'"):
        System([a, b])


def test_a_step_registered_twice_in_one_service_fails() -> None:
    a = Service("alpha")
    a.step("s", on=Begun)(lambda e, c: Done(ref=e.ref))
    with pytest.raises(WiringError, match="registered twice"):
        a.step("s", on=Done)(lambda e, c: Done(ref=e.ref))


def test_bad_service_name_fails() -> None:
    with pytest.raises(WiringError, match="invalid service name"):
        Service("Bad Name")


def test_saga_definition_steps_must_be_owned() -> None:
    a = Service("alpha", starts=[Begun])
    saga = SagaDefinition("s", start=Begun, steps=("missing",), end=(Done,))
    with pytest.raises(WiringError, match="no service owns step 'missing'"):
        System([a], sagas=[saga])


def test_starting_with_an_event_no_service_starts_fails() -> None:
    from choreo import InMemoryStore

    with pytest.raises(WiringError, match="no service starts sagas with Begun"):
        System([Service("alpha")]).start(InMemoryStore(), Begun(ref="x"))


def test_start_many_starts_each_saga_once() -> None:
    import services
    from choreo import InMemoryStore
    from services.contracts import OrderPlaced

    store = InMemoryStore()
    orders = [OrderPlaced(order_id=f"o-{i}", customer_id="c", sku="widget", quantity=1, amount=1, address="x")
              for i in range(3)]
    first = services.system.start_many(store, [(o, f"s-{i}") for i, o in enumerate(orders)])
    again = services.system.start_many(store, [(orders[0], "s-0"), (orders[1], "s-new")])  # s-0 is started
    assert first == ["s-0", "s-1", "s-2"] and again == ["s-0", "s-new"]
    assert [e.saga_id for e in store.read(0, 10)] == ["s-0", "s-1", "s-2", "s-new"]
