"""The live journey engine through the real server, the real LMDB and the mock FCM over TLS and
HTTP/2: an event enters a profile, its pushes reach the provider, waits wake on their timers,
an open of a push moves a reaction, an exit event interrupts a wait, a stop ends everyone, a
restart resumes the waits (a timer due while the server was down fires once), and the pushes
are counted under the journey and node."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from plugins.fcm.mock import ServiceAccount
from protocols import api
from protocols.errors import CallError, Status
from protocols.trio_client import Client, open_client
from server import Server, hookimpl
from server.journeys import engine, machine
from server.journeys.engine import Journeys

from .conftest import clock_of, make_config

APP = "com.acme.shop"
ACCOUNT = ServiceAccount.generate("acme-push")
FLOW: dict[str, Any] = {
    "id": "welcome",
    "entry": {"event": "app.installed"},
    "exit": [{"event": "purchase"}],
    "nodes": [
        {"type": "push", "id": "hello", "message": "hello", "next": "wait"},
        {"type": "wait", "id": "wait", "duration": "2s", "next": "offer"},
        {"type": "push", "id": "offer", "message": "offer", "next": "react"},
        {"type": "reaction", "id": "react", "push": "offer", "timeout": "30s", "next": "thanks",
         "timeout_next": "done"},
        {"type": "update", "id": "thanks", "patch": {"engaged": "yes"}, "next": "done"},
        {"type": "end", "id": "done"},
    ],
}


async def admin(mock: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    return await trio.to_thread.run_sync(functools.partial(getattr(mock.admin, name), *args, **kwargs))


def server_for(data: Path, fcm: Any, clock: trio.testing.MockClock | None = None) -> Server:
    config = make_config(data, fcm={"url": fcm.url, "token_uri": fcm.token_uri, "ca_file": str(fcm.ca_file),
                                    "retry_min_s": 0.05})
    if clock is None:
        return Server(config)
    return Server(config, clock=clock_of(clock))


async def reset(fcm: Any) -> None:
    """The mock FCM with the shop's project, nothing accepted yet, any token taken."""
    await admin(fcm, "set_project", "acme-push", [ACCOUNT.spec()])
    await admin(fcm, "clear_accepted")
    await admin(fcm, "set_faults", accept_any_token=True)


