"""``pigeon demo``: the whole flow in one command, on the embedded default.

It starts the mock APNs and the mock FCM (in child processes, with their own CAs), a Pigeon
server in this process on a fresh data folder pointed at them, and then, as a client would:
registers an app's iOS and Android credentials, publishes a channel configuration and a
personalized message, creates profiles with push tokens (some of them stale: the mocks do not
know them or know them as unregistered; one profile in eleven opted out), sends the message,
reports interactions for some of the notifications (opens and a button action, as the app's
SDK would), and prints the report; then runs a journey (a sign-up event, a welcome push, a
reaction to its open, a reminder to the others) and prints its report node by node. The folder must be new or empty: a second demo in the same
folder would add its counts to the first one's report.
"""

from __future__ import annotations

import json
import random
import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from protocols import api
from protocols.trio_client import Client, open_client

from server.cli.inputs import UsageError
from server.cli.output import show_journey_report, show_preview, show_report, show_send
from server.runtime.config import Config, load_config
from server.runtime.masterkey import Keyring, default_path, new_key

if TYPE_CHECKING:
    from plugins.apns.mock import MockApnsProcess, SigningKey
    from plugins.fcm.mock import MockFcmProcess, ServiceAccount

__all__ = ["run_demo"]

APP = "com.example.pigeon-demo"
NAMES = ["Ana", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu"]
MESSAGE = "welcome-back"
JOURNEY = "onboarding"

#: Where the demo prints (``print``, or a test's collector).
Out = Callable[[str], Any]


@dataclass(frozen=True)
class _Person:
    """A profile the demo creates, with its one device."""

    identity: str
    name: str
    platform: api.Platform
    token: str
    opted_out: bool


@dataclass
class _Devices:
    """The tokens the mocks know: APNs answers BadDeviceToken for one it does not know; FCM
    knows some of its tokens as unregistered."""

    apns: dict[str, list[str]] = field(default_factory=dict)  # token -> its apps
    fcm: dict[str, dict[str, bool]] = field(default_factory=dict)  # token -> {"unregistered": ...}

    def stale(self, token: str) -> bool:
        return token not in self.apns and self.fcm.get(token, {"unregistered": True})["unregistered"]


async def run_demo(data: str | None, profiles: int, out: Out = print) -> int:
    """Run the demo in ``data`` (default: a new temporary folder) with ``profiles`` profiles (at least 1).

    Raises:
        UsageError: ``profiles`` is below 1, or ``data`` already holds something (a demo's data,
            or anything else).
    """
    from plugins.apns.mock import MockApnsProcess, SigningKey
    from plugins.fcm.mock import MockFcmProcess, ServiceAccount

    from server.runtime.app import Server

    folder = _folder(data, profiles)
    rng = random.Random(7)
    key = SigningKey.generate(key_id="DEMOKEY001", team_id="DEMOTEAM01")
    account = ServiceAccount.generate("pigeon-demo")
    people, devices = _people(profiles)
    out(f"data folder {folder}; starting the mock APNs and the mock FCM ...")
    # The demo's data is throwaway: its master key is made here, without the warning a server
    # gives when it makes one (keep it apart from backups).
    folder.mkdir(parents=True, exist_ok=True)
    Keyring([new_key()], default_path(folder / "data")).save()
    with MockApnsProcess(folder / "mock-apns", config={"keys": [key.spec()], "tokens": devices.apns}) as apns, \
            MockFcmProcess(folder / "mock-fcm", config={"projects": {"pigeon-demo": {
                "service_accounts": [account.spec()], "tokens": devices.fcm}}}) as fcm:
        server = Server(_server_config(folder, apns, fcm))
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            async with open_client(server.addresses[0], client_name="pigeon-demo") as client:
                await _set_up_app(client, key, account, fcm.token_uri)
                out(f"app {APP} (iOS token auth + Android service account), configuration demo-push, message {MESSAGE}")
                await _create_profiles(client, people, rng)
                out(_describe_profiles(people, stale=devices.stale))
                await _send(client, people, out)
                await _report_interactions(client, apns.admin.accepted() + fcm.admin.accepted(), people, out)
                await trio.sleep(0.3)  # reports are counted a moment after the events
                report = await client.call(api.GetReport(message=MESSAGE))
                out(f"\nreport for {MESSAGE}:\n" + show_report(report))
                await _journey(client, people, apns, fcm, out)
            server.request_stop()
    out(f"\nthe data stays in {folder}; run `pigeon serve --data {folder / 'data'}` to look around")
    return 0


def _settled_counts(totals: dict[str, int]) -> bool:
    """Whether every notification targeted has its outcome (excluded, delivered or failed)."""
    return totals.get("excluded", 0) + totals.get("sent", 0) >= totals.get("targeted", 0)


async def _journey(client: Client, people: list[_Person], apns: MockApnsProcess, fcm: MockFcmProcess, out: Out) -> None:
    """A journey: entered on a sign-up event, a push, a reaction to its open (3 s), a reminder
    to those who did not open it, under quiet hours (set apart from now: the demo must not
    wait for morning); then its report node by node."""
    for name, title in (("onboarding-hello", "Hi {{ profile.person.firstName | default('there') }}, welcome aboard"),
                        ("onboarding-reminder", "Still there, {{ profile.person.firstName | default('friend') }}?")):
        await client.call(api.PublishMessage(message=api.MessageSpec(
            id=name, channel="demo-push", content=api.MessageContent(title=title))))
    now = datetime.now(UTC)
    quiet = (now + timedelta(hours=2)).strftime("%H:%M"), (now + timedelta(hours=3)).strftime("%H:%M")
    journey = api.JourneySpec(
        id=JOURNEY, entry=api.JourneyEntry(event="demo.signup"), quiet_hours=api.QuietHours(start=quiet[0], end=quiet[1]),
        nodes=[api.PushNode(id="hello", message="onboarding-hello", next="opened"),
               api.ReactionNode(id="opened", push="hello", timeout="3s", next="done", timeout_next="reminder"),
               api.PushNode(id="reminder", message="onboarding-reminder", next="done"),
               api.EndNode(id="done")])
    await client.call(api.PublishJourney(journey=journey))
    apns.admin.clear_accepted()
    fcm.admin.clear_accepted()
    await client.call(api.IngestEvents(events=[api.Event(identity=p.identity, type="demo.signup") for p in people]))
    out(f"\njourney {JOURNEY}: {len(people)} sign-ups; the app opens half of the welcome pushes; a reminder after 3 s "
        f"to the others (quiet hours {quiet[0]}-{quiet[1]} UTC)")
    hello = await _settled(lambda: [n for n in apns.admin.accepted() + fcm.admin.accepted()
                                     if _envelope(n).get("n") == "hello"])
    await _report_interactions(client, hello[::2], people, out, opens_only=True)
    with trio.move_on_after(15):  # the reactions time out, the reminders go, everyone ends
        while (await client.call(api.GetReport(journey=JOURNEY))).totals.get("exited", 0) < len(people):
            await trio.sleep(0.1)
        while not _settled_counts((await client.call(api.GetReport(journey=JOURNEY, node="reminder"))).totals):
            await trio.sleep(0.1)  # the reminders staged as their instances ended are settled a moment later
    info = await client.call(api.GetJourney(id=JOURNEY))
    rows = [(node, await client.call(api.GetReport(journey=JOURNEY, node=node.id))) for node in info.journey.nodes]
    out(show_journey_report(info, rows))


async def _settled(read: Callable[[], list[Any]]) -> list[Any]:
    """What ``read`` gives once it has stopped growing for a moment (5 s at most)."""
    last: list[Any] = []
    with trio.move_on_after(5):
        while True:
            await trio.sleep(0.3)
            now = read()
            if now and len(now) == len(last):
                break
            last = now
    return read()


def _envelope(notification: dict[str, Any]) -> dict[str, Any]:
    payload = notification.get("payload") or notification.get("message", {}).get("data", {})
    envelope = payload.get("_p")
    return json.loads(envelope) if isinstance(envelope, str) else envelope or {}


def _folder(data: str | None, profiles: int) -> Path:
    """The demo's folder, once the arguments are checked (see `run_demo`)."""
    if profiles < 1:
        raise UsageError(f"--profiles {profiles}: the demo needs at least 1 profile")
    if data is not None and Path(data).exists() and any(Path(data).iterdir()):
        raise UsageError(f"--data {data} is not empty (a demo there already?): give a new folder, "
                         "so that this demo's report counts this demo only")
    return Path(data or tempfile.mkdtemp(prefix="pigeon-demo-"))


def _people(profiles: int) -> tuple[list[_Person], _Devices]:
    """The profiles to create, every other one on Android, and the devices the mocks know: one
    token in seven is stale, one profile in eleven opted out."""
    people = []
    devices = _Devices()
    for i in range(profiles):
        stale = i % 7 == 3
        platform: api.Platform
        if i % 2:
            token = f"fcm-{secrets.token_urlsafe(24)}"
            devices.fcm[token] = {"unregistered": stale}
            platform = "fcm"
        else:
            token = secrets.token_hex(32)
            if not stale:  # APNs answers BadDeviceToken for a token it does not know
                devices.apns[token] = [APP]
            platform = "apns-sandbox"
        people.append(_Person(f"crm:{1000 + i}", NAMES[i % len(NAMES)], platform, token, i % 11 == 5))
    return people, devices


def _server_config(folder: Path, apns: MockApnsProcess, fcm: MockFcmProcess) -> Config:
    """A server on a free port, with its data in ``folder``, that sends to the mocks."""
    endpoint = {"address": apns.address, "ca_file": str(apns.ca_file)}
    return load_config(env={}, overrides={
        "data": str(folder / "data"), "listen": ["127.0.0.1:0"], "auth": "none",
        "apns": {"sandbox": endpoint, "production": endpoint},
        "fcm": {"url": fcm.url, "ca_file": str(fcm.ca_file), "token_uri": fcm.token_uri},
    })


async def _set_up_app(client: Client, key: SigningKey, account: ServiceAccount, token_uri: str) -> None:
    """The app's iOS and Android credentials, a channel configuration and a personalized message."""
    await client.call(api.RegisterIosApp(app=APP, environment="sandbox", auth=api.ApnsTokenAuth(
        key_pem=key.private_key_pem, key_id=key.key_id, team_id=key.team_id)))
    await client.call(api.RegisterAndroidApp(app=APP, service_account=account.info(token_uri)))
    await client.call(api.PublishConfig(config=api.ChannelConfig(name="demo-push", apps=[APP])))
    message = api.MessageSpec(id=MESSAGE, channel="demo-push", content=api.MessageContent(
        title="Welcome back, {{ profile.person.firstName | default('friend') }}!",
        body="{{ profile.loyalty.points | number }} points are waiting{% if profile.loyalty.points > 500 %}"
             " - enough for a free coffee{% endif %}.",
        on_click=api.OnClick(action="deeplink", url="demo://rewards"),
        buttons=[api.Button(id="redeem", label="Redeem", action="deeplink", url="demo://redeem")],
    ))
    await client.call(api.PublishMessage(message=message))


async def _create_profiles(client: Client, people: list[_Person], rng: random.Random) -> None:
    """Each person's profile with their device (and their opt-out), then crm:999 without a device."""
    for person in people:
        points = rng.randrange(0, 1000)
        await client.call(api.UpsertProfile(identity=person.identity, attributes={
            "person": {"firstName": person.name}, "loyalty": {"points": points}}))
        await client.call(api.RegisterToken(identity=person.identity, app=APP, platform=person.platform, token=person.token))
        if person.opted_out:
            await client.call(api.SetConsent(identity=person.identity, app=APP, push="out"))
    await client.call(api.UpsertProfile(identity="crm:999", attributes={"person": {"firstName": "Nobody"}}))


async def _send(client: Client, people: list[_Person], out: Out) -> None:
    """The message's preview for the first person, then the message sent to everyone and crm:999."""
    preview = await client.call(api.PreviewMessage(id=MESSAGE, identity=people[0].identity))
    out(show_preview(preview))
    result = await client.call(api.SendMessage(id=MESSAGE, identities=[p.identity for p in people] + ["crm:999"]))
    out(show_send(result))


async def _report_interactions(client: Client, accepted: list[dict[str, Any]], people: list[_Person], out: Out,
                               opens_only: bool = False) -> None:
    """What the app reports for the notifications the mocks accepted, as its SDK would: two in
    three are opened (some of them through the button: a custom action); with ``opens_only``,
    each of them is opened."""
    owner = {person.token: person.identity for person in people}
    opens = []
    for i, notification in enumerate(accepted):
        payload = notification.get("payload") or notification.get("message", {}).get("data", {})
        envelope = payload.get("_p")
        if envelope is None or (i % 3 == 2 and not opens_only):
            continue  # not every notification is opened
        platform = "fcm" if "message" in notification else "apns-sandbox"
        kind = "pushTracking.customAction" if i % 5 == 0 and not opens_only else "pushTracking.applicationOpened"
        data = {"_p": envelope, "platform": platform, "app": APP}
        if kind == "pushTracking.customAction":
            data["actionId"] = "redeem"
        token = notification.get("token") or notification.get("message", {}).get("token")
        opens.append(api.Event(identity=owner[token], type=kind, data=data))
    if opens:
        await client.call(api.IngestEvents(events=opens))
    out(f"{len(opens)} interactions reported by the app")


def _describe_profiles(people: list[_Person], stale: Callable[[str], bool]) -> str:
    """What the demo created, counted from the list it created them from."""
    ios = [p for p in people if p.platform != "fcm"]
    android = [p for p in people if p.platform == "fcm"]
    stale_ios = sum(1 for p in ios if stale(p.token))
    stale_android = sum(1 for p in android if stale(p.token))
    opted_out = [p.identity for p in people if p.opted_out]
    names = people[0].identity if len(people) == 1 else f"{people[0].identity} to {people[-1].identity}"
    lines = [
        f"{len(people) + 1} profiles: {names}, one device each, and crm:999 without a device",
        f"  {len(ios)} iOS tokens, {stale_ios} of them stale (unknown to APNs), and "
        f"{len(android)} Android tokens, {stale_android} of them stale (unregistered at FCM)",
    ]
    if opted_out:
        lines.append(f"  opted out of the app's push: {', '.join(opted_out)}")
    return "\n".join(lines)
