"""Journeys made at random, against a real server process: a graph of random nodes
(targets that exist or not, loops, expressions that compile or not, waits of every kind) is
published and either accepted or refused with INVALID_ARGUMENT (or NOT_FOUND for a message)
naming a ``$.journey`` field; an accepted one is simulated for a random profile without an
internal error; and live, journeys with random entries and conditions meet random profile writes and events
without any trigger raising (the engine's ``quarantined`` stays 0). Bounded: a fixed number of examples, no deadline per example (a publish goes
through the store's commit)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from protocols import api
from protocols.frames import Error, Reply
from protocols.framing import FrameEncoder
from server.testing import ServerProcess

from .test_rpc_fuzz import _TOKEN_URI, _Connection, _seed

#: The providers' addresses: nothing listens there (sends fail at once, on loopback).
_UNREACHABLE = {"PIGEON_FCM__URL": "https://127.0.0.1:9", "PIGEON_FCM__TOKEN_URI": _TOKEN_URI,
                "PIGEON_APNS__PRODUCTION__ADDRESS": "127.0.0.1:9", "PIGEON_APNS__SANDBOX__ADDRESS": "127.0.0.1:9"}

_encoder = FrameEncoder()

_NAMES = st.sampled_from(["b", "c", "d", "e", "e", "a", "gone"])
_EXPRESSIONS = st.one_of(
    st.sampled_from(["profile.tier == 'gold'", "profile.n > 3", "events.purchase.count >= 1", "'x' in profile.audiences",
                     "now.hour < 12", "event.total > 10", "profile.n / 0", "profile.", "(", "profile.n ** 99999",
                     "events['a.b'].last > '2026'", "true", "profile.missing.deeper"]),
    st.text(min_size=1, max_size=30),
    st.sampled_from(["profile.n > 1", "true", "event.total > 10"]),
)
_DURATIONS = st.sampled_from(["1s", "1h", "2d", "1d12h", "2w", "0s", "100w"])
_NODE = st.one_of(
    st.fixed_dictionaries({"type": st.just("push"), "message": st.sampled_from(["fuzz", "fuzz", "nope"])},
                          optional={"next": _NAMES, "on_error": _NAMES}),
    st.fixed_dictionaries({"type": st.just("condition"),
                           "branches": st.lists(st.fixed_dictionaries({"when": _EXPRESSIONS, "next": _NAMES}),
                                                min_size=1, max_size=3)},
                          optional={"otherwise": _NAMES}),
    st.fixed_dictionaries({"type": st.just("split"),
                           "paths": st.lists(st.fixed_dictionaries({"percent": st.integers(1, 100), "next": _NAMES}),
                                             min_size=2, max_size=3)}),
    st.fixed_dictionaries({"type": st.just("wait")}, optional={
        "duration": _DURATIONS, "until": _EXPRESSIONS, "time": st.sampled_from(["09:00", "23:59", "00:00"]), "next": _NAMES}),
    st.fixed_dictionaries({"type": st.just("reaction"), "timeout": _DURATIONS},
                          optional={"push": _NAMES, "event": st.just("tap"), "condition": _EXPRESSIONS,
                                    "next": _NAMES, "timeout_next": _NAMES}),
    st.fixed_dictionaries({"type": st.just("update"), "patch": st.dictionaries(st.sampled_from(["n", "tier"]),
                                                                              st.one_of(st.integers(-2**63, 2**63 - 1), _EXPRESSIONS))},
                          optional={"next": _NAMES}),
    st.fixed_dictionaries({"type": st.just("end")}),
)
_ENTRY = st.one_of(
    st.fixed_dictionaries({"event": st.just("go")}, optional={"condition": _EXPRESSIONS}),
    st.fixed_dictionaries({"audience": _EXPRESSIONS}, optional={"on": st.sampled_from(["enter", "exit"])}),
    st.fixed_dictionaries({"read": st.just(True)}, optional={"condition": _EXPRESSIONS}),
)


@st.composite
def journeys(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly a chain (each target the next node, often), so that many run; sometimes a target
    before (a loop), missing, or unknown."""
    nodes = draw(st.lists(_NODE, min_size=1, max_size=5))
    ids = "abcde"[:len(nodes)]
    for i, node in enumerate(nodes):
        node["id"] = ids[i]
        following = [ids[i + 1]] * 6 if i + 1 < len(ids) else []
        targets = st.sampled_from(following + list(ids) + ["gone"])
        for key in ("next", "otherwise", "timeout_next", "on_error"):
            chained = key == "next" and following and node["type"] in ("push", "wait", "reaction", "update")
            if key in node or (chained and draw(st.booleans())):
                node[key] = draw(targets)
        for branch in node.get("branches", []) + node.get("paths", []):
            branch["next"] = draw(targets)
        if node["type"] == "split" and draw(st.booleans()):  # most add up to 100
            node["paths"][-1]["percent"] = max(1, 100 - sum(p["percent"] for p in node["paths"][:-1]))
    return {"id": "fuzz", "entry": draw(_ENTRY), "nodes": nodes}


def _refused_well(error: Error) -> bool:
    return error.code in ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION") and (
        "$.journey" in (error.field or "") + error.message)


@pytest.fixture(scope="module")
def connection(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Connection]:
    proc = ServerProcess(tmp_path_factory.mktemp("fuzz") / "data", env=_UNREACHABLE).start()
    try:
        connection = _Connection(proc.address)
        _seed(connection)  # apps (their provider unreachable: sends fail at once), crm:fuzz, message "fuzz"
        yield connection
        connection.sock.close()
    finally:
        proc.kill()


def _call(connection: _Connection, request: Any) -> Any:
    frame = connection.call(type(request).method, _encoder.body(request))
    if isinstance(frame, Error):
        return frame
    assert isinstance(frame, Reply), frame
    return msgspec.msgpack.decode(frame.body, type=api.METHODS[type(request).method].response)


def _engine(connection: _Connection) -> dict[str, Any]:
    stats = _call(connection, api.GetStats())
    return next(actor.details for actor in stats.actors if actor.name == "journeys")


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=journeys(), profile=st.dictionaries(st.sampled_from(["n", "tier", "timezone"]),
                                                st.one_of(st.integers(-2**63, 2**63 - 1), st.text(max_size=8), st.none())))
def test_a_random_journey_is_accepted_and_runs_or_is_refused_naming_its_field(
        connection: _Connection, spec: dict[str, Any], profile: dict[str, Any]) -> None:
    try:
        journey = msgspec.convert(spec, api.JourneySpec)
    except msgspec.ValidationError:
        event("refused by its shape")
        return  # the file's shape is refused before the server (test_api fuzzes that)
    published = _call(connection, api.PublishJourney(journey=journey))
    if isinstance(published, Error):
        assert _refused_well(published), published
        event(f"refused: {published.code}")
        return
    event("accepted")
    simulated = _call(connection, api.SimulateJourney(id="fuzz", profile={**profile, "registrations": []}))
    assert not isinstance(simulated, Error), simulated
    # live: random writes and events meet it (an audience entry evaluates each)
    assert not isinstance(_call(connection, api.PatchProfile(identity="crm:fuzz", patch=dict(profile))), Error)
    _call(connection, api.IngestEvents(events=[api.Event(identity="crm:fuzz", type="go", data={"total": 12}),
                                               api.Event(identity="crm:fuzz", type="purchase")]))
    deadline = time.monotonic() + 10
    while (engine := _engine(connection))["position"] < engine["log_end"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not isinstance(_call(connection, api.StopJourney(id="fuzz")), Error)
    assert _engine(connection)["quarantined"] == 0
