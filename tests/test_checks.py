"""`choreo check` and `choreo.check()`: the example is clean; a broken system reports each kind."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from typing import ClassVar

import pytest

from choreo import Context, Event, SagaDefinition, Service, StepFailed, System, WiringError, check
from choreo.checks import KINDS, Finding, declared_emits


class Begun(Event):
    """Starts the broken saga."""

    event_type: ClassVar[str] = "checks.Begun"

    n: int


class AlphaDone(Event):
    """Step alpha completed."""

    event_type: ClassVar[str] = "checks.AlphaDone"

    n: int


class AlphaFailed(Event):
    """Step alpha failed."""

    event_type: ClassVar[str] = "checks.AlphaFailed"

    n: int


class BetaDone(Event):
    """Step beta completed."""

    event_type: ClassVar[str] = "checks.BetaDone"

    n: int


class Orphan(Event):
    """Emitted, never handled."""

    event_type: ClassVar[str] = "checks.Orphan"

    n: int


class Ghost(Event):
    """Handled, never emitted: it triggers step gamma, which the saga therefore never reaches."""

    event_type: ClassVar[str] = "checks.Ghost"

    n: int


class Expired(Event):
    """What the deadline emits."""

    event_type: ClassVar[str] = "checks.Expired"

    n: int


class Never(Event):
    """The deadline's cancel event, which nothing emits."""

    event_type: ClassVar[str] = "checks.Never"

    n: int


def broken_system() -> System:
    """A system with one of each finding."""
    a, b = Service("a", starts=[Begun]), Service("b")

    @a.step("alpha", on=Begun, emits=[AlphaFailed])
    def alpha(e: Begun, ctx: Context) -> AlphaDone:
        if e.n < 0:
            raise StepFailed(AlphaFailed(n=e.n))
        return AlphaDone(n=e.n)

    @a.compensation("alpha")
    def undo_alpha(done: AlphaDone, ctx: Context) -> None:  # silent-compensation
        pass

    @b.step("beta", on=AlphaDone)  # step-without-compensation
    def beta(e: AlphaDone, ctx: Context) -> BetaDone:
        return BetaDone(n=e.n)

    @b.on(BetaDone)
    def after_beta(e: BetaDone, ctx: Context) -> Orphan:  # unhandled-event: nothing handles Orphan
        return Orphan(n=e.n)

    @b.step("gamma", on=Ghost)  # unemitted-event (Ghost) and unreachable-step (gamma)
    def gamma(e: Ghost, ctx: Context) -> Expired:
        return Expired(n=e.n)

    @b.compensation("gamma")
    def undo_gamma(done, ctx):  # undeclared-emits: no annotation, no emits=
        return None

    # uncancelled-deadline: nothing emits Never, and no service tracks the saga (so its end cancels nothing)
    @b.deadline("slow", start_on=AlphaDone, cancel_on=[Never], after=timedelta(seconds=5), fails_saga=False)
    def slow(e: AlphaDone, ctx: Context) -> None:
        return None

    saga = SagaDefinition("broken", start=Begun, steps=("alpha", "beta", "gamma"))
    return System([a, b], sagas=[saga])


def test_the_example_passes_clean() -> None:
    from services import system

    assert check(system) == []


def test_a_broken_system_reports_each_kind() -> None:
    findings = check(broken_system())
    kinds = {f.kind for f in findings}
    assert kinds == set(KINDS), findings
    by = {(f.kind, f.subject): f for f in findings}
    assert ("step-without-compensation", "beta") in by
    assert ("unhandled-event", "checks.Orphan") in by
    assert ("unemitted-event", "checks.Ghost") in by
    assert ("unreachable-step", "gamma") in by
    assert ("silent-compensation", "alpha") in by
    assert by["undeclared-emits", "tests.test_checks.broken_system.<locals>.undo_gamma"].service == "b"
    assert [f.kind for f in findings] == sorted((f.kind for f in findings), key=KINDS.index)


def test_a_deadline_cancelled_by_its_events_or_its_sagas_end_is_fine() -> None:
    findings = check(broken_system())
    assert [f.subject for f in findings if f.kind == "uncancelled-deadline"] == ["slow"]
    # the example's deadline has no cancel_on: the end of its tracked saga cancels it (no finding above)


def test_emits_come_from_the_return_annotation_and_emits() -> None:
    def one(e: Begun, ctx: Context) -> AlphaDone | BetaDone: ...
    def many(e: Begun, ctx: Context) -> list[AlphaDone]: ...
    def nothing(e: Begun, ctx: Context) -> None: ...
    def unknown(e, ctx): ...

    assert declared_emits(one) == {"checks.AlphaDone", "checks.BetaDone"}
    assert declared_emits(many, [Orphan]) == {"checks.AlphaDone", "checks.Orphan"}
    assert declared_emits(nothing) == frozenset()
    assert declared_emits(unknown) is None
    assert declared_emits(unknown, [Orphan]) == {"checks.Orphan"}


def test_emits_must_name_event_classes() -> None:
    with pytest.raises(WiringError, match="emits="):
        Service("x").on(Begun, emits=[str])  # type: ignore[list-item]
    with pytest.raises(WiringError, match="emits="):
        Service("x").step("s", on=Begun, emits=Orphan)  # type: ignore[arg-type]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "choreo", "check", *args], capture_output=True, text=True,
                          timeout=60)


def test_cli_exit_codes_and_json() -> None:
    clean = _cli("--system", "services:system")
    assert clean.returncode == 0, clean.stderr
    assert "no findings" in clean.stdout
    broken = _cli("--system", "tests.checks_broken:system", "--json")
    assert broken.returncode == 1, broken.stderr
    found = [Finding(**f) for f in json.loads(broken.stdout)]
    assert {f.kind for f in found} == set(KINDS)
    text = _cli("--system", "tests.checks_broken:system")
    assert text.returncode == 1 and "step-without-compensation: b: step 'beta'" in text.stdout
    usage = _cli("--system", "nope")
    assert usage.returncode == 2 and "MODULE:NAME" in usage.stderr
    assert _cli().returncode == 2