@pytest.fixture
async def served(tmp_path: Path, fcm: Any, clock: trio.testing.MockClock) -> AsyncIterator[tuple[Server, Client]]:
    """A server on the mock clock, the mock FCM `reset`, a client; no app or journey yet."""
    await reset(fcm)
    server = server_for(tmp_path / "data", fcm, clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        async with open_client(server.addresses[0]) as client:
            yield server, client
        server.request_stop()


@pytest.fixture
async def shop(served: tuple[Server, Client], fcm: Any) -> tuple[Server, Client]:
    """`served`, with the shop's app, messages and the journey ``welcome`` (`FLOW`)."""
    await setup(served[1], fcm)
    return served


async def setup(client: Client, fcm: Any, flow: dict[str, Any] = FLOW) -> None:
    await client.call(api.RegisterAndroidApp(app=APP, service_account=ACCOUNT.info(fcm.token_uri)))
    await client.call(api.PublishConfig(config=api.ChannelConfig(name="push", apps=[APP], platforms=["android"])))
    for name, title in (("hello", "Hello {{ profile.name }}"), ("offer", "{{ profile.name }}, 20% off")):
        await client.call(api.PublishMessage(message=api.MessageSpec(
            id=name, channel="push", content=api.MessageContent(title=title))))
    await client.call(api.PublishJourney(journey=msgspec.convert(flow, api.JourneySpec)))


async def person(client: Client, identity: str, token: str) -> None:
    await client.call(api.UpsertProfile(identity=identity, attributes={"name": identity.split(":")[1]}))
    await client.call(api.RegisterToken(identity=identity, app=APP, platform="fcm", token=token))


async def pushed(fcm: Any, count: int, timeout: float = 15) -> list[tuple[str, str, dict[str, Any]]]:
    """(token, title, envelope) of what the mock FCM accepted, once it has ``count``."""
    with trio.fail_after(timeout):
        while True:
            accepted = await admin(fcm, "accepted")
            if len(accepted) >= count:
                return [(a["token"], a["message"]["notification"]["title"], json.loads(a["message"]["data"]["_p"]))
                        for a in accepted]
            await trio.sleep(0.05)


async def trace(client: Client, journey: str, identity: str) -> api.Simulation | None:
    """The instance's trace, or None while it has not entered (the engine is a moment behind)."""
    try:
        return await client.call(api.TraceJourney(id=journey, identity=identity))
    except CallError as exc:
        if exc.status is not Status.NOT_FOUND:
            raise
        return None


async def ingest(client: Client, identity: str, type: str, **data: Any) -> None:
    await client.call(api.IngestEvents(events=[api.Event(identity=identity, type=type, data=data)]))


async def test_an_install_gets_hello_then_the_offer_and_an_open_of_it_moves_the_reaction(
        shop: Any, fcm: Any, clock: trio.testing.MockClock) -> None:
    server, client = shop
    await person(client, "crm:ana", "tok-ana")
    await ingest(client, "crm:ana", "app.installed")
    [(token, title, envelope)] = await pushed(fcm, 1, timeout=5)
    assert (token, title, envelope["j"], envelope["n"]) == ("tok-ana", "Hello ana", "welcome", "hello")
    clock.jump(2)
    offer = (await pushed(fcm, 2))[1]  # after the 2 s wait
    assert offer[1] == "ana, 20% off" and offer[2]["n"] == "offer"
    await ingest(client, "crm:ana", "pushTracking.applicationOpened", _p=offer[2])
    with trio.fail_after(10):
        while (await client.call(api.GetProfile(identity="crm:ana"))).attributes.get("engaged") != "yes":
            await trio.sleep(0.05)
    with trio.fail_after(10):  # interactions are counted a moment after they are ingested
        while (report := await client.call(api.GetReport(journey="welcome"))).totals.get("opened") != 1:
            await trio.sleep(0.05)
    assert report.totals.get("delivered") == 2
    assert (report.totals["entered"], report.totals["exited"], report.reasons["exited"]) == (1, 1, {"end": 1})
    assert (await client.call(api.GetReport(journey="welcome", node="hello"))).totals["entered"] == 1
    # and the CLI's table, node by node
    r = await trio.to_thread.run_sync(functools.partial(
        subprocess.run, [sys.executable, "-m", "server.cli", "journeys", "report", "welcome", "--server",
                         server.addresses[0]], capture_output=True, text=True, timeout=60))
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line.split() for line in r.stdout.splitlines()[2:] if line.strip() and ":" not in line}
    assert lines["hello"][1:4] == ["push", "1", "0"] and lines["done"][1:4] == ["end", "0", "1"]
    assert lines["offer"][7] == "1" and lines["offer"][9] == "1"  # delivered, opened
    assert "done: exited end 1" in r.stdout
    assert (await client.call(api.GetReport(journey="welcome", node="offer"))).totals.get("delivered") == 1


async def test_an_exit_event_interrupts_the_wait_and_no_offer_is_sent(shop: Any, fcm: Any,
                                                                      clock: trio.testing.MockClock) -> None:
    server, client = shop
    await person(client, "crm:bo", "tok-bo")
    await ingest(client, "crm:bo", "app.installed")
    await pushed(fcm, 1, timeout=5)
    await ingest(client, "crm:bo", "purchase")
    clock.jump(3)  # past the wait
    await trio.sleep(0.5)
    assert (await client.call(api.GetReport(journey="welcome", node="wait"))).reasons["exited"] == {"exit": 1}
    assert [t for t, _, _ in await pushed(fcm, 1)] == ["tok-bo"]
    # one instance per profile and journey: installing again does not enter again
    await ingest(client, "crm:bo", "app.installed")
    await trio.sleep(0.5)
    assert len(await pushed(fcm, 1)) == 1


