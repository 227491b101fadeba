"""The journey simulator (``journeys.simulate``) through the real server: the engine's state
machine on a virtual clock, for every activity and property it has: waits, quiet hours in two
time zones (queue and discard), caps, a reaction with and without an open, exit criteria
interrupting a wait, splits, updates, conditions that fail for one profile, consent and
missing values; and from the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from plugins.fcm.mock import ServiceAccount
from protocols import api
from protocols.errors import CallError, Status
from protocols.trio_client import Client
from server import Server, hookimpl

ACCOUNT = ServiceAccount.generate("acme-push")
APP = "com.acme.shop"
TOKEN = [{"app": APP, "platform": "fcm", "token": "tok-1"}]
INSTALLED = "2026-12-08T13:00:00Z"  # 22:00 in Tokyo, 08:00 in New York
WELCOME: dict[str, Any] = {
    "id": "welcome",
    "entry": {"event": "app.installed"},
    "exit": [{"event": "purchase"}],
    "nodes": [
        {"type": "push", "id": "hello", "message": "hello", "next": "wait"},
        {"type": "wait", "id": "wait", "duration": "1d", "next": "bought"},
        {"type": "condition", "id": "bought", "branches": [{"when": "profile.purchases > 0", "next": "done"}],
         "otherwise": "offer"},
        {"type": "push", "id": "offer", "message": "offer", "next": "react"},
        {"type": "reaction", "id": "react", "push": "offer", "timeout": "2d", "next": "thanks",
         "timeout_next": "done"},
        {"type": "update", "id": "thanks", "patch": {"engaged": "yes"}, "next": "done"},
        {"type": "end", "id": "done"},
    ],
}


@pytest.fixture
async def shop(client: Client) -> Client:
    await client.call(api.RegisterAndroidApp(app=APP, service_account=ACCOUNT.info("")))
    await client.call(api.PublishConfig(config=api.ChannelConfig(name="push", apps=[APP], consent="not_opted_out")))
    for name, title in (("hello", "Hello {{ profile.name }}"), ("offer", "{{ profile.name }}, 20% off")):
        await client.call(api.PublishMessage(message=api.MessageSpec(
            id=name, channel="push", content=api.MessageContent(title=title), on_missing="exclude")))
    return client


def journey(**changes: Any) -> api.JourneySpec:
    return msgspec.convert({**WELCOME, **changes}, api.JourneySpec)


def event(at: str, type: str, **data: Any) -> api.SimulatedEvent:
    return msgspec.convert({"at": at, "type": type, "data": data}, api.SimulatedEvent)


async def simulate(client: Client, spec: api.JourneySpec, profile: dict[str, Any], *events: api.SimulatedEvent,
                   **options: Any) -> api.Simulation:
    return await client.call(api.SimulateJourney(journey=spec, profile=profile, events=list(events), **options))


def trace(sim: api.Simulation) -> list[tuple[str, str, str, str]]:
    return [(s.at.isoformat()[:16], s.node, s.kind, s.excluded or "") for s in sim.steps]


async def test_a_profile_that_does_not_open_gets_the_offer_then_times_out(shop: Client) -> None:
    sim = await simulate(shop, journey(), {"name": "Ana", "timezone": "UTC", "registrations": TOKEN},
                         event(INSTALLED, "app.installed"))
    assert trace(sim) == [
        ("2026-12-08T13:00", "hello", "enter", ""), ("2026-12-08T13:00", "hello", "push", ""),
        ("2026-12-08T13:00", "wait", "wait", ""), ("2026-12-09T13:00", "wait", "wait", ""),
        ("2026-12-09T13:00", "bought", "branch", ""), ("2026-12-09T13:00", "offer", "push", ""),
        ("2026-12-09T13:00", "react", "wait", ""), ("2026-12-11T13:00", "react", "timeout", ""),
        ("2026-12-11T13:00", "done", "end", ""),
    ]
    assert (sim.outcome, sim.node, sim.reason) == ("ended", "done", "end")
    assert sim.steps[4].detail == "otherwise"
    # Each push is what the provider would get, rendered for this profile, with its envelope.
    offer = sim.steps[5].pushes[0]
    assert (offer.app, offer.platform, offer.token, offer.error) == (APP, "fcm", "tok-1", None)
    message = offer.payload  # the FCM message; its target is the token beside it
    assert message["notification"]["title"] == "Ana, 20% off" and message["android"]["priority"] == "HIGH"
    envelope = json.loads(message["data"]["_p"])
    assert (envelope["m"], envelope["j"], envelope["n"]) == ("offer", "welcome", "offer")


async def test_an_open_of_the_offer_takes_the_reaction_branch_and_updates_the_profile(shop: Client) -> None:
    opened = event("2026-12-10T09:00:00Z", "pushTracking.applicationOpened", _p={"x": "sim-offer", "m": "offer"})
    other = event("2026-12-09T20:00:00Z", "pushTracking.applicationOpened", _p={"x": "sim-hello", "m": "hello"})
    sim = await simulate(shop, journey(), {"name": "Ana", "registrations": TOKEN}, event(INSTALLED, "app.installed"),
                         other, opened)
    assert trace(sim)[-4:] == [("2026-12-09T13:00", "react", "wait", ""), ("2026-12-10T09:00", "react", "reaction", ""),
                               ("2026-12-10T09:00", "thanks", "update", ""), ("2026-12-10T09:00", "done", "end", "")]
    # the open of the first push (before the reaction waited) did not count


async def test_an_exit_event_interrupts_a_wait_at_once(shop: Client) -> None:
    sim = await simulate(shop, journey(), {"name": "Ana", "registrations": TOKEN}, event(INSTALLED, "app.installed"),
                         event("2026-12-08T18:30:00Z", "purchase"))
    assert trace(sim)[-1] == ("2026-12-08T18:30", "wait", "exit", "")
    assert (sim.outcome, sim.reason) == ("ended", "exit")
    assert sim.steps[-1].detail == "exit[0]: purchase"


@pytest.mark.parametrize(("zone", "action", "expected"), [
    ("Asia/Tokyo", "queue", [("2026-12-08T13:00", "hello", "wait", ""), ("2026-12-08T23:00", "hello", "push", "")]),
    ("America/New_York", "queue", [("2026-12-08T13:00", "hello", "push", "")]),
    ("Asia/Tokyo", "discard", [("2026-12-08T13:00", "hello", "excluded", "QuietHours"),
                               ("2026-12-08T13:00", "hello", "exit", "")]),
])
async def test_quiet_hours_are_the_recipient_s_local_time(shop: Client, zone: str, action: str, expected: list) -> None:
    spec = journey(quiet_hours={"start": "22:00", "end": "08:00", "action": action})
    sim = await simulate(shop, spec, {"name": "Ana", "timezone": zone, "registrations": TOKEN},
                         event(INSTALLED, "app.installed"), until="2026-12-08T23:30:00Z")
    assert trace(sim)[1:1 + len(expected)] == expected
    if action == "discard":
        assert (sim.outcome, sim.reason) == ("ended", "quiet_hours")


async def test_a_cap_excludes_the_push_beyond_it_and_the_instance_goes_on(shop: Client) -> None:
    spec = journey(caps=[{"max": 1, "per": "week"}])
    sim = await simulate(shop, spec, {"name": "Ana", "registrations": TOKEN}, event(INSTALLED, "app.installed"))
    assert [(s.node, s.kind, s.excluded) for s in sim.steps if s.node in ("hello", "offer")] == [
        ("hello", "enter", None), ("hello", "push", None), ("offer", "excluded", "FrequencyCapped")]
    assert sim.reason == "end"


class Holdout:
    """A rule plugin: the profiles in the holdout group get no offer."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], str, int, str, dict[str, Any]]] = []

    @hookimpl
    def pigeon_exclude(self, identity: str, attributes: dict[str, Any], message: api.MessageSpec, version: int,
                       config: api.ChannelConfig, event: dict[str, Any]) -> str | None:
        self.calls.append((identity, dict(attributes), message.id, version, config.name, event))
        return "Holdout" if message.id == "offer" and attributes.get("holdout") else None


