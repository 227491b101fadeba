"""The live journey engine's harder cases, through the real server and LMDB (the fixtures of
`test_journey_engine`): a trigger whose handling raises is quarantined and the others go on."""

from __future__ import annotations

from typing import Any

import msgspec
import trio

from protocols import api
from server.cli import output
from server.journeys import engine, instances

from .test_journey_engine import person, pushed, served, shop  # noqa: F401 (fixtures)

#: Profiles wait for a tap, then get the offer.
TAPS: dict[str, Any] = {
    "id": "taps", "entry": {"event": "go"},
    "nodes": [{"type": "reaction", "id": "react", "event": "tap", "timeout": "1h", "next": "offer"},
              {"type": "push", "id": "offer", "message": "offer", "next": "done"}, {"type": "end", "id": "done"}],
}


async def report(client: Any, journey: str, **filters: Any) -> api.Report:
    return await client.call(api.GetReport(journey=journey, **filters))


async def until(check: Any, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not await check():
            await trio.sleep(0.02)


async def test_a_trigger_that_raises_is_quarantined_and_the_others_go_on(shop: Any, fcm: Any,
                                                                       monkeypatch: Any) -> None:
    """A bug met by one profile's event must not crash the engine (its restart would meet the
    same event again, forever): that instance ends with reason error, nothing of its trigger
    is committed (no push), and the other profiles of the same cycle move."""
    server, client = shop
    await client.call(api.PublishJourney(journey=msgspec.convert(TAPS, api.JourneySpec)))
    names = ("a", "b", "c")
    for name in names:
        await person(client, f"crm:{name}", f"tok-{name}")
    await client.call(api.IngestEvents(events=[api.Event(identity=f"crm:{n}", type="go") for n in names]))
    await until(lambda: _total(client, "taps", "entered", 3))
    real = engine.advance

    def advance(journey: Any, instance: Any, happened: Any, at: int, profile: Any, world: Any) -> Any:
        if happened.type == "tap" and profile.get("name") == "b":
            world.update({"broken": True})  # a partial change, dropped with the trigger
            raise RuntimeError("a bug")
        return real(journey, instance, happened, at, profile, world)

    monkeypatch.setattr(engine, "advance", advance)
    await client.call(api.IngestEvents(events=[api.Event(identity=f"crm:{n}", type="tap") for n in names]))
    await until(lambda: _total(client, "taps", "exited", 3))
    assert (await report(client, "taps", node="react")).reasons["exited"] == {"error": 1}
    assert sorted(token for token, _, _ in await pushed(fcm, 2)) == ["tok-a", "tok-c"]
    assert server.journeys.details()["quarantined"] == 1
    assert "broken" not in (await client.call(api.GetProfile(identity="crm:b"))).attributes
    await person(client, "crm:d", "tok-d")  # the engine still runs
    await client.call(api.IngestEvents(events=[api.Event(identity="crm:d", type="go"),
                                               api.Event(identity="crm:d", type="tap")]))
    await pushed(fcm, 3)


async def _total(client: Any, journey: str, metric: str, count: int) -> bool:
    return (await report(client, journey)).totals.get(metric, 0) >= count


async def test_a_paused_journey_holds_its_moves_applies_its_exits_and_queues_or_refuses_entries(
        shop: Any, fcm: Any) -> None:
    """While paused an event does not move an instance (no reaction), an exit event still takes
    its profile out, and an entry is held (``paused_entries: queue``) and entered on resume, or
    refused and counted (the default)."""
    server, client = shop
    await client.call(api.PublishJourney(journey=msgspec.convert(
        {**TAPS, "exit": [{"event": "quit"}], "paused_entries": "queue"}, api.JourneySpec)))
    await client.call(api.PublishJourney(journey=msgspec.convert({**TAPS, "id": "refusing"}, api.JourneySpec)))
    for name in ("a", "b", "e"):
        await person(client, f"crm:{name}", f"tok-{name}")
    await client.call(api.IngestEvents(events=[api.Event(identity=f"crm:{n}", type="go") for n in "ae"]))
    await until(lambda: _total(client, "taps", "entered", 2))
    for id in ("taps", "refusing"):
        await client.call(api.PauseJourney(id=id))
    await client.call(api.IngestEvents(events=[
        api.Event(identity="crm:a", type="tap"), api.Event(identity="crm:e", type="quit"),
        api.Event(identity="crm:b", type="go")]))
    await until(lambda: _total(client, "refusing", "refused", 1))
    await until(lambda: _total(client, "taps", "exited", 1))
    assert (await report(client, "refusing")).reasons["refused"] == {"paused": 1}
    taps = await report(client, "taps")
    assert (taps.totals["entered"], taps.reasons["exited"], taps.totals.get("targeted")) == (2, {"exit": 1}, None)
    await client.call(api.ResumeJourney(id="taps"))
    await until(lambda: _total(client, "taps", "entered", 3))  # b, held, enters now
    await client.call(api.IngestEvents(events=[api.Event(identity="crm:b", type="tap")]))
    assert [token for token, _, _ in await pushed(fcm, 1)] == ["tok-b"]  # a's tap while paused moved nothing
    a = await client.call(api.TraceJourney(id="taps", identity="crm:a"))
    assert (a.outcome, a.node) == ("waiting", "react")


async def test_entries_over_the_journeys_entry_rate_are_refused_and_counted(shop: Any, fcm: Any) -> None:
    """``entry_rate`` caps the profiles entered a second whatever the entry: of five entry
    events at once, a second's worth (2) enter, the others are refused (reason entry_rate)."""
    server, client = shop
    await client.call(api.PublishJourney(journey=msgspec.convert({**TAPS, "entry_rate": 2}, api.JourneySpec)))
    names = [f"r{n}" for n in range(5)]
    for name in names:
        await person(client, f"crm:{name}", f"tok-{name}")
    await client.call(api.IngestEvents(events=[api.Event(identity=f"crm:{n}", type="go") for n in names]))
    await until(lambda: _total(client, "taps", "refused", 3))
    taps = await report(client, "taps")
    assert (taps.totals["entered"], taps.reasons["refused"]) == (2, {"entry_rate": 3})


async def test_the_instances_waiting_now_are_counted_per_version_and_node(shop: Any, fcm: Any) -> None:
    """``journeys.get`` says how many instances wait at each node now (kept in the commit that
    moves them), and ``pigeon journeys report`` shows it."""
    server, client = shop
    await client.call(api.PublishJourney(journey=msgspec.convert(TAPS, api.JourneySpec)))
    for name in ("a", "b"):
        await person(client, f"crm:{name}", f"tok-{name}")
    await client.call(api.IngestEvents(events=[api.Event(identity=f"crm:{n}", type="go") for n in "ab"]))
    await until(lambda: _total(client, "taps", "entered", 2))
    info = await client.call(api.GetJourney(id="taps"))
    assert (info.waiting, info.running) == ({"react": 2}, 2)
    await client.call(api.IngestEvents(events=[api.Event(identity="crm:a", type="tap")]))  # a: offer, then done
    await until(lambda: _total(client, "taps", "exited", 1))
    info = await client.call(api.GetJourney(id="taps"))
    assert (info.waiting, info.running) == ({"react": 1}, 1)
    rows = [(node, await report(client, "taps", node=node.id)) for node in info.journey.nodes]
    table = output.show_journey_report(info, rows).splitlines()
    assert table[1].split()[-1] == "WAITING" and table[2].split()[::len(table[2].split()) - 1] == ["react", "1"]
    await client.call(api.StopJourney(id="taps"))
    await until(lambda: _total(client, "taps", "exited", 2))
    assert {j.journey.id: j.running for j in (await client.call(api.ListJourneys())).journeys} == {
        "taps": 0, "welcome": 0}


async def test_a_closed_journey_is_finished_once_its_last_instance_ended(shop: Any, fcm: Any) -> None:
    server, client = shop
    await client.call(api.PublishJourney(journey=msgspec.convert(TAPS, api.JourneySpec)))
    await person(client, "crm:a", "tok-a")
    await client.call(api.IngestEvents(events=[api.Event(identity="crm:a", type="go")]))
    await until(lambda: _total(client, "taps", "entered", 1))
    await client.call(api.CloseJourney(id="taps"))
    await client.call(api.CloseJourney(id="welcome"))  # nobody in it: finished at once
    await until(lambda: _state(client, "welcome", "finished"))
    assert (await client.call(api.GetJourney(id="taps"))).state == "closed"  # a still waits
    await client.call(api.IngestEvents(events=[api.Event(identity="crm:a", type="tap")]))
    await until(lambda: _state(client, "taps", "finished"))


async def _state(client: Any, journey: str, state: str) -> bool:
    return (await client.call(api.GetJourney(id=journey))).state == state


async def test_a_second_event_in_the_same_cycle_sees_the_update_the_first_made(shop: Any, fcm: Any) -> None:
    """The engine takes a cycle's events together: the profile the second event's instance sees
    must hold the update node's patch made on the first (not the stored profile only)."""
    server, client = shop
    flow = {"id": "marks", "entry": {"event": "go"}, "nodes": [
        {"type": "update", "id": "mark", "patch": {"step": "one"}, "next": "react"},
        {"type": "reaction", "id": "react", "event": "tap", "timeout": "1h", "next": "check"},
        {"type": "condition", "id": "check", "branches": [{"when": "profile.step == 'one'", "next": "offer"}],
         "otherwise": "done"},
        {"type": "push", "id": "offer", "message": "offer", "next": "done"}, {"type": "end", "id": "done"}]}
    await client.call(api.PublishJourney(journey=msgspec.convert(flow, api.JourneySpec)))
    await person(client, "crm:a", "tok-a")
    await client.call(api.IngestEvents(events=[api.Event(identity="crm:a", type="go"),
                                               api.Event(identity="crm:a", type="tap")]))
    await until(lambda: _total(client, "marks", "exited", 1))
    assert (await report(client, "marks", node="offer")).totals.get("targeted") == 1


async def test_a_stop_over_many_cycles_goes_on_where_its_scan_was(shop: Any, fcm: Any, monkeypatch: Any) -> None:
    """A stop ends `engine.BATCH` instances a cycle; each next cycle must scan on from the last
    one ended, not from the first instance again (quadratic in the instances)."""
    server, client = shop
    await client.call(api.PublishJourney(journey=msgspec.convert(TAPS, api.JourneySpec)))
    names = [f"s{n}" for n in range(5)]
    for name in names:
        await person(client, f"crm:{name}", f"tok-{name}")
    await client.call(api.IngestEvents(events=[api.Event(identity=f"crm:{n}", type="go") for n in names]))
    await until(lambda: _total(client, "taps", "entered", 5))
    scans: list[bytes | None] = []
    real = instances.of_journey

    def of_journey(space: Any, journey: str, limit: int, **kwargs: Any) -> Any:
        if journey == "taps" and kwargs.get("before") is None:
            scans.append(kwargs.get("after"))
        return real(space, journey, limit, **kwargs)

    monkeypatch.setattr(engine, "BATCH", 2)
    monkeypatch.setattr(instances, "of_journey", of_journey)
    await client.call(api.StopJourney(id="taps"))
    await until(lambda: _total(client, "taps", "exited", 5))
    assert (await report(client, "taps")).reasons["exited"] == {"stopped": 5}
    assert len(scans) == 3 and scans[0] is None and None not in scans[1:] and scans[1] != scans[2]


async def test_a_journeys_counts_are_per_version(shop: Any, fcm: Any) -> None:
    """Entries, exits and pushes count under the version of the instance (``journey_version``
    of ``reports.get``); without it, every version's, under the journey's id."""
    server, client = shop
    for name in ("a", "b"):
        await person(client, f"crm:{name}", f"tok-{name}")
    for version, name in ((1, "a"), (2, "b")):
        await client.call(api.PublishJourney(journey=msgspec.convert(TAPS, api.JourneySpec)))
        await client.call(api.IngestEvents(events=[api.Event(identity=f"crm:{name}", type="go")]))
        await until(lambda: _total(client, "taps", "entered", version))
    await client.call(api.IngestEvents(events=[api.Event(identity="crm:b", type="tap")]))
    await pushed(fcm, 1)
    await until(lambda: _total(client, "taps", "delivered", 1))
    one, two, both = [await report(client, "taps", journey_version=v) for v in (1, 2, None)]
    assert (one.totals, two.totals.get("entered"), two.totals.get("delivered")) == ({"entered": 1}, 1, 1)
    assert (both.totals["entered"], both.totals["delivered"], list(both.by_journey)) == (2, 1, ["taps"])
    assert (await report(client, "taps", node="offer", journey_version=2)).totals["targeted"] == 1
