"""The live journey engine through the real server, the real LMDB and the mock FCM over TLS and
HTTP/2: an event enters a profile, its pushes reach the provider, waits wake on their timers,
an open of a push moves a reaction, an exit event interrupts a wait, a stop ends everyone, a
restart resumes the waits (a timer due while the server was down fires once), and the pushes
are counted under the journey and node."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from plugins.fcm.mock import MockFcmProcess, ServiceAccount
from protocols import api
from protocols.trio_client import Client, open_client
from server import Server
from server.journeys import engine, machine
from server.journeys.engine import Journeys

from .conftest import make_config

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


@pytest.fixture(scope="module")
def fcm(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with MockFcmProcess(tmp_path_factory.mktemp("fcm")) as mock:
        yield mock


async def admin(mock: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    return await trio.to_thread.run_sync(functools.partial(getattr(mock.admin, name), *args, **kwargs))


def server_for(data: Path, fcm: Any) -> Server:
    return Server(make_config(data, fcm={"url": fcm.url, "token_uri": fcm.token_uri, "ca_file": str(fcm.ca_file),
                                         "retry_min_s": 0.05}))


@pytest.fixture
async def shop(tmp_path: Path, fcm: Any) -> AsyncIterator[tuple[Server, Client]]:
    await admin(fcm, "set_project", "acme-push", [ACCOUNT.spec()])
    await admin(fcm, "clear_accepted")
    await admin(fcm, "set_faults", accept_any_token=True)
    server = server_for(tmp_path / "data", fcm)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        async with open_client(server.addresses[0]) as client:
            await setup(client, fcm)
            yield server, client
        server.request_stop()


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


async def ingest(client: Client, identity: str, type: str, **data: Any) -> None:
    await client.call(api.IngestEvents(events=[api.Event(identity=identity, type=type, data=data)]))


async def test_an_install_gets_hello_then_the_offer_and_an_open_of_it_moves_the_reaction(shop: Any, fcm: Any) -> None:
    server, client = shop
    await person(client, "crm:ana", "tok-ana")
    await ingest(client, "crm:ana", "app.installed")
    [(token, title, envelope)] = await pushed(fcm, 1, timeout=5)
    assert (token, title, envelope["j"], envelope["n"]) == ("tok-ana", "Hello ana", "welcome", "hello")
    offer = (await pushed(fcm, 2))[1]  # after the 2 s wait
    assert offer[1] == "ana, 20% off" and offer[2]["n"] == "offer"
    await ingest(client, "crm:ana", "pushTracking.applicationOpened", _p=offer[2])
    with trio.fail_after(10):
        while (await client.call(api.GetProfile(identity="crm:ana"))).attributes.get("engaged") != "yes":
            await trio.sleep(0.05)
    report = await client.call(api.GetReport(journey="welcome"))
    assert report.totals.get("delivered") == 2 and report.totals.get("opened") == 1
    assert (report.totals["entered"], report.totals["exited"], report.reasons["exited"]) == (1, 1, {"end": 1})
    assert (await client.call(api.GetReport(journey="welcome", node="hello"))).totals["entered"] == 1
    assert (await client.call(api.GetReport(journey="welcome", node="offer"))).totals.get("delivered") == 1


async def test_an_exit_event_interrupts_the_wait_and_no_offer_is_sent(shop: Any, fcm: Any) -> None:
    server, client = shop
    await person(client, "crm:bo", "tok-bo")
    await ingest(client, "crm:bo", "app.installed")
    await pushed(fcm, 1, timeout=5)
    await ingest(client, "crm:bo", "purchase")
    await trio.sleep(3.5)  # past the wait
    assert (await client.call(api.GetReport(journey="welcome", node="wait"))).reasons["exited"] == {"exit": 1}
    assert [t for t, _, _ in await pushed(fcm, 1)] == ["tok-bo"]
    # one instance per profile and journey: installing again does not enter again
    await ingest(client, "crm:bo", "app.installed")
    await trio.sleep(0.5)
    assert len(await pushed(fcm, 1)) == 1


async def test_a_stop_ends_every_instance(shop: Any, fcm: Any) -> None:
    server, client = shop
    for n in range(5):
        await person(client, f"crm:p{n}", f"tok-{n}")
        await ingest(client, f"crm:p{n}", "app.installed")
    await pushed(fcm, 5, timeout=5)
    await client.call(api.StopJourney(id="welcome"))
    await trio.sleep(3.5)
    report = await client.call(api.GetReport(journey="welcome", node="wait"))
    assert report.reasons["exited"] == {"stopped": 5}
    assert len(await pushed(fcm, 5)) == 5  # no offer: they were all stopped in their wait
    await ingest(client, "crm:p0", "app.installed")  # a stopped journey takes no one
    await trio.sleep(0.5)
    assert len(await pushed(fcm, 5)) == 5


async def test_a_restart_resumes_the_waits_and_a_timer_due_meanwhile_fires_once(tmp_path: Path, fcm: Any) -> None:
    await admin(fcm, "set_project", "acme-push", [ACCOUNT.spec()])
    await admin(fcm, "clear_accepted")
    await admin(fcm, "set_faults", accept_any_token=True)
    for start in range(2):
        server = server_for(tmp_path / "data", fcm)
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
                    await trio.sleep(1)
                    assert sorted(t for t, title, _ in await pushed(fcm, 6) if "off" in title) == [
                        "tok-r0", "tok-r1", "tok-r2"]
                    assert len(offers) == 6
            server.request_stop()
        if start == 0:
            await trio.sleep(2.5)  # the waits fall due while the server is down


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
    await admin(fcm, "set_project", "acme-push", [ACCOUNT.spec()])
    await admin(fcm, "clear_accepted")
    await admin(fcm, "set_faults", accept_any_token=True)

    async def stuck(self: Journeys) -> None:
        return None  # the engine does not get to the events before the "crash"

    monkeypatch.setattr(Journeys, "_cycle", stuck)
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
        tmp_path: Path, fcm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The instances a stop had not ended yet when the server died (the engine ends 500 a
    cycle) are ended after the restart by their next event or timer, with reason stopped,
    counted as exited, and send nothing more."""
    await admin(fcm, "set_project", "acme-push", [ACCOUNT.spec()])
    await admin(fcm, "clear_accepted")
    await admin(fcm, "set_faults", accept_any_token=True)
    flow = {**FLOW, "nodes": [{**n, "duration": "4s"} if n["id"] == "wait" else n for n in FLOW["nodes"]]}
    monkeypatch.setattr(Journeys, "_stop_instances", lambda self, plans, now: 0)  # killed before it ran
    for start in range(2):
        server = server_for(tmp_path / "data", fcm)
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
                    await trio.sleep(4.5)  # the others' timers
                    report = await client.call(api.GetReport(journey="welcome", node="wait"))
                    assert report.reasons.get("exited") == {"stopped": 3}
                    assert len(await pushed(fcm, 3)) == 3  # no offer
            server.request_stop()
        monkeypatch.undo()
