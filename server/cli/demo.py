"""``pigeon demo``: the whole flow in one command, on the embedded default.

It starts the mock APNs and the mock FCM (in child processes, with their own CAs), a Pigeon
server in this process on a fresh data folder pointed at them, and then, as a client would:
registers an app's iOS and Android credentials, publishes a channel configuration and a
personalized message, creates profiles with push tokens (some of them stale: the mocks do not
know them or know them as unregistered; one profile in eleven opted out), sends the message,
reports interactions for some of the notifications (opens and a button action, as the app's
SDK would), and prints the report. The folder must be new or empty: a second demo in the same
folder would add its counts to the first one's report.
"""

from __future__ import annotations

import random
import secrets
import tempfile
from pathlib import Path
from typing import Any

import trio

from protocols import api
from protocols.trio_client import open_client

__all__ = ["run_demo"]

APP = "com.example.pigeon-demo"
NAMES = ["Ana", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu"]


async def run_demo(data: str | None, profiles: int, out: Any = print) -> int:
    """Run the demo in ``data`` (default: a new temporary folder) with ``profiles`` profiles (at least 1).

    Raises:
        UsageError: ``profiles`` is below 1, or ``data`` already holds something (a demo's data,
            or anything else).
    """
    from plugins.apns.mock import MockApnsProcess, SigningKey
    from plugins.fcm.mock import MockFcmProcess, ServiceAccount

    from server.runtime.app import Server
    from server.cli.main import UsageError, show_preview, show_report, show_send
    from server.runtime.config import load_config

    if profiles < 1:
        raise UsageError(f"--profiles {profiles}: the demo needs at least 1 profile")
    if data is not None and Path(data).exists() and any(Path(data).iterdir()):
        raise UsageError(f"--data {data} is not empty (a demo there already?): give a new folder, "
                         "so that this demo's report counts this demo only")
    folder = Path(data or tempfile.mkdtemp(prefix="pigeon-demo-"))
    rng = random.Random(7)
    key = SigningKey.generate(key_id="DEMOKEY001", team_id="DEMOTEAM01")
    account = ServiceAccount.generate("pigeon-demo")
    people = []
    apns_tokens: dict[str, Any] = {}
    fcm_tokens: dict[str, Any] = {}
    for i in range(profiles):
        stale = i % 7 == 3
        if i % 2:
            token = f"fcm-{secrets.token_urlsafe(24)}"
            fcm_tokens[token] = {"unregistered": stale}
            platform = "fcm"
        else:
            token = secrets.token_hex(32)
            if not stale:  # APNs answers BadDeviceToken for a token it does not know
                apns_tokens[token] = [APP]
            platform = "apns-sandbox"
        people.append((f"crm:{1000 + i}", NAMES[i % len(NAMES)], platform, token, i % 11 == 5))
    out(f"data folder {folder}; starting the mock APNs and the mock FCM ...")
    with MockApnsProcess(folder / "mock-apns", config={"keys": [key.spec()], "tokens": apns_tokens}) as apns, \
            MockFcmProcess(folder / "mock-fcm", config={"projects": {"pigeon-demo": {
                "service_accounts": [account.spec()], "tokens": fcm_tokens}}}) as fcm:
        endpoint = {"address": apns.address, "ca_file": str(apns.ca_file)}
        config = load_config(env={}, overrides={
            "data": str(folder / "data"), "listen": ["127.0.0.1:0"],
            "apns": {"sandbox": endpoint, "production": endpoint},
            "fcm": {"url": fcm.url, "ca_file": str(fcm.ca_file), "token_uri": fcm.token_uri},
        })
        server = Server(config)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            async with open_client(server.addresses[0], client_name="pigeon-demo") as client:
                await client.call(api.RegisterIosApp(app=APP, environment="sandbox", auth=api.ApnsTokenAuth(
                    key_pem=key.private_key_pem, key_id=key.key_id, team_id=key.team_id)))
                await client.call(api.RegisterAndroidApp(app=APP, service_account=account.info(fcm.token_uri)))
                await client.call(api.PublishConfig(config=api.ChannelConfig(name="demo-push", apps=[APP])))
                message = api.MessageSpec(id="welcome-back", channel="demo-push", content=api.MessageContent(
                    title="Welcome back, {{ profile.person.firstName | default('friend') }}!",
                    body="{{ profile.loyalty.points | number }} points are waiting{% if profile.loyalty.points > 500 %}"
                         " - enough for a free coffee{% endif %}.",
                    on_click=api.OnClick(action="deeplink", url="demo://rewards"),
                    buttons=[api.Button(id="redeem", label="Redeem", action="deeplink", url="demo://redeem")],
                ))
                await client.call(api.PublishMessage(message=message))
                out(f"app {APP} (iOS token auth + Android service account), configuration demo-push, message welcome-back")
                for identity, name, platform, token, opted_out in people:
                    points = rng.randrange(0, 1000)
                    await client.call(api.UpsertProfile(identity=identity, attributes={
                        "person": {"firstName": name}, "loyalty": {"points": points}}))
                    await client.call(api.RegisterToken(identity=identity, app=APP, platform=platform, token=token))
                    if opted_out:
                        await client.call(api.SetConsent(identity=identity, app=APP, push="out"))
                await client.call(api.UpsertProfile(identity="crm:999", attributes={"person": {"firstName": "Nobody"}}))
                out(_describe_profiles(people, stale=lambda token: token not in apns_tokens and fcm_tokens.get(
                    token, {"unregistered": True})["unregistered"]))
                preview = await client.call(api.PreviewMessage(id="welcome-back", identity=people[0][0]))
                out(show_preview(preview))
                result = await client.call(api.SendMessage(id="welcome-back", identities=[p[0] for p in people] + ["crm:999"]))
                out(show_send(result))
                accepted = apns.admin.accepted() + fcm.admin.accepted()
                owner = {person[3]: person[0] for person in people}  # token -> identity
                opens = []
                for i, notification in enumerate(accepted):
                    payload = notification.get("payload") or notification.get("message", {}).get("data", {})
                    envelope = payload.get("_p")
                    if envelope is None or i % 3 == 2:
                        continue  # not every notification is opened
                    platform = "fcm" if "message" in notification else "apns-sandbox"
                    kind = "pushTracking.customAction" if i % 5 == 0 else "pushTracking.applicationOpened"
                    data = {"_p": envelope, "platform": platform, "app": APP}
                    if kind == "pushTracking.customAction":
                        data["actionId"] = "redeem"
                    token = notification.get("token") or notification.get("message", {}).get("token")
                    opens.append(api.Event(identity=owner[token], type=kind, data=data))
                if opens:
                    await client.call(api.IngestEvents(events=opens))
                out(f"{len(opens)} interactions reported by the app")
                await trio.sleep(0.3)  # reports are counted a moment after the events
                report = await client.call(api.GetReport(message="welcome-back"))
                out("\nreport for welcome-back:\n" + show_report(report))
            server.request_stop()
    out(f"\nthe data stays in {folder}; run `pigeon serve --data {folder / 'data'}` to look around")
    return 0


def _describe_profiles(people: list[tuple[str, str, str, str, bool]], stale: Any) -> str:
    """What the demo created, counted from the list it created them from."""
    ios = [p for p in people if p[2] != "fcm"]
    android = [p for p in people if p[2] == "fcm"]
    stale_ios = sum(1 for p in ios if stale(p[3]))
    stale_android = sum(1 for p in android if stale(p[3]))
    opted_out = [p[0] for p in people if p[4]]
    names = people[0][0] if len(people) == 1 else f"{people[0][0]} to {people[-1][0]}"
    lines = [
        f"{len(people) + 1} profiles: {names}, one device each, and crm:999 without a device",
        f"  {len(ios)} iOS tokens, {stale_ios} of them stale (unknown to APNs), and "
        f"{len(android)} Android tokens, {stale_android} of them stale (unregistered at FCM)",
    ]
    if opted_out:
        lines.append(f"  opted out of the app's push: {', '.join(opted_out)}")
    return "\n".join(lines)