async def test_a_plugin_s_rule_excludes_a_push_with_its_reason_as_a_live_send(server: Server, shop: Client) -> None:
    holdout = Holdout()
    server.plugins.pm.register(holdout, name="holdout")
    try:
        sim = await simulate(shop, journey(), {"identities": ["crm:h"], "name": "Ana", "holdout": True,
                                               "registrations": TOKEN}, event(INSTALLED, "app.installed", src="ad"))
        let_through = await simulate(shop, journey(), {"name": "Bo", "registrations": TOKEN},
                                     event(INSTALLED, "app.installed"))
    finally:
        server.plugins.pm.unregister(holdout)
    assert [(s.node, s.kind, s.excluded) for s in sim.steps if s.node in ("hello", "offer")] == [
        ("hello", "enter", None), ("hello", "push", None), ("offer", "excluded", "Holdout")]
    assert [s.detail for s in sim.steps if s.kind == "excluded"] == ["excluded by a plugin's rule (Holdout)"]
    attributes = {"name": "Ana", "holdout": True}
    assert holdout.calls[:2] == [("crm:h", attributes, "hello", 1, "push", {"src": "ad"}),
                                 ("crm:h", attributes, "offer", 1, "push", {"src": "ad"})]
    assert [s.kind for s in let_through.steps if s.node == "offer"] == ["push"]


