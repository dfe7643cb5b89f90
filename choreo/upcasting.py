"""Upcasters: how an old version of an event's payload becomes the current schema.

The log keeps every event as it was written, with its type name and schema version.
When an event class changes, its `schema_version` goes up and an upcaster says how a
payload of the previous version becomes one of the next:

    @upcaster("PaymentCaptured", from_version=1)
    def add_currency(payload: dict) -> dict:
        return {**payload, "currency": "EUR"}

Upcasters chain (v1 -> v2 -> v3 ...) up to the class's current `schema_version`. With
`to=`, an upcaster renames the type (`to="PaymentTaken"` reads as version 1 of that
type, `to=("PaymentTaken", 2)` as version 2, then its own chain applies), or splits the
event in several (`to=["OrderPlaced", "PaymentCaptured"]`: the function returns one
payload per target, in that order). Of a split event, the first keeps the envelope's id,
step and outcome; the others get ids derived from it and no step or outcome.

Events are upcast where they are read: the feeds of services, of the saga projection and
of operator commands (`upcasting_feed`), and wherever a payload is decoded
(`choreo.events.decode_payload`: compensations, deadlines, dead-letter retries). The
chains are checked at wiring time (`check_upcasters`, run by every `Processor` and
`SagaProjection`): `WiringError` names the type for two upcasters of one version, a
gap in a chain, a chain past the current version or one that ends nowhere.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from uuid import NAMESPACE_URL, uuid5

from choreo.errors import UpcastError, WiringError
from choreo.events import UPCASTERS, Envelope, current_version
from choreo.store import Feed, Row

__all__ = ["Upcaster", "check_upcasters", "upcast_envelope", "upcast_payload", "upcast_rows", "upcaster",
           "upcasting_feed"]

F = TypeVar("F", bound=Callable[..., Any])
Target = str | tuple[str, int]
_SPLIT_NAMESPACE = uuid5(NAMESPACE_URL, "https://choreo.dev/upcast-split")
#: how the `malformed` reason of an envelope whose upcaster failed begins
UPCAST_FAILED = "upcasting failed: "
#: how many upcasters one event may pass through (a longer chain is a loop)
_MAX_STEPS = 1000


@dataclass(frozen=True)
class Upcaster:
    """One registered upcaster: reads `event_type` at `from_version`, yields payloads of `targets`."""

    event_type: str
    from_version: int
    targets: tuple[tuple[str, int], ...]
    split: bool
    fn: Callable[[dict[str, Any]], Any]

    @property
    def name(self) -> str:
        """The upcaster function's qualified name."""
        return f"{getattr(self.fn, '__module__', '?')}.{getattr(self.fn, '__qualname__', repr(self.fn))}"

    @property
    def renames(self) -> bool:
        """Whether it yields another type (a rename or a split) rather than the next version."""
        return self.split or self.targets[0][0] != self.event_type


def upcaster(event_type: str, *, from_version: int, to: Target | Sequence[Target] | None = None) -> Callable[[F], F]:
    """Register a function that turns a payload of `event_type` at `from_version` into the next one.

    Without `to`, the result is version `from_version + 1` of the same type. `to` names
    another type (a rename; version 1 unless given as `(name, version)`), or a list of
    them (a split: the function returns a list with one payload per target).
    """
    if not isinstance(event_type, str) or not event_type:
        raise WiringError(f"upcaster: the event type must be a type name, got {event_type!r}")
    if isinstance(from_version, bool) or not isinstance(from_version, int) or from_version < 1:
        raise WiringError(f"upcaster for {event_type!r}: from_version must be a positive int, got {from_version!r}")
    split = isinstance(to, (list, tuple)) and not _is_target_pair(to)
    raw = [(event_type, from_version + 1)] if to is None else list(to) if split else [to]
    if split and not raw:
        raise WiringError(f"upcaster for {event_type!r} v{from_version}: `to` is an empty list")
    targets = tuple(_target(event_type, from_version, t) for t in raw)

    def register(fn: F) -> F:
        if not callable(fn):
            raise WiringError(f"upcaster for {event_type!r} v{from_version} must be a function, got {fn!r}")
        up = Upcaster(event_type, from_version, targets, split, fn)
        known = UPCASTERS.get((event_type, from_version))
        if known is not None and known.name != up.name:
            raise WiringError(
                f"two upcasters for {event_type!r} v{from_version}: {known.name} and {up.name}; keep one"
            )
        current = current_version(event_type)
        if not up.renames and current is not None and from_version >= current:
            raise _above(up, current)
        UPCASTERS[(event_type, from_version)] = up
        _checked.clear()
        return fn

    return register


