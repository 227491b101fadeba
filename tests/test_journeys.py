"""Journey definitions through the real server: published whole or refused naming the node and
the field, versioned, listed, moved through their lifecycle, kept per sandbox and across a
restart; and from the CLI, from YAML files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from plugins.fcm.mock import ServiceAccount
from protocols import api
from protocols.errors import CallError, Status
from protocols.trio_client import Client, open_client
from server import Server

from .conftest import make_config

WELCOME = {
    "id": "welcome",
    "entry": {"event": "app.installed"},
    "quiet_hours": {"start": "22:00", "end": "08:00"},
    "caps": [{"max": 3, "per": "week"}],
    "exit": [{"event": "purchase"}],
    "nodes": [
        {"type": "push", "id": "hello", "message": "hello", "next": "wait"},
        {"type": "wait", "id": "wait", "duration": "1d", "next": "bought"},
        {"type": "condition", "id": "bought", "branches": [{"when": "profile.purchases > 0", "next": "done"}],
         "otherwise": "offer"},
        {"type": "push", "id": "offer", "message": "offer", "next": "react"},
        {"type": "reaction", "id": "react", "push": "offer", "timeout": "2d", "next": "done",
         "timeout_next": "reminder"},
        {"type": "push", "id": "reminder", "message": "offer", "next": "done"},
        {"type": "end", "id": "done"},
    ],
}


def journey(**changes: Any) -> api.JourneySpec:
    return msgspec.convert({**WELCOME, **changes}, api.JourneySpec)


ACCOUNT = ServiceAccount.generate("acme-push")


async def publish_messages(client: Client) -> None:
    await client.call(api.RegisterAndroidApp(app="com.acme.shop", service_account=ACCOUNT.info("")))
    await client.call(api.PublishConfig(config=api.ChannelConfig(name="push", apps=["com.acme.shop"])))
    for name in ("hello", "offer"):
        await client.call(api.PublishMessage(message=api.MessageSpec(
            id=name, channel="push", content=api.MessageContent(title=f"{name} {{{{ profile.name }}}}"))))


async def refused(client: Client, request: api.Request[Any]) -> CallError:
    with pytest.raises(CallError) as caught:
        await client.call(request)
    return caught.value


async def test_a_journey_is_published_with_its_message_versions_pinned_then_versioned(client: Client) -> None:
    await publish_messages(client)
    first = await client.call(api.PublishJourney(journey=journey()))
    assert (first.version, first.state, first.live_version) == (1, "live", 1)
    pushes = [n for n in first.journey.nodes if isinstance(n, api.PushNode)]
    assert [(n.id, n.version) for n in pushes] == [("hello", 1), ("offer", 1), ("reminder", 1)]
    # A new version of a message does not change the published journey...
    await client.call(api.PublishMessage(message=api.MessageSpec(
        id="offer", channel="push", content=api.MessageContent(title="20% off"))))
    got = await client.call(api.GetJourney(id="welcome"))
    assert [n.version for n in got.journey.nodes if isinstance(n, api.PushNode)] == [1, 1, 1]
    # ...a new version of the journey takes it; a draft is stored, not entered.
    draft = await client.call(api.PublishJourney(journey=journey(description="next"), draft=True))
    assert (draft.version, draft.state, draft.live_version) == (2, "live", 1)
    assert [n.version for n in draft.journey.nodes if isinstance(n, api.PushNode)] == [1, 2, 2]
    assert (await client.call(api.GetJourney(id="welcome", version=1))).journey.description == ""
    listed = (await client.call(api.ListJourneys())).journeys
    assert [(j.journey.id, j.version, j.live_version) for j in listed] == [("welcome", 2, 1)]
    assert (await refused(client, api.GetJourney(id="welcome", version=9))).status is Status.NOT_FOUND
    assert (await refused(client, api.GetJourney(id="nope"))).status is Status.NOT_FOUND
    mixed = await refused(client, api.PublishJourney(journey=journey(), draft=True, move_waiting=True))
    assert (mixed.status, mixed.field) == (Status.INVALID_ARGUMENT, "$.move_waiting")


async def test_the_lifecycle_moves_only_where_it_may(client: Client) -> None:
    await publish_messages(client)
    draft = await client.call(api.PublishJourney(journey=journey(), draft=True))
    assert (draft.state, draft.live_version) == ("draft", None)
    denied = await refused(client, api.PauseJourney(id="welcome"))
    assert denied.status is Status.FAILED_PRECONDITION
    assert denied.message == "journey 'welcome' is draft: it cannot be paused (only a journey that is live)"
    assert (await client.call(api.PublishJourney(journey=journey()))).state == "live"
    assert (await client.call(api.PauseJourney(id="welcome"))).state == "paused"
    assert (await client.call(api.PublishJourney(journey=journey()))).state == "paused"  # stays paused
    assert (await client.call(api.ResumeJourney(id="welcome"))).state == "live"
    assert (await client.call(api.CloseJourney(id="welcome"))).state == "closed"
    assert (await refused(client, api.ResumeJourney(id="welcome"))).status is Status.FAILED_PRECONDITION
    assert (await client.call(api.StopJourney(id="welcome"))).state == "stopped"
    assert (await refused(client, api.CloseJourney(id="welcome"))).status is Status.FAILED_PRECONDITION
    assert (await client.call(api.PublishJourney(journey=journey()))).state == "live"  # live again
    assert (await refused(client, api.StopJourney(id="other"))).status is Status.NOT_FOUND


@pytest.mark.parametrize(("change", "field", "words"), [
    (lambda j: j["nodes"][0].update(next="nowhere"), "$.journey.nodes[0].next",
     "node 'hello' goes to 'nowhere', which no node is"),
    (lambda j: j["nodes"].append({"type": "end", "id": "orphan"}), "$.journey.nodes[7]",
     "node 'orphan' cannot be reached from the first node ('hello')"),
    (lambda j: j["nodes"][2]["branches"][0].update(next="bought"), "$.journey.nodes[2]",
     "a loop with no wait or reaction in it, which an instance would go round for ever: bought -> bought"),
    (lambda j: j["nodes"][2]["branches"][0].update(when="profile.purchases >"), "$.journey.nodes[2].branches[0].when",
     "$.journey.nodes[2].branches[0].when: "),
    (lambda j: j["nodes"][0].update(message="gone"), "$.journey.nodes[0].message",
     "node 'hello' pushes message 'gone', which is not published"),
    (lambda j: j["nodes"][0].update(version=7), "$.journey.nodes[0].message",
     "node 'hello' pushes version 7 of message 'hello', which is not published"),
    (lambda j: j["nodes"][4].update(push="bought"), "$.journey.nodes[4].push",
     "reaction 'react' reacts to 'bought', which is not a push node of this journey"),
    (lambda j: j["nodes"][1].update(time="09:00"), "$.journey.nodes[1]",
     "wait 'wait': give exactly one of duration, until and time"),
    (lambda j: j["nodes"][1].update(duration="91d"), "$.journey.nodes[1].duration", "at most 90 days"),
    (lambda j: j.update(timezone="Mars/Olympus"), "$.journey.timezone", "'Mars/Olympus' is not a time zone"),
    (lambda j: j.update(entry={"event": "x", "read": True}), "$.journey.entry", "give exactly one way in"),
    (lambda j: j["nodes"][1].update(id="hello"), "$.journey.nodes[1].id",
     "node 'hello' is already the id of nodes[0]"),
    (lambda j: j["nodes"].insert(2, {"type": "split", "id": "ab", "paths": [{"percent": 50, "next": "bought"},
                                                                               {"percent": 40, "next": "done"}]})
     or j["nodes"][1].update(next="ab"), "$.journey.nodes[2].paths", "the percentages add up to 90, not 100"),
    (lambda j: j["nodes"].insert(5, {"type": "update", "id": "mark", "patch": {"seen": "{{ profile.x"},
                                     "next": "done"}) or j["nodes"][6].update(next="mark"),
     "$.journey.nodes[5].patch.seen", "$.journey.nodes[5].patch.seen: "),
])
async def test_a_journey_that_cannot_run_is_refused_naming_the_node_and_field(client: Client, change: Any, field: str,
                                                                               words: str) -> None:
    await publish_messages(client)
    document = msgspec.to_builtins(journey())
    change(document)
    error = await refused(client, api.PublishJourney(journey=msgspec.convert(document, api.JourneySpec)))
    assert error.status in (Status.INVALID_ARGUMENT, Status.NOT_FOUND)
    assert (error.field, words in error.message) == (field, True), error.message
    assert (await client.call(api.ListJourneys())).journeys == []  # nothing stored


async def test_journeys_are_kept_per_sandbox_and_across_a_restart(tmp_path: Path) -> None:
    for start in range(2):
        server = Server(make_config(tmp_path / "data"))
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            async with open_client(server.addresses[0]) as default:
                if start == 0:
                    await default.call(api.CreateSandbox(name="dev"))
                    async with open_client(server.addresses[0], sandbox="dev") as dev:
                        await publish_messages(dev)
                        await dev.call(api.PublishJourney(journey=journey()))
                    # default has no message "hello": the same file is refused there
                    assert (await refused(default, api.PublishJourney(journey=journey()))).status is Status.NOT_FOUND
                assert (await default.call(api.ListJourneys())).journeys == []
                assert (await refused(default, api.GetJourney(id="welcome"))).status is Status.NOT_FOUND
            async with open_client(server.addresses[0], sandbox="dev") as dev:
                assert [j.journey.id for j in (await dev.call(api.ListJourneys())).journeys] == ["welcome"]
            server.request_stop()


def test_journeys_from_the_cli(server_process: Any, tmp_path: Path) -> None:
    def pigeon(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "server.cli", *args, "--server", server_process.address],
                              capture_output=True, text=True, timeout=60)

    (tmp_path / "push.yaml").write_text("name: push\napps: [com.acme.shop]\n")
    (tmp_path / "sa.json").write_bytes(msgspec.json.encode(ACCOUNT.info("")))
    r = pigeon("apps", "register-android", "com.acme.shop", "--service-account", str(tmp_path / "sa.json"))
    assert r.returncode == 0, r.stderr
    for name in ("hello", "offer"):
        (tmp_path / f"{name}.yaml").write_text(f"id: {name}\nchannel: push\ncontent:\n  title: Hi\n")
    assert pigeon("configs", "publish", str(tmp_path / "push.yaml")).returncode == 0
    assert pigeon("messages", "publish", str(tmp_path / "hello.yaml"), str(tmp_path / "offer.yaml")).returncode == 0
    import yaml

    good = tmp_path / "welcome.yaml"
    good.write_text(yaml.safe_dump(WELCOME))
    r = pigeon("journeys", "publish", str(good))
    assert r.returncode == 0 and "journey welcome v1" in r.stdout and "live; entered on event app.installed" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**WELCOME, "nodes": [*WELCOME["nodes"][:1], {"type": "wiat", "id": "w"}]}))
    r = pigeon("journeys", "publish", str(bad))
    assert r.returncode == 2 and f"{bad}: $.nodes[1].type: Invalid value 'wiat' (node 'w')" in r.stderr, r.stderr
    loop = tmp_path / "loop.yaml"
    loop.write_text(yaml.safe_dump({**WELCOME, "nodes": [{"type": "push", "id": "a", "message": "hello", "next": "a"}]}))
    r = pigeon("journeys", "publish", str(loop))
    assert r.returncode == 2 and f"{loop}: $.journey.nodes[0]: these nodes make a loop" in r.stderr, r.stderr
    r = pigeon("journeys", "pause", "welcome")
    assert r.returncode == 0 and ": paused;" in r.stdout
    r = pigeon("journeys", "list")
    assert "journey welcome v1" in r.stdout and "paused" in r.stdout
    r = pigeon("journeys", "get", "welcome", "--json")
    assert r.returncode == 0 and msgspec.json.decode(r.stdout)["journey"]["nodes"][0]["version"] == 1