async def test_exclusions_for_consent_and_a_missing_value_are_named(shop: Client) -> None:
    no_consent = await simulate(shop, journey(), {"name": "Ana", "registrations": TOKEN, "consent": {APP: "out"}},
                                event(INSTALLED, "app.installed"))
    assert trace(no_consent)[1] == ("2026-12-08T13:00", "hello", "excluded", "NoConsent")
    no_name = await simulate(shop, journey(), {"registrations": TOKEN}, event(INSTALLED, "app.installed"))
    assert trace(no_name)[1] == ("2026-12-08T13:00", "hello", "excluded", "MissingValue")
    assert no_name.steps[1].detail == "$.content.title: 'dict object' has no attribute 'name'"


async def test_a_condition_that_fails_for_one_profile_takes_it_out_with_a_reason(shop: Client) -> None:
    spec = journey(nodes=[{"type": "condition", "id": "c", "branches": [{"when": "profile.n // 0 > 1", "next": "e"}]},
                          {"type": "end", "id": "e"}])
    sim = await simulate(shop, spec, {"n": 4}, event(INSTALLED, "app.installed"))
    assert (sim.outcome, sim.reason) == ("ended", "error")
    ok = await simulate(shop, spec, {"m": 4}, event(INSTALLED, "app.installed"))  # missing: false, the other way
    assert (ok.outcome, ok.reason) == ("ended", "no_branch")


async def test_a_split_is_the_same_for_a_profile_every_time_and_spreads_profiles(shop: Client) -> None:
    spec = journey(nodes=[{"type": "split", "id": "ab", "paths": [{"percent": 50, "next": "a"},
                                                                   {"percent": 50, "next": "b"}]},
                          {"type": "end", "id": "a"}, {"type": "end", "id": "b"}])
    ends = []
    for n in range(40):
        runs = [await simulate(shop, spec, {"identities": [f"crm:{n}"]}, event(INSTALLED, "app.installed"))
                for _ in range(2)]
        assert runs[0].node == runs[1].node
        ends.append(runs[0].node)
    assert 8 <= ends.count("a") <= 32


async def test_a_wait_until_a_local_time_on_given_days(shop: Client) -> None:
    spec = journey(nodes=[{"type": "wait", "id": "w", "time": "09:30", "days": ["mon"], "next": "e"},
                          {"type": "end", "id": "e"}])
    # 2026-12-08 is a Tuesday: the next Monday 09:30 in Paris is 2026-12-14 08:30 UTC
    sim = await simulate(shop, spec, {"timezone": "Europe/Paris"}, event(INSTALLED, "app.installed"))
    assert trace(sim)[-2:] == [("2026-12-14T08:30", "w", "wait", ""), ("2026-12-14T08:30", "e", "end", "")]


async def test_test_mode_shortens_waits_and_a_profile_that_never_enters_is_told(shop: Client) -> None:
    sim = await simulate(shop, journey(test=True), {"name": "Ana", "registrations": TOKEN},
                         event(INSTALLED, "app.installed"))
    assert trace(sim)[3][0] == "2026-12-08T13:00" and sim.steps[3].at.second == 10  # 1d became 10 s
    never = await simulate(shop, journey(), {"name": "Ana"}, event(INSTALLED, "app.opened"))
    assert (never.outcome, never.reason) == ("not_entered", "no event app.installed (that the entry's condition "
                                                            "accepts) among the events")