def _is_target_pair(to: object) -> bool:
    return isinstance(to, tuple) and len(to) == 2 and isinstance(to[0], str) and isinstance(to[1], int)


def _target(event_type: str, from_version: int, t: object) -> tuple[str, int]:
    if isinstance(t, str) and t:
        return (t, 1)
    if _is_target_pair(t) and t[1] >= 1:  # type: ignore[index]
        return (t[0], t[1])  # type: ignore[index]
    raise WiringError(
        f"upcaster for {event_type!r} v{from_version}: each target must be a type name or (name, version), got {t!r}"
    )


def _above(up: Upcaster, current: int) -> WiringError:
    return WiringError(
        f"upcaster {up.name} turns {up.event_type!r} v{up.from_version} into v{up.from_version + 1}, above the "
        f"current schema version of {up.event_type!r} (v{current}): raise the class's schema_version, or drop it"
    )


_checked: set[int] = set()


def check_upcasters() -> None:
    """Raise `WiringError`, naming the type, if a chain of upcasters cannot reach a current event class.

    Checked: a version with no upcaster between two that have one (a gap), a chain that
    stops below the class's current `schema_version`, an upcaster past it, a rename to a
    version its target does not have, a type without a class whose chain does not rename
    it, and loops.
    """
    stamp = hash((frozenset(UPCASTERS.items()), frozenset(_current_versions().items())))
    if stamp in _checked:
        return
    by_type: dict[str, list[int]] = {}
    for (t, v) in UPCASTERS:
        by_type.setdefault(t, []).append(v)
    for t, versions in sorted(by_type.items()):
        versions.sort()
        current = current_version(t)
        for a, b in zip(versions, versions[1:]):
            if b != a + 1:
                raise WiringError(
                    f"gap in the upcasters of {t!r}: v{a} has one and v{b} has one, but v{a + 1} has none"
                )
        top = UPCASTERS[(t, versions[-1])]
        if not top.renames:
            if current is None:
                raise WiringError(
                    f"the upcasters of {t!r} end at v{versions[-1] + 1}, but no event class has type {t!r}: "
                    f"define it (schema_version = {versions[-1] + 1}) or rename the type with `to=`"
                )
            if versions[-1] + 1 > current:
                raise _above(top, current)
            if versions[-1] + 1 < current:
                raise WiringError(
                    f"gap in the upcasters of {t!r}: they reach v{versions[-1] + 1}, but the current schema "
                    f"version is v{current} and v{versions[-1] + 1} has no upcaster"
                )
        for v in versions:
            _resolves(t, v, ())
    _checked.add(stamp)


def _current_versions() -> dict[str, int | None]:
    names = {t for (t, _) in UPCASTERS} | {n for up in UPCASTERS.values() for (n, _) in up.targets}
    return {n: current_version(n) for n in names}


def _resolves(t: str, v: int, seen: tuple[tuple[str, int], ...]) -> None:
    """Check that an event of `t` at `v` ends, through the upcasters, at a current event class."""
    if (t, v) in seen:
        raise WiringError(f"the upcasters of {t!r} loop: {' -> '.join(f'{a} v{b}' for a, b in (*seen, (t, v)))}")
    up = UPCASTERS.get((t, v))
    if up is None:
        current = current_version(t)
        origin = f" (reached from {seen[0][0]!r} v{seen[0][1]})" if seen else ""
        if current is None:
            raise WiringError(f"the upcasters reach {t!r} v{v}{origin}, but no event class has type {t!r}")
        if v > current:
            raise WiringError(
                f"the upcasters reach {t!r} v{v}{origin}, above its current schema version v{current}"
            )
        if v < current:
            raise WiringError(f"gap in the upcasters of {t!r}: they reach v{v}{origin}, which has no upcaster "
                              f"to the current v{current}")
        return
    for target in up.targets:
        _resolves(target[0], target[1], (*seen, (t, v)))


def fingerprint() -> str | None:
    """A digest of the registered upcasters (which versions of which types become what), or None if none."""
    if not UPCASTERS:
        return None
    text = json.dumps(sorted([t, v, [list(x) for x in up.targets], up.name] for (t, v), up in UPCASTERS.items()))
    return hashlib.sha256(text.encode()).hexdigest()