async def test_a_stop_ends_every_instance(shop: Any, fcm: Any, clock: trio.testing.MockClock) -> None:
    server, client = shop
    for n in range(5):
        await person(client, f"crm:p{n}", f"tok-{n}")
        await ingest(client, f"crm:p{n}", "app.installed")
    await pushed(fcm, 5, timeout=5)
    await client.call(api.StopJourney(id="welcome"))
    await trio.sleep(0.3)
    clock.jump(3)
    await trio.sleep(0.5)
    report = await client.call(api.GetReport(journey="welcome", node="wait"))
    assert report.reasons["exited"] == {"stopped": 5}
    assert len(await pushed(fcm, 5)) == 5  # no offer: they were all stopped in their wait
    await ingest(client, "crm:p0", "app.installed")  # a stopped journey takes no one
    await trio.sleep(0.5)
    assert len(await pushed(fcm, 5)) == 5


async def test_a_restart_resumes_the_waits_and_a_timer_due_meanwhile_fires_once(tmp_path: Path, fcm: Any,
                                                                                clock: trio.testing.MockClock) -> None:
    await reset(fcm)
    for start in range(2):
        server = server_for(tmp_path / "data", fcm, clock)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            async with open_client(server.addresses[0]) as client:
                if start == 0:
                    await setup(client, fcm)
                    for n in range(3):
                        await person(client, f"crm:r{n}", f"tok-r{n}")
                        await ingest(client, f"crm:r{n}", "app.installed")
                    await pushed(fcm, 3, timeout=5)
                else:
                    offers = await pushed(fcm, 6)
                    await trio.sleep(0.5)
                    assert sorted(t for t, title, _ in await pushed(fcm, 6) if "off" in title) == [
                        "tok-r0", "tok-r1", "tok-r2"]
                    assert len(offers) == 6
            server.request_stop()
        if start == 0:
            clock.jump(2.5)  # the waits fall due while the server is down


async def test_a_read_audience_enters_every_matching_profile_once_at_its_rate(shop: Any, fcm: Any) -> None:
    server, client = shop
    for n in range(30):
        await client.call(api.UpsertProfile(identity=f"crm:g{n}", attributes={"name": f"g{n}",
                                                                              "tier": "gold" if n % 3 else "silver"}))
        await client.call(api.RegisterToken(identity=f"crm:g{n}", app=APP, platform="fcm", token=f"tok-g{n}"))
    read = {"id": "gold", "entry": {"read": True, "condition": "profile.tier == 'gold'", "rate": 10},
            "nodes": [{"type": "push", "id": "hi", "message": "hello"}]}
    started = trio.current_time()
    await client.call(api.PublishJourney(journey=msgspec.convert(read, api.JourneySpec)))
    accepted = await pushed(fcm, 20, timeout=20)
    took = trio.current_time() - started
    assert sorted(t for t, _, _ in accepted) == sorted(f"tok-g{n}" for n in range(30) if n % 3)
    assert took >= 1.0, f"20 profiles at 10 a second entered in {took:.2f} s"  # the rate held (a second's burst)
    await trio.sleep(1.5)
    assert len(await pushed(fcm, 20)) == 20  # read once: nobody entered twice
    report = await client.call(api.GetReport(journey="gold"))
    assert (report.totals["entered"], report.totals["delivered"]) == (20, 20)


