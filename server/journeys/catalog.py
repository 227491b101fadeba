"""Published journeys: their versions and their lifecycle, in each sandbox's databases.

Databases (a sandbox's own, `server.profiles.sandboxes`):

    journeys        utf-8 id + NUL + version (u32 BE) -> versioned `JourneyRecord`
    journey_states  utf-8 id                          -> versioned `StateRecord`

Versions start at 1 and are never replaced (`server.messages.catalog.publish_version`), so an
instance stays on the version it entered. The state record says where the journey is in its
lifecycle and which version profiles enter (``live_version``: the latest published without
``draft``):

    draft -> live <-> paused
    live, paused -> closed (no new entries; instances finish) -> finished (none left)
    any but draft -> stopped (everyone exits)

Publishing a version that is not a draft makes a draft, closed, finished or stopped journey
live again (a paused one stays paused).
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from protocols import api
from server.messages.catalog import get_version, list_latest, publish_version
from server.profiles.records import unversioned
from server.profiles.sandboxes import Space
from server.profiles.store import Writer
from server.runtime.errors import FailedPrecondition, NotFound

__all__ = ["JourneyRecord", "StateRecord", "get_journey", "list_journeys", "moves_waiting", "publish", "change_state",
           "TRANSITIONS"]

_V1 = b"\x01"


class JourneyRecord(msgspec.Struct, kw_only=True):
    journey: api.JourneySpec
    version: int
    published_us: int
    draft: bool = False
    #: Published asking that waiting instances move to it (the engine moves them).
    move_waiting: bool = False


class StateRecord(msgspec.Struct, kw_only=True):
    state: str
    live_version: int | None = None
    updated_us: int = 0


_encoder = msgspec.msgpack.Encoder()
_journey_decoder = msgspec.msgpack.Decoder(JourneyRecord)
_state_decoder = msgspec.msgpack.Decoder(StateRecord)

#: What each change (a method's verb) does: the states it applies to, and the state it leaves.
TRANSITIONS: dict[str, tuple[frozenset[str], str]] = {
    "close": (frozenset({"live", "paused"}), "closed"),
    "stop": (frozenset({"live", "paused", "closed", "finished"}), "stopped"),
    "pause": (frozenset({"live"}), "paused"),
    "resume": (frozenset({"paused"}), "live"),
    #: The engine's, not a method's: a closed journey whose last instance ended.
    "finish": (frozenset({"closed"}), "finished"),
}


def _decode(value: bytes, what: str, decoder: msgspec.msgpack.Decoder) -> object:
    if value[:1] != _V1:
        raise unversioned(value, what)
    return decoder.decode(memoryview(value)[1:])


def _info(record: JourneyRecord, state: StateRecord) -> api.JourneyInfo:
    return api.JourneyInfo(
        journey=record.journey, version=record.version, state=state.state,  # type: ignore[arg-type]
        published=datetime.fromtimestamp(record.published_us / 1e6, UTC), live_version=state.live_version,
    )


def _state(space: Space, id: str) -> StateRecord | None:
    with space.env.begin() as txn:
        value = txn.get(id.encode(), db=space.db("journey_states"))
    return None if value is None else _decode(value, "journey state", _state_decoder)  # type: ignore[return-value]


def get_journey(space: Space, id: str, version: int | None = None) -> api.JourneyInfo:
    """A version of journey ``id`` (default: the latest) and its state; raises `NotFound`."""
    value = get_version(space, "journeys", id, version)
    state = _state(space, id)
    if value is None or state is None:
        what = f"version {version} of " if version is not None and state is not None else ""
        raise NotFound(f"no {what}journey {id!r} is published (pigeon journeys publish FILE)", field="$.id")
    return _info(_decode(value, "journey", _journey_decoder), state)  # type: ignore[arg-type]


def moves_waiting(space: Space, id: str, version: int) -> bool:
    """Whether version ``version`` of journey ``id`` was published asking that the instances
    waiting in the live version before it move to it."""
    value = get_version(space, "journeys", id, version)
    return value is not None and _decode(value, "journey", _journey_decoder).move_waiting  # type: ignore[attr-defined]


def list_journeys(space: Space) -> list[api.JourneyInfo]:
    """The latest version of every journey, by id."""
    out = []
    for value in list_latest(space, "journeys"):
        record: JourneyRecord = _decode(value, "journey", _journey_decoder)  # type: ignore[assignment]
        state = _state(space, record.journey.id)
        if state is not None:
            out.append(_info(record, state))
    return out


def publish(w: Writer, spec: api.JourneySpec, draft: bool, move_waiting: bool) -> api.JourneyInfo:
    """Store op: the next version of ``spec`` (checked by `definition.check`), and its state."""
    now = w.now
    record = JourneyRecord(journey=spec, version=0, published_us=now, draft=draft, move_waiting=move_waiting)

    def encode(version: int) -> bytes:
        record.version = version
        return _V1 + _encoder.encode(record)

    publish_version(w, "journeys", spec.id, encode)
    key = spec.id.encode()
    old = w.txn.get(key, db=w.dbs["journey_states"])
    state: StateRecord = (StateRecord(state="draft") if old is None
                          else _decode(old, "journey state", _state_decoder))  # type: ignore[assignment]
    if not draft:
        state.live_version = record.version
        if state.state != "paused":
            state.state = "live"
    state.updated_us = now
    w.txn.put(key, _V1 + _encoder.encode(state), db=w.dbs["journey_states"])
    return _info(record, state)


def change_state(w: Writer, id: str, verb: str) -> StateRecord:
    """Store op: apply ``verb`` (`TRANSITIONS`) to journey ``id``; raises `NotFound`, or
    `FailedPrecondition` naming the state it is in."""
    key = id.encode()
    old = w.txn.get(key, db=w.dbs["journey_states"])
    if old is None:
        raise NotFound(f"no journey {id!r} is published (pigeon journeys publish FILE)", field="$.id")
    state: StateRecord = _decode(old, "journey state", _state_decoder)  # type: ignore[assignment]
    applies, after = TRANSITIONS[verb]
    if state.state not in applies:
        raise FailedPrecondition(f"journey {id!r} is {state.state}: it cannot be {_PAST[verb]} "
                                 f"(only a journey that is {' or '.join(sorted(applies))})", field="$.id")
    state.state = after
    state.updated_us = w.now
    w.txn.put(key, _V1 + _encoder.encode(state), db=w.dbs["journey_states"])
    return state


_PAST = {"close": "closed", "stop": "stopped", "pause": "paused", "resume": "resumed", "finish": "finished"}