async def test_a_published_journey_or_a_stored_profile_is_simulated_and_bad_input_named(shop: Client) -> None:
    await shop.call(api.PublishJourney(journey=journey()))
    await shop.call(api.UpsertProfile(identity="crm:9", attributes={"name": "Bo", "purchases": 2}))
    await shop.call(api.RegisterToken(identity="crm:9", app=APP, platform="fcm", token="tok-9"))
    sim = await shop.call(api.SimulateJourney(id="welcome", identity="crm:9", events=[event(INSTALLED, "app.installed")]))
    assert (sim.version, sim.reason, sim.steps[-2].detail) == (1, "end", "branches[0]: profile.purchases > 0")
    assert (await shop.call(api.GetProfile(identity="crm:9"))).attributes == {"name": "Bo", "purchases": 2}
    for request, field in (
        (api.SimulateJourney(id="welcome", profile={}, identity="crm:9"), "$.identity"),
        (api.SimulateJourney(profile={}), "$.journey"),
        (api.SimulateJourney(id="welcome", profile={"registrations": [{"app": APP}]}), "$.profile"),
        (api.SimulateJourney(journey=journey(timezone="Nowhere"), profile={}), "$.journey.timezone"),
    ):
        with pytest.raises(CallError) as refused:
            await shop.call(request)
        assert (refused.value.status, refused.value.field) == (Status.INVALID_ARGUMENT, field), refused.value.message


def test_simulate_from_the_cli(server_process: Any, tmp_path: Path) -> None:
    def pigeon(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "server.cli", *args, "--server", server_process.address],
                              capture_output=True, text=True, timeout=60)

    (tmp_path / "sa.json").write_bytes(msgspec.json.encode(ACCOUNT.info("")))
    assert pigeon("apps", "register-android", APP, "--service-account", str(tmp_path / "sa.json")).returncode == 0
    (tmp_path / "push.yaml").write_text(f"name: push\napps: [{APP}]\n")
    assert pigeon("configs", "publish", str(tmp_path / "push.yaml")).returncode == 0
    for name in ("hello", "offer"):
        (tmp_path / f"{name}.yaml").write_text(f"id: {name}\nchannel: push\ncontent:\n  title: Hi {{{{ profile.name }}}}\n")
        assert pigeon("messages", "publish", str(tmp_path / f"{name}.yaml")).returncode == 0
    (tmp_path / "welcome.json").write_text(json.dumps(WELCOME))
    (tmp_path / "events.jsonl").write_text(json.dumps({"at": INSTALLED, "type": "app.installed"}) + "\n")
    r = pigeon("journeys", "simulate", str(tmp_path / "welcome.json"), "--events", str(tmp_path / "events.jsonl"),
               "--profile", json.dumps({"name": "Ana", "registrations": TOKEN}))
    assert r.returncode == 0, r.stderr
    assert "hello            push      hello v1" in r.stdout and '"title":"Hi Ana"' in r.stdout
    assert r.stdout.rstrip().endswith("ended at done: end")


async def test_an_audience_entry_is_simulated_as_the_profile_qualifying_at_the_start(shop: Client) -> None:
    loyal = journey(id="loyal", entry={"audience": "events.purchase.count >= 2 and profile.name"})
    bought = [event("2026-12-08T10:00:00Z", "purchase"), event("2026-12-08T11:00:00Z", "purchase")]
    sim = await simulate(shop, loyal, {"name": "Ana", "registrations": TOKEN}, *bought, start="2026-12-08T12:00:00Z")
    assert trace(sim)[:2] == [("2026-12-08T12:00", "hello", "enter", ""), ("2026-12-08T12:00", "hello", "push", "")]
    once = await simulate(shop, loyal, {"name": "Ana"}, *bought[:1], start="2026-12-08T12:00:00Z")
    assert (once.outcome, once.reason) == ("not_entered", "the profile does not match the audience")
    lapsed = journey(id="lapsed", entry={"audience": "profile.tier == 'gold'", "on": "exit"})
    gold = await simulate(shop, lapsed, {"name": "Ana", "tier": "gold"})
    assert (gold.outcome, gold.reason) == ("not_entered", "the profile matches the audience")
    assert (await simulate(shop, lapsed, {"name": "Ana"})).outcome != "not_entered"