async def test_a_test_mode_instance_s_trace_is_the_simulator_s_for_the_same_inputs(
        shop: Any, fcm: Any, clock: trio.testing.MockClock) -> None:
    server, client = shop
    flow = {**FLOW, "id": "trial", "test": True, "nodes": [
        {"type": "push", "id": "hello", "message": "hello", "next": "wait"},
        {"type": "wait", "id": "wait", "duration": "1h", "next": "late"},  # 10 s at most in test mode
        {"type": "condition", "id": "late", "branches": [{"when": "profile.vip", "next": "done"}], "otherwise": "offer"},
        {"type": "push", "id": "offer", "message": "offer", "next": "done"},
        {"type": "end", "id": "done"}]}
    spec = msgspec.convert(flow, api.JourneySpec)
    await client.call(api.PublishJourney(journey=spec))
    await client.call(api.UpsertProfile(identity="crm:t", attributes={"name": "t", "testProfile": True}))
    await client.call(api.RegisterToken(identity="crm:t", app=APP, platform="fcm", token="tok-t"))
    await person(client, "crm:x", "tok-x")  # not a test profile: it does not enter the test journey
    await ingest(client, "crm:x", "app.installed")
    await ingest(client, "crm:t", "app.installed")
    with trio.fail_after(30):  # (trio's deadlines are on the mock clock too: the jump counts)
        while (live := await trace(client, "trial", "crm:t")) is None or live.outcome != "ended":
            if live is not None and live.node == "wait" and clock.current_time() < 10:
                clock.jump(10)
            await trio.sleep(0.1)
    simulated = await client.call(api.SimulateJourney(id="trial", identity="crm:t", events=[
        api.SimulatedEvent(at=live.steps[0].at, type="app.installed")]))
    assert [(s.node, s.kind, s.detail.split(" until ")[0]) for s in live.steps] == [
        (s.node, s.kind, s.detail.split(" until ")[0]) for s in simulated.steps]
    assert (live.reason, simulated.reason) == ("end", "end")
    assert (live.steps[3].at - live.steps[2].at).total_seconds() >= 10  # the wait, shortened, kept
    with pytest.raises(Exception, match="has not entered journey 'trial'"):
        await client.call(api.TraceJourney(id="trial", identity="crm:x"))


async def test_a_new_version_published_with_move_waiting_takes_the_waiting_instances(
        shop: Any, fcm: Any, clock: trio.testing.MockClock) -> None:
    server, client = shop
    await client.call(api.PublishMessage(message=api.MessageSpec(
        id="better", channel="push", content=api.MessageContent(title="a better offer"))))
    for id in ("moved", "stays"):
        flow = {**FLOW, "id": id, "entry": {"event": f"{id}.start"}, "nodes": [
            {"type": "wait", "id": "wait", "duration": "3s", "next": "offer"},
            {"type": "push", "id": "offer", "message": "offer"}]}
        await client.call(api.PublishJourney(journey=msgspec.convert(flow, api.JourneySpec)))
    await person(client, "crm:m", "tok-m")
    await ingest(client, "crm:m", "moved.start")
    await ingest(client, "crm:m", "stays.start")
    await trio.sleep(0.5)  # both wait in version 1
    for id, move in (("moved", True), ("stays", False)):
        flow = {**FLOW, "id": id, "entry": {"event": f"{id}.start"}, "nodes": [
            {"type": "wait", "id": "wait", "duration": "3s", "next": "offer"},
            {"type": "push", "id": "offer", "message": "better"}]}
        await client.call(api.PublishJourney(journey=msgspec.convert(flow, api.JourneySpec), move_waiting=move))
    await trio.sleep(0.3)
    clock.jump(3)
    titles = {envelope["j"]: title for _, title, envelope in await pushed(fcm, 2)}
    assert titles == {"moved": "a better offer", "stays": "ana, 20% off".replace("ana", "m")}
    moved = await client.call(api.GetReport(journey="moved", node="offer"))
    assert moved.totals.get("delivered") == 1


def capped(id: str, most: int) -> api.JourneySpec:
    """A journey entered on ``<id>.start`` that pushes the offer, at most ``most`` a day."""
    return msgspec.convert({"id": id, "entry": {"event": f"{id}.start"}, "caps": [{"max": most, "per": "day"}],
                            "nodes": [{"type": "push", "id": "offer", "message": "offer", "next": "done"},
                                      {"type": "end", "id": "done"}]}, api.JourneySpec)


