"""Audience-qualification entries through the real server, the real LMDB and the mock FCM: a
profile enters when it starts matching an audience (an attribute written, an event that makes
its history match), or when it stops (``on: exit``); those who matched when the journey went
live do not enter; the store's change feed is written only for sandboxes with an audience
journey, and emptied as the engine reads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from protocols import api
from protocols.trio_client import Client, open_client
from server import Server
from server.journeys import audiences, reads
from server.journeys.engine import Journeys
from server.profiles.store import ProfileStore

from .test_journey_engine import admin, ingest, person, pushed, reset, served, server_for, setup, stalled  # noqa: F401 (served: a fixture)

GOLD: dict[str, Any] = {
    "id": "gold",
    "entry": {"audience": "profile.tier == 'gold'"},
    "nodes": [
        {"type": "condition", "id": "vip", "branches": [{"when": "'gold' in profile.audiences", "next": "hello"}]},
        {"type": "push", "id": "hello", "message": "hello", "next": "done"},
        {"type": "end", "id": "done"},
    ],
}


async def publish(client: Client, flow: dict[str, Any]) -> None:
    await client.call(api.PublishJourney(journey=msgspec.convert(flow, api.JourneySpec)))


async def settled(server: Server, journey: str) -> None:
    """Once the journey's first read of who matches is done."""
    space = server.store.default
    with trio.fail_after(10):
        while (run := reads.get_run(space, journey)) is None or run.next_us != 0:
            await trio.sleep(0.02)


async def members(server: Server, identity: str) -> set[str]:
    pid, _ = server.store.default.find_profile(identity)
    return audiences.members_of(server.store.default, pid)


async def until_member(server: Server, identity: str, journeys: set[str]) -> None:
    with trio.fail_after(10):
        while await members(server, identity) != journeys:
            await trio.sleep(0.02)


async def test_a_profile_enters_when_it_starts_matching_and_not_when_it_matched_at_publish(served: Any, fcm: Any) -> None:
    server, client = served
    await person(client, "crm:ana", "tok-ana")
    await person(client, "crm:bob", "tok-bob")
    await client.call(api.PatchProfile(identity="crm:ana", patch={"tier": "gold"}))
    await setup(client, fcm, GOLD)
    await settled(server, "gold")
    assert await members(server, "crm:ana") == {"gold"}  # matched already: a member, not entered
    await client.call(api.PatchProfile(identity="crm:bob", patch={"tier": "gold"}))
    [(token, title, envelope)] = await pushed(fcm, 1, timeout=10)
    assert (token, title, envelope["j"], envelope["n"]) == ("tok-bob", "Hello bob", "gold", "hello")
    # a write that does not change whether ana matches enters nothing; bob leaving the audience
    # is recorded (and a later return would enter him again only if re-entrance allowed it)
    await client.call(api.PatchProfile(identity="crm:ana", patch={"city": "Lyon"}))
    await client.call(api.PatchProfile(identity="crm:bob", patch={"tier": "silver"}))
    await until_member(server, "crm:bob", set())
    assert await members(server, "crm:ana") == {"gold"}
    report = await client.call(api.GetReport(journey="gold"))
    assert report.totals["entered"] == 1 and len(await admin(fcm, "accepted")) == 1
    with trio.fail_after(10):  # the change feed is emptied as the engine reads it
        while _feed(server):
            await trio.sleep(0.02)


async def test_on_exit_enters_a_profile_when_it_stops_matching(served: Any, fcm: Any) -> None:
    server, client = served
    lapsed = {**GOLD, "id": "lapsed", "entry": {"audience": "profile.tier == 'gold'", "on": "exit"},
              "nodes": GOLD["nodes"][1:]}
    await person(client, "crm:ana", "tok-ana")
    await client.call(api.PatchProfile(identity="crm:ana", patch={"tier": "gold"}))
    await setup(client, fcm, lapsed)
    await settled(server, "lapsed")
    await client.call(api.PatchProfile(identity="crm:ana", patch={"tier": None}))
    [(token, _, envelope)] = await pushed(fcm, 1, timeout=10)
    assert (token, envelope["j"]) == ("tok-ana", "lapsed")


