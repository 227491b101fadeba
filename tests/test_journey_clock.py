"""The live engine on Trio's mock clock: the real server, the real LMDB and the mock FCM over TLS
and HTTP/2, with the server's clock and its sleeps on a `trio.testing.MockClock` that runs at
real speed and is jumped over the long waits: a day-long wait across a restart (and a timer
that fell due while the server was down, firing once), quiet hours in two time zones (queued
and discarded), re-entrance after a period, a reaction without an open timing out, and close
versus stop versus pause."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from protocols import api
from protocols.trio_client import Client, open_client
from server import Server

from .test_journey_engine import admin, ingest, person, pushed, reset, served, server_for, setup  # noqa: F401 (served: a fixture)

HOUR, DAY = 3600, 86400
DAILY: dict[str, Any] = {
    "id": "daily",
    "entry": {"event": "app.installed"},
    "nodes": [
        {"type": "push", "id": "hello", "message": "hello", "next": "wait"},
        {"type": "wait", "id": "wait", "duration": "1d", "next": "offer"},
        {"type": "push", "id": "offer", "message": "offer", "next": "react"},
        {"type": "reaction", "id": "react", "push": "offer", "timeout": "2d", "next": "done", "timeout_next": "late"},
        {"type": "update", "id": "late", "patch": {"ignored": True}, "next": "done"},
        {"type": "end", "id": "done"},
    ],
}


async def started(data: Path, fcm: Any, clock: trio.testing.MockClock,
                  body: Callable[[Server, Client], Any]) -> None:
    server = server_for(data, fcm, clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        async with open_client(server.addresses[0]) as client:
            await body(server, client)
        server.request_stop()


async def publish(client: Client, flow: dict[str, Any]) -> None:
    await client.call(api.PublishJourney(journey=msgspec.convert(flow, api.JourneySpec)))


async def report(client: Client, node: str, journey: str = "daily") -> api.Report:
    return await client.call(api.GetReport(journey=journey, node=node))


async def until(predicate: Callable[[], Any], timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(0.05)


async def test_a_day_long_wait_resumes_across_a_restart_and_a_reaction_times_out(
        tmp_path: Path, fcm: Any, clock: trio.testing.MockClock) -> None:
    await reset(fcm)

    async def first(server: Server, client: Client) -> None:
        await setup(client, fcm, DAILY)
        await person(client, "crm:ana", "tok-ana")
        await ingest(client, "crm:ana", "app.installed")
        await pushed(fcm, 1, timeout=5)

    async def second(server: Server, client: Client) -> None:
        offers = await pushed(fcm, 2)  # the wait fell due while the server was down: fired at the start
        assert [title for _, title, _ in offers] == ["Hello ana", "ana, 20% off"]
        clock.jump(2 * DAY + 1)  # no open of the offer: the reaction times out
        await until(lambda: _ignored(client))
        await trio.sleep(0.3)
        assert len(await pushed(fcm, 2)) == 2  # the offer went out once
        done = await report(client, "done")
        assert done.reasons["exited"] == {"end": 1}

    await started(tmp_path / "data", fcm, clock, first)
    clock.jump(DAY + HOUR)  # the server is down when the day-long wait falls due
    await started(tmp_path / "data", fcm, clock, second)


async def _ignored(client: Client) -> bool:
    return bool((await client.call(api.GetProfile(identity="crm:ana"))).attributes.get("ignored"))


@pytest.mark.parametrize("action", ["queue", "discard"])
async def test_quiet_hours_hold_or_discard_a_push_in_the_recipient_s_own_time_zone(
        served: Any, fcm: Any, clock: trio.testing.MockClock, action: str) -> None:
    server, client = served
    quiet = {"id": "quiet", "entry": {"event": "app.installed"},
             "quiet_hours": {"start": "21:00", "end": "07:00", "action": action},
             "nodes": [{"type": "push", "id": "hello", "message": "hello"}]}
    await setup(client, fcm, quiet)
    for name, zone in (("tokyo", "Asia/Tokyo"), ("york", "America/New_York")):  # 22:00 and 08:00 there
        await person(client, f"crm:{name}", f"tok-{name}")
        await client.call(api.PatchProfile(identity=f"crm:{name}", patch={"timezone": zone}))
        await ingest(client, f"crm:{name}", "app.installed")
    assert [token for token, _, _ in await pushed(fcm, 1, timeout=5)] == ["tok-york"]
    clock.jump(9 * HOUR + 1)  # 07:00 in Tokyo
    if action == "queue":
        assert sorted(token for token, _, _ in await pushed(fcm, 2)) == ["tok-tokyo", "tok-york"]
    else:
        await until(lambda: _exited(client, "quiet", "hello", "quiet_hours"))
        assert len(await pushed(fcm, 1)) == 1
        assert (await report(client, "hello", "quiet")).reasons["excluded"] == {"QuietHours": 1}


async def _exited(client: Client, journey: str, node: str, reason: str) -> bool:
    return (await report(client, node, journey)).reasons.get("exited", {}).get(reason) == 1


async def test_a_profile_enters_again_only_after_the_re_entrance_period(
        served: Any, fcm: Any, clock: trio.testing.MockClock) -> None:
    server, client = served
    again = {"id": "again", "entry": {"event": "app.installed"}, "reentrance": {"allowed": True, "after": "1d"},
             "nodes": [{"type": "push", "id": "hello", "message": "hello"}]}
    await setup(client, fcm, again)
    await person(client, "crm:ana", "tok-ana")
    await ingest(client, "crm:ana", "app.installed")
    await pushed(fcm, 1, timeout=5)
    clock.jump(12 * HOUR)
    await ingest(client, "crm:ana", "app.installed")  # ended, but entered less than a day ago
    await trio.sleep(0.3)
    assert len(await pushed(fcm, 1)) == 1
    clock.jump(12 * HOUR + 1)
    await ingest(client, "crm:ana", "app.installed")
    assert len(await pushed(fcm, 2)) == 2
    assert (await report(client, "hello", "again")).totals["entered"] == 2


async def test_close_lets_instances_finish_stop_ends_them_and_pause_holds_their_timers(
        served: Any, fcm: Any, clock: trio.testing.MockClock) -> None:
    server, client = served
    await setup(client, fcm, {**DAILY, "id": "closed", "entry": {"event": "closed.start"}})
    for id in ("stopped", "paused"):
        await publish(client, {**DAILY, "id": id, "entry": {"event": f"{id}.start"}})
    await person(client, "crm:ana", "tok-ana")
    for id in ("closed", "stopped", "paused"):
        await ingest(client, "crm:ana", f"{id}.start")
    await pushed(fcm, 3, timeout=5)  # three hellos; each instance waits a day
    await client.call(api.CloseJourney(id="closed"))
    await client.call(api.StopJourney(id="stopped"))
    await client.call(api.PauseJourney(id="paused"))
    await person(client, "crm:bob", "tok-bob")
    await ingest(client, "crm:bob", "closed.start")  # closed: no new entries
    clock.jump(DAY + 1)
    await pushed(fcm, 4)
    await trio.sleep(0.5)
    assert [envelope["j"] for _, _, envelope in (await pushed(fcm, 4))[3:]] == ["closed"]  # only the closed one's offer
    assert (await report(client, "wait", "stopped")).reasons["exited"] == {"stopped": 1}
    await client.call(api.ResumeJourney(id="paused"))
    clock.jump(61)  # a held timer is looked at again a minute later
    offers = await pushed(fcm, 5)
    assert [envelope["j"] for _, _, envelope in offers[4:]] == ["paused"]
    assert "tok-bob" not in {token for token, _, _ in offers}


async def test_a_wait_until_a_local_time_a_split_a_goal_and_the_journey_s_timeout(
        served: Any, fcm: Any, clock: trio.testing.MockClock) -> None:
    server, client = served
    morning = {"id": "morning", "entry": {"event": "go"}, "timeout": "2d", "goal": {"event": "purchase"},
               "nodes": [{"type": "split", "id": "ab", "paths": [{"percent": 50, "next": "nine"},
                                                                 {"percent": 50, "next": "nine"}]},
                         {"type": "wait", "id": "nine", "time": "09:00", "days": ["wed"], "next": "hello"},
                         {"type": "push", "id": "hello", "message": "hello", "next": "long"},
                         {"type": "wait", "id": "long", "duration": "3d", "next": "offer"},
                         {"type": "push", "id": "offer", "message": "offer"}]}
    await setup(client, fcm, morning)
    await person(client, "crm:ana", "tok-ana")
    await client.call(api.PatchProfile(identity="crm:ana", patch={"timezone": "Europe/Paris"}))
    await ingest(client, "crm:ana", "go")  # Tuesday 14:00 in Paris: waits for Wednesday 09:00 there
    clock.jump(19 * HOUR - 60)  # 08:59 on Wednesday in Paris
    await trio.sleep(0.5)
    assert await admin(fcm, "accepted") == []
    clock.jump(61)
    [(_, title, _)] = await pushed(fcm, 1)
    assert title == "Hello ana"
    await ingest(client, "crm:ana", "purchase")  # a conversion, at the node where it waits
    await until(lambda: _counted(client, "morning", "long", "goal"))
    clock.jump(DAY + 5 * HOUR)  # 2 days since it entered: out at once, in the middle of the 3-day wait
    await until(lambda: _exited(client, "morning", "long", "timeout"))
    assert len(await pushed(fcm, 1)) == 1


async def _counted(client: Client, journey: str, node: str, metric: str) -> bool:
    return (await report(client, node, journey)).totals.get(metric) == 1


async def test_entries_are_taken_between_the_journey_s_start_and_end(
        served: Any, fcm: Any, clock: trio.testing.MockClock) -> None:
    server, client = served
    window = {"id": "window", "entry": {"event": "go"}, "start": "2026-12-08T14:00:00Z", "end": "2026-12-08T15:00:00Z",
              "reentrance": {"allowed": True}, "nodes": [{"type": "push", "id": "hello", "message": "hello"}]}
    await setup(client, fcm, window)
    await person(client, "crm:ana", "tok-ana")
    for jump in (0, HOUR, HOUR):  # 13:00 (before the start), 14:00 (in), 15:00 (the end: out)
        clock.jump(jump)
        await ingest(client, "crm:ana", "go")
        await trio.sleep(0.3)
    assert len(await pushed(fcm, 1)) == 1
    assert (await report(client, "hello", "window")).totals["entered"] == 1


async def test_an_exit_condition_met_by_a_profile_write_takes_it_out_of_its_wait_at_once(
        served: Any, fcm: Any, clock: trio.testing.MockClock) -> None:
    server, client = served
    await setup(client, fcm, {**DAILY, "exit": [{"condition": "profile.unsubscribed"}]})
    await person(client, "crm:ana", "tok-ana")
    await ingest(client, "crm:ana", "app.installed")
    await pushed(fcm, 1, timeout=5)
    await client.call(api.PatchProfile(identity="crm:ana", patch={"unsubscribed": True}))  # no event: a write
    await until(lambda: _exited(client, "daily", "wait", "exit"))
    clock.jump(DAY + 1)
    await trio.sleep(0.5)
    assert len(await pushed(fcm, 1)) == 1  # no offer