async def stalled(self: Journeys) -> None:
    """A journey engine cycle that does nothing: as a crash before the engine got to what was
    committed (monkeypatched over `Journeys._cycle`)."""
    return None


async def test_a_cap_counts_the_deliveries_of_messages_send_and_of_other_journeys(shop: Any, fcm: Any) -> None:
    server, client = shop
    await client.call(api.PublishJourney(journey=capped("capped", 2)))
    await person(client, "crm:c", "tok-c")
    await ingest(client, "crm:c", "app.installed")  # journey welcome: hello (1 delivered)
    await pushed(fcm, 1)
    sent = await client.call(api.SendMessage(id="hello", identities=["crm:c"]))  # messages.send: 2 delivered
    assert sent.delivered == 1
    await ingest(client, "crm:c", "capped.start")
    with trio.fail_after(10):
        while not (report := await client.call(api.GetReport(journey="capped", node="offer"))).totals.get("excluded"):
            await trio.sleep(0.05)
    assert report.reasons["excluded"] == {"FrequencyCapped": 1}
    assert (await client.call(api.GetReport(journey="capped", node="done"))).reasons["exited"] == {"end": 1}


async def test_a_cap_counts_the_deliveries_of_push_send_to_a_token_or_an_identity(shop: Any, fcm: Any) -> None:
    server, client = shop
    await client.call(api.PublishJourney(journey=capped("once", 1)))
    await person(client, "crm:tk", "tok-tk")
    await person(client, "crm:id", "tok-id")
    await person(client, "crm:free", "tok-free")
    content = api.PushContent(title="direct")
    by_token = await client.call(api.SendPush(app=APP, token="tok-tk", platform="fcm", content=content))
    by_identity = await client.call(api.SendPush(app=APP, identity="crm:id", content=content))
    assert [o.status for o in by_token.outcomes + by_identity.outcomes] == ["sent", "sent"]
    for identity in ("crm:tk", "crm:id", "crm:free"):
        await ingest(client, identity, "once.start")
    with trio.fail_after(10):
        while (await client.call(api.GetReport(journey="once", node="done"))).totals.get("exited") != 3:
            await trio.sleep(0.05)
    with trio.fail_after(10):  # the push staged in the exit's cycle, delivered a moment later
        while (offer := await client.call(api.GetReport(journey="once", node="offer"))).totals.get("delivered") != 1:
            await trio.sleep(0.05)
    assert offer.reasons["excluded"] == {"FrequencyCapped": 2}  # the profiles push.send delivered to
    accepted = await admin(fcm, "accepted")
    assert sorted((a["token"], a["message"]["notification"]["title"]) for a in accepted) == [
        ("tok-free", "free, 20% off"), ("tok-id", "direct"), ("tok-tk", "direct")]


async def test_two_entry_events_of_a_profile_in_one_cycle_enter_it_once(shop: Any, fcm: Any) -> None:
    """The engine takes the events of one cycle together: the second event of a profile must
    see the instance the first one made (not the stored instances only)."""
    server, client = shop
    await person(client, "crm:cy", "tok-cy")
    await client.call(api.IngestEvents(events=[api.Event(identity="crm:cy", type="app.installed")] * 3))
    await pushed(fcm, 1, timeout=5)
    await trio.sleep(0.5)
    assert len(await pushed(fcm, 1)) == 1
    report = await client.call(api.GetReport(journey="welcome", node="hello"))
    assert (report.totals["entered"], report.totals["targeted"]) == (1, 1)