async def test_events_that_make_a_profile_s_history_match_enter_it(served: Any, fcm: Any) -> None:
    server, client = served
    loyal = {**GOLD, "id": "loyal", "entry": {"audience": "events.purchase.count >= 2 and events.purchase.last > '2000'"},
             "nodes": GOLD["nodes"][1:]}
    await person(client, "crm:ana", "tok-ana")
    await setup(client, fcm, loyal)
    await settled(server, "loyal")
    await ingest(client, "crm:ana", "purchase", total=10)
    await ingest(client, "crm:ana", "app.opened")
    await trio.sleep(0.3)  # one purchase: not yet
    assert await admin(fcm, "accepted") == []
    await ingest(client, "crm:ana", "purchase", total=12)
    [(token, _, envelope)] = await pushed(fcm, 1, timeout=10)
    assert (token, envelope["j"]) == ("tok-ana", "loyal")


async def test_only_a_sandbox_with_an_audience_journey_writes_the_change_feed(served: Any, fcm: Any) -> None:
    server, client = served
    await setup(client, fcm)  # an event-entry journey only
    await person(client, "crm:ana", "tok-ana")
    await client.call(api.PatchProfile(identity="crm:ana", patch={"tier": "gold"}))
    assert server.store.watched == frozenset() and _feed(server) == 0


def _feed(server: Server) -> int:
    with server.store.env.begin() as txn:
        return int(txn.stat(server.store.db("changes"))["entries"])


async def test_a_write_committed_before_a_crash_is_evaluated_after_it(tmp_path: Path, fcm: Any,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The change feed is durable with the write, and so is the set of sandboxes it is kept for
    (the store reads it back at open, before the engine starts)."""
    await reset(fcm)

    for start in range(2):
        server = server_for(tmp_path / "data", fcm)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            async with open_client(server.addresses[0]) as client:
                if start == 0:
                    await person(client, "crm:bob", "tok-bob")
                    await setup(client, fcm, GOLD)
                    await settled(server, "gold")
                    monkeypatch.setattr(Journeys, "_cycle", stalled)  # the change is not evaluated before the "crash"
                    await client.call(api.PatchProfile(identity="crm:bob", patch={"tier": "gold"}))
                    assert _feed(server) == 1
                else:
                    [(token, _, envelope)] = await pushed(fcm, 1, timeout=10)
                    assert (token, envelope["j"]) == ("tok-bob", "gold")
            server.request_stop()  # the engine commits nothing at a stop: as a kill
        monkeypatch.undo()
    store = ProfileStore(tmp_path / "data", clock=lambda: 1)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        assert store.watched == frozenset({0})
        nursery.cancel_scope.cancel()


async def test_only_events_of_the_types_an_audience_counts_read_a_profile_s_history(
        served: Any, fcm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a profile's history costs about 1.4 µs per event it has (up to 1,000): an event
    of a type the audience does not name cannot change whether the profile matches."""
    server, client = served
    loyal = {**GOLD, "id": "loyal", "entry": {"audience": "events['app.purchase'].count >= 2"},
             "nodes": GOLD["nodes"][1:]}
    await person(client, "crm:ana", "tok-ana")
    await setup(client, fcm, loyal)
    await settled(server, "loyal")
    read: list[bytes] = []
    real = audiences.history
    monkeypatch.setattr(audiences, "history", lambda store, pid: (read.append(pid), real(store, pid))[1])
    for type_ in ("app.opened", "app.closed", "app.purchase", "app.opened"):
        await ingest(client, "crm:ana", type_)
    with trio.fail_after(10):
        while server.journeys.position < server.journeys.log_end:
            await trio.sleep(0.02)
    assert len(read) == 1
    assert audiences.counts_any(server.journeys._live["default"]["loyal"], {"app.purchase", "x"})