# -- upcasting -------------------------------------------------------------------------
def upcast_payload(event_type: str, version: int, payload: str | bytes | dict[str, Any]) -> list[tuple[str, int, dict[str, Any]]]:
    """Upcast a payload to the current schema: (type, version, payload) of each resulting event.

    Raises `UpcastError` naming the upcaster if one raises or returns something else than
    the payload(s) it declares.
    """
    data = payload if isinstance(payload, dict) else _loads(event_type, version, payload)
    out: list[tuple[str, int, dict[str, Any]]] = []
    todo = [(event_type, version, data)]
    steps = 0
    while todo:
        t, v, p = todo.pop(0)
        up = UPCASTERS.get((t, v))
        if up is None:
            out.append((t, v, p))
            continue
        steps += 1
        if steps > _MAX_STEPS:
            raise UpcastError(f"upcasting {event_type!r} v{version} did not end after {_MAX_STEPS} upcasters")
        try:
            result = up.fn(dict(p))
        except Exception as e:
            raise UpcastError(f"upcaster {up.name} of {t!r} v{v} raised {type(e).__name__}: {e}") from e
        results = result if up.split else [result]
        if not isinstance(results, list) or len(results) != len(up.targets) \
                or not all(isinstance(r, dict) for r in results):
            want = f"a list of {len(up.targets)} dicts" if up.split else "a dict"
            raise UpcastError(f"upcaster {up.name} of {t!r} v{v} returned {result!r:.200}, not {want}")
        todo[:0] = [(nt, nv, r) for (nt, nv), r in zip(up.targets, results)]
    return out


def _loads(event_type: str, version: int, payload: str | bytes) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except ValueError as e:
        raise UpcastError(f"cannot upcast {event_type!r} v{version}: payload is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise UpcastError(f"cannot upcast {event_type!r} v{version}: payload is not a JSON object")
    return data


def _dumps(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def split_id(event_id: str, index: int) -> str:
    """The id of the `index`-th event (from 1) split off the stored event `event_id`."""
    return str(uuid5(_SPLIT_NAMESPACE, f"{event_id}/{index}"))


def upcast_envelope(env: Envelope) -> list[Envelope]:
    """An envelope as the current schema reads it: itself, or what its upcasters make of it.

    If an upcaster fails, the envelope comes back unchanged but `malformed` with the
    reason, so that a service parks it (never drops it).
    """
    if env.malformed is not None or (env.type, env.version) not in UPCASTERS:
        return [env]
    try:
        results = upcast_payload(env.type, env.version, env.payload)
    except UpcastError as e:
        return [replace(env, malformed=UPCAST_FAILED + str(e))]
    t, v, p = results[0]
    out = [replace(env, type=t, version=v, payload=_dumps(p))]
    out += [replace(env, event_id=split_id(env.event_id, i), type=t, version=v, payload=_dumps(p), step=None,
                    outcome=None) for i, (t, v, p) in enumerate(results[1:], 1)]
    return out


def upcast_batch(batch: list[Envelope]) -> list[Envelope]:
    """`upcast_envelope` over a batch (the batch itself when nothing in it needs upcasting)."""
    if not UPCASTERS or not any((e.type, e.version) in UPCASTERS for e in batch):
        return batch
    return [out for env in batch for out in upcast_envelope(env)]


def upcast_rows(rows: list[Row]) -> list[Row]:
    """`upcast_envelope` for log rows (`choreo.store.ROW_FIELDS`); a row whose upcaster fails stays as it is."""
    if not UPCASTERS or not any((r[2], r[3]) in UPCASTERS for r in rows):
        return rows
    out: list[Row] = []
    for row in rows:
        if (row[2], row[3]) not in UPCASTERS:
            out.append(row)
            continue
        try:
            results = upcast_payload(row[2], row[3], row[10])
        except UpcastError:
            out.append(row)
            continue
        for i, (t, v, p) in enumerate(results):
            if i == 0:
                out.append((*row[:2], t, v, *row[4:10], _dumps(p), row[11]))
            else:
                out.append((row[0], split_id(row[1], i), t, v, *row[4:7], None, None, row[9], _dumps(p), row[11]))
    return out


class _UpcastingFeed(Feed):
    """A feed whose envelopes (and rows) come upcast to the current schema."""

    def __init__(self, inner: Feed) -> None:
        self.inner = inner

    def poll(self, limit: int, timeout: float = 0.0) -> list[Envelope]:
        return upcast_batch(self.inner.poll(limit, timeout))

    def poll_rows(self, limit: int, timeout: float = 0.0) -> list[Row]:
        return upcast_rows(self.inner.poll_rows(limit, timeout))

    def rewind(self) -> None:
        self.inner.rewind()

    def caught_up(self) -> bool:
        return self.inner.caught_up()

    def reassigned(self) -> bool:
        return self.inner.reassigned()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def upcasting_feed(feed: Feed) -> Feed:
    """Wrap a feed so that what it reads is upcast to the current schema."""
    return _UpcastingFeed(feed)