async def test_events_acknowledged_before_the_engines_first_commit_are_taken_after_a_crash(
        tmp_path: Path, fcm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first start follows the log from its end: that position must be durable at once,
    or a crash before the engine's first commit makes the next start skip the events
    acknowledged meanwhile (it would take the log's end then as where to start)."""
    await reset(fcm)
    monkeypatch.setattr(Journeys, "_cycle", stalled)  # the engine does not get to the events before the "crash"
    for start in range(2):
        server = server_for(tmp_path / "data", fcm)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            async with open_client(server.addresses[0]) as client:
                if start == 0:
                    await setup(client, fcm)
                    await person(client, "crm:early", "tok-early")
                    await ingest(client, "crm:early", "app.installed")
                else:
                    [(token, title, _)] = await pushed(fcm, 1, timeout=5)
                    assert (token, title) == ("tok-early", "Hello early")
            server.request_stop()  # the engine commits nothing at a stop: as a kill
        monkeypatch.undo()


async def test_the_entry_condition_is_compiled_once_not_per_event(tmp_path: Path, fcm: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """An event entry's condition is tested on every event of its type whose profile is not in
    the journey: compiled each time (about 0.3 ms, on the event loop), a busy event log starved
    ingestion and delivery (the chaos bench acknowledged a third of the events it did without
    the journey)."""
    await admin(fcm, "set_project", "acme-push", [ACCOUNT.spec()])
    flow = {**FLOW, "entry": {"event": "app.installed", "condition": "profile.name != 'nobody'"}}
    compiled: list[str] = []
    server = server_for(tmp_path / "data", fcm)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        async with open_client(server.addresses[0]) as client:
            await setup(client, fcm, flow)
            await person(client, "crm:nobody", "tok-nobody")
            await ingest(client, "crm:nobody", "app.installed")  # the engine has the journey compiled
            with trio.fail_after(5):
                while server.journeys.position < server.journeys.log_end or not server.journeys.live_journeys:
                    await trio.sleep(0.02)
            for module in (machine, engine):
                real = machine.compile_condition
                monkeypatch.setattr(module, "compile_condition", lambda name, source, real=real: (
                    compiled.append(name), real(name, source))[1], raising=False)
            await client.call(api.IngestEvents(events=[api.Event(identity="crm:nobody", type="app.installed")] * 50))
            with trio.fail_after(5):
                while server.journeys.position < server.journeys.log_end:
                    await trio.sleep(0.02)
            assert server.journeys.entered == 0
        server.request_stop()
    assert compiled == []


async def test_a_stop_the_engine_did_not_finish_before_a_crash_ends_and_counts_everyone_after(
        tmp_path: Path, fcm: Any, monkeypatch: pytest.MonkeyPatch, clock: trio.testing.MockClock) -> None:
    """The instances a stop had not ended yet when the server died (the engine ends 500 a
    cycle) are ended after the restart by their next event or timer, with reason stopped,
    counted as exited, and send nothing more."""
    await reset(fcm)
    flow = {**FLOW, "nodes": [{**n, "duration": "4s"} if n["id"] == "wait" else n for n in FLOW["nodes"]]}
    monkeypatch.setattr(Journeys, "_stop_instances", lambda self, plans, now: 0)  # killed before it ran
    for start in range(2):
        server = server_for(tmp_path / "data", fcm, clock)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            async with open_client(server.addresses[0]) as client:
                if start == 0:
                    await setup(client, fcm, flow)
                    for n in range(3):
                        await person(client, f"crm:s{n}", f"tok-s{n}")
                        await ingest(client, f"crm:s{n}", "app.installed")
                    await pushed(fcm, 3, timeout=5)
                    await client.call(api.StopJourney(id="welcome"))
                    await trio.sleep(0.2)
                else:
                    await ingest(client, "crm:s0", "app.opened")  # its next event ends it
                    with trio.fail_after(2):
                        while not (await client.call(api.GetReport(journey="welcome"))).totals.get("exited"):
                            await trio.sleep(0.05)
                    clock.jump(4.5)  # the others' timers
                    await trio.sleep(0.5)
                    report = await client.call(api.GetReport(journey="welcome", node="wait"))
                    assert report.reasons.get("exited") == {"stopped": 3}
                    assert len(await pushed(fcm, 3)) == 3  # no offer
            server.request_stop()
        monkeypatch.undo()


class Holdout:
    """A rule plugin: the profiles in the holdout group get no offer."""

    @hookimpl
    def pigeon_exclude(self, attributes: dict[str, Any], message: api.MessageSpec) -> str | None:
        return "Holdout" if message.id == "offer" and attributes.get("holdout") else None


async def test_a_plugin_s_rule_excludes_a_journey_s_push_as_it_excludes_a_send_s(shop: Any, fcm: Any) -> None:
    server, client = shop
    server.plugins.pm.register(Holdout(), name="holdout")
    flow = {"id": "held", "entry": {"event": "held.start"},
            "nodes": [{"type": "push", "id": "offer", "message": "offer", "next": "hello"},
                      {"type": "push", "id": "hello", "message": "hello"}]}
    await client.call(api.PublishJourney(journey=msgspec.convert(flow, api.JourneySpec)))
    await person(client, "crm:h", "tok-h")
    await client.call(api.PatchProfile(identity="crm:h", patch={"holdout": True}))
    await ingest(client, "crm:h", "held.start")
    [(_, title, _)] = await pushed(fcm, 1, timeout=5)
    assert title == "Hello h"  # the offer excluded, the journey went on
    report = await client.call(api.GetReport(journey="held", node="offer"))
    assert (report.totals.get("excluded"), report.reasons.get("excluded")) == (1, {"Holdout": 1})


async def test_a_push_to_an_app_deleted_since_fails_at_its_node_and_the_journey_goes_on(shop: Any, fcm: Any) -> None:
    server, client = shop
    flow = {"id": "orphan", "entry": {"event": "orphan.start"},
            "nodes": [{"type": "push", "id": "offer", "message": "offer", "next": "mark"},
                      {"type": "update", "id": "mark", "patch": {"after": "offer"}}]}
    await client.call(api.PublishJourney(journey=msgspec.convert(flow, api.JourneySpec)))
    await person(client, "crm:o", "tok-o")
    await client.call(api.DeleteApp(app=APP))
    await ingest(client, "crm:o", "orphan.start")
    with trio.fail_after(10):
        while (await client.call(api.GetProfile(identity="crm:o"))).attributes.get("after") != "offer":
            await trio.sleep(0.05)
    with trio.fail_after(10):
        while not (report := await client.call(api.GetReport(journey="orphan", node="offer"))).totals.get("sent"):
            await trio.sleep(0.05)
    assert report.reasons["failed"] == {"CredentialsReplaced": 1}  # as messages.send's: "replaced or deleted"
    assert await admin(fcm, "accepted") == []


async def test_an_exclusion_reads_the_same_in_a_live_trace_and_a_simulated_one(shop: Any, fcm: Any) -> None:
    server, client = shop
    flow = {"id": "quiet", "test": True, "entry": {"event": "quiet.start"},
            "nodes": [{"type": "push", "id": "hello", "message": "hello", "next": "done"}, {"type": "end", "id": "done"}]}
    await client.call(api.PublishJourney(journey=msgspec.convert(flow, api.JourneySpec)))
    await client.call(api.UpsertProfile(identity="crm:q", attributes={"name": "q", "testProfile": True}))
    await client.call(api.RegisterToken(identity="crm:q", app=APP, platform="fcm", token="tok-q"))
    await client.call(api.SetConsent(identity="crm:q", app=APP, push="out"))
    await ingest(client, "crm:q", "quiet.start")
    with trio.fail_after(10):
        while (live := await trace(client, "quiet", "crm:q")) is None or live.outcome != "ended":
            await trio.sleep(0.05)
    simulated = await client.call(api.SimulateJourney(id="quiet", identity="crm:q", events=[
        api.SimulatedEvent(at=live.steps[0].at, type="quiet.start")]))
    assert [(s.kind, s.detail, s.excluded) for s in live.steps] == [
        (s.kind, s.detail, s.excluded) for s in simulated.steps]
    assert ("excluded", "no push (NoConsent)", "NoConsent") in [(s.kind, s.detail, s.excluded) for s in live.steps]
