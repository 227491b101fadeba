"""Sending messages to profiles through the real pipeline, to the mock APNs and the mock FCM
over TLS; exclusions, personalized payloads, dead tokens, interactions and reports."""

from __future__ import annotations

import functools
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from plugins.apns.mock import MockApnsProcess, SigningKey
from plugins.fcm.mock import MockFcmProcess, ServiceAccount
from protocols import api
from protocols.trio_client import open_client
from server import Server, hookimpl
from server.cli.output import show_report, show_send
from server.runtime.plugins import Plugins

from .conftest import make_config

APP = "com.acme.shop"
KEY = SigningKey.generate(key_id="ABC123DEFG", team_id="TEAM123456")
ACCOUNT = ServiceAccount.generate("acme-push")


@pytest.fixture(scope="module")
def mocks(tmp_path_factory: pytest.TempPathFactory):
    with MockApnsProcess(tmp_path_factory.mktemp("apns"), config={"keys": [KEY.spec()]}) as apns, \
            MockFcmProcess(tmp_path_factory.mktemp("fcm")) as fcm:
        yield apns, fcm


@pytest.fixture
async def client(tmp_path: Path, mocks) -> AsyncIterator[Any]:
    async with serve(tmp_path, mocks) as c:
        yield c


@asynccontextmanager
async def serve(tmp_path: Path, mocks: Any, plugins: Plugins | None = None) -> AsyncIterator[Any]:
    """A server on ``tmp_path/data`` with the app, its configuration and the message ``cart``."""
    apns, fcm = mocks
    for admin in (apns.admin, fcm.admin):
        admin.reset_faults()
        admin.clear_tokens()
        admin.clear_accepted()
    fcm.admin.set_project("acme-push", service_accounts=[ACCOUNT.spec()])
    endpoint = {"address": apns.address, "ca_file": str(apns.ca_file)}
    config = make_config(tmp_path / "data", apns={"sandbox": endpoint, "production": endpoint},
                         fcm={"url": fcm.url, "token_uri": fcm.token_uri, "ca_file": str(fcm.ca_file), "retry_min_s": 0.05})
    srv = Server(config, plugins=plugins)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        async with open_client(srv.addresses[0]) as c:
            await c.call(api.RegisterIosApp(app=APP, environment="both", auth=api.ApnsTokenAuth(
                key_pem=KEY.private_key_pem, key_id=KEY.key_id, team_id=KEY.team_id)))
            await c.call(api.RegisterAndroidApp(app=APP, service_account=ACCOUNT.info(fcm.token_uri)))
            await c.call(api.PublishConfig(config=api.ChannelConfig(name="shop-push", apps=[APP])))
            await c.call(api.PublishMessage(message=api.MessageSpec(
                id="cart", channel="shop-push",
                content=api.MessageContent(
                    title="Hi {{ profile.person.firstName | default('there') }}",
                    body="Your {{ event.product }} is waiting",
                    data={"tier": "{{ profile.tier | default('none') }}"},
                    buttons=[api.Button(id="buy", label="Buy", action="deeplink", url="shop://buy")],
                ),
            )))
            c.pigeon = srv  # for tests that stop it
            yield c
        srv.request_stop()


async def admin(mock: Any, name: str, *args: Any) -> Any:
    return await trio.to_thread.run_sync(functools.partial(getattr(mock.admin, name), *args))


def apns_token() -> str:
    return secrets.token_hex(32)


async def profile(client: Any, identity: str, attributes: dict[str, Any], tokens: list[tuple[str, str]] = (),
                  consent: str | None = None) -> None:
    await client.call(api.UpsertProfile(identity=identity, attributes=attributes))
    for platform, token in tokens:
        await client.call(api.RegisterToken(identity=identity, app=APP, platform=platform, token=token))
    if consent is not None:
        await client.call(api.SetConsent(identity=identity, app=APP, push=consent))


async def test_a_send_personalizes_excludes_delivers_and_reports(client, mocks):
    apns, fcm = mocks
    ios_ok, android_ok, android_gone, stale = apns_token(), "fcm-ana", "fcm-gone", "fcm-stale"
    await admin(apns, "set_tokens", {ios_ok: [APP]})
    await admin(fcm, "set_tokens", "acme-push", {android_ok: {}, android_gone: {"unregistered": True},
                                                  stale: {"unregistered": True}})
    await profile(client, "crm:1", {"person": {"firstName": "Ana"}, "tier": "gold"},
                  [("apns-sandbox", ios_ok), ("fcm", android_ok)])
    await profile(client, "crm:2", {"person": {"firstName": "Bo"}}, [("fcm", android_gone)])
    await profile(client, "crm:3", {"person": {"firstName": "Cy"}})  # no token
    await profile(client, "crm:4", {}, [("apns-sandbox", apns_token())], consent="out")
    await profile(client, "crm:5", {}, [("fcm", stale)])
    # crm:5's only token dies on a first push: it is then invalid on the profile.
    await client.call(api.SendPush(app=APP, identity="crm:5", content=api.PushContent(title="x")))

    result = await client.call(api.SendMessage(
        id="cart", identities=["crm:1", "crm:2", "crm:3", "crm:4", "crm:5", "crm:404"], event={"product": "red shoes"},
    ))
    assert result.profiles == 5
    assert (result.unknown, result.unknown_identities) == (1, ["crm:404"])  # said, not silently skipped
    assert "1 identity matched no profile (nothing sent): crm:404" in show_send(result)
    assert result.excluded == {"NoTokenForApp": 1, "NoConsent": 1, "OnlyInvalidTokens": 1}
    assert (result.targeted, result.sent, result.delivered, result.bounced) == (6, 3, 2, 1)
    assert result.failed == {"UNREGISTERED": 1}
    assert result.targeted == sum(result.excluded.values()) + result.sent
    assert result.sent == result.delivered + sum(result.failed.values())

    [ios] = await admin(apns, "accepted")
    assert ios["token"] == ios_ok
    assert ios["payload"]["aps"]["alert"] == {"title": "Hi Ana", "body": "Your red shoes is waiting"}
    assert ios["payload"]["tier"] == "gold"
    tracking = ios["payload"]["_p"]
    assert tracking == {"m": "cart", "v": 1, "x": result.execution}
    [android] = await admin(fcm, "accepted")
    assert android["token"] == android_ok
    assert android["message"]["notification"] == {"title": "Hi Ana", "body": "Your red shoes is waiting"}
    assert json.loads(android["message"]["data"]["_p"]) == tracking
    # The dead token is cleaned from its profile.
    bo = await client.call(api.GetProfile(identity="crm:2"))
    assert [(r.state, r.invalid_reason) for r in bo.registrations] == [("invalid", "UNREGISTERED")]

    # The app reports interactions, carrying the envelope it received.
    await client.call(api.IngestEvents(events=[
        api.Event(identity="crm:1", type="pushTracking.applicationOpened", data={"_p": tracking, "platform": "apns-sandbox"}),
        api.Event(identity="crm:1", type="pushTracking.customAction",
                  data={"_p": android["message"]["data"]["_p"], "actionId": "buy", "platform": "fcm"}),
        api.Event(identity="crm:1", type="pushTracking.applicationOpened", data={"no": "envelope"}),
    ]))
    with trio.fail_after(10):  # reports are counted a moment after the events (the live view just after the commit)
        while ((report := await client.call(api.GetReport(message="cart"))).totals.get("action", 0) < 1
               or (await client.call(api.GetReport(message="cart", window="live"))).totals.get("action", 0) < 1):
            await trio.sleep(0.02)
    totals = report.totals
    assert totals["targeted"] == totals["excluded"] + totals["sent"] == 6
    assert totals["sent"] == totals["delivered"] + totals["failed"] == 3
    assert (totals["bounced"], totals["opened"], totals["action"]) == (1, 1, 1)
    assert report.reasons["excluded"] == {"NoTokenForApp": 1, "NoConsent": 1, "OnlyInvalidTokens": 1}
    assert report.reasons["failed"] == {"UNREGISTERED": 1} and report.reasons["action"] == {"buy": 1}
    assert report.by_platform["fcm"]["delivered"] == 1 and report.by_platform["apns-sandbox"]["opened"] == 1
    assert report.open_rate == 0.5
    live = await client.call(api.GetReport(message="cart", window="live"))
    assert live.totals == totals and sum(m.counts.get("sent", 0) for m in live.minutes) == 3
    # The transactional push of crm:5 is reported too, under no message.
    everything = await client.call(api.GetReport())
    assert everything.totals["sent"] == 4
    assert everything.totals["targeted"] == everything.totals["excluded"] + everything.totals["sent"] == 7


async def test_a_push_is_counted_as_targeted_and_excluded_as_a_send_is_before_it_answers(client, mocks):
    _, fcm = mocks
    await admin(fcm, "set_tokens", "acme-push", {"fcm-push": {}})
    await profile(client, "crm:80", {}, [("fcm", "fcm-push")])
    await profile(client, "crm:81", {})
    [outcome] = (await client.call(api.SendPush(app=APP, identity="crm:80", content=api.PushContent(title="x")))).outcomes
    assert outcome.status == "sent"
    nothing = await client.call(api.SendPush(app=APP, identity="crm:81", content=api.PushContent(title="x")))
    assert nothing.excluded == "NoTokenForApp"
    report = await client.call(api.GetReport())  # counted before the calls answered
    assert report.totals == {"targeted": 2, "excluded": 1, "sent": 1, "delivered": 1}
    assert report.reasons == {"excluded": {"NoTokenForApp": 1}}
    assert report.by_app == {APP: report.totals}
    assert report.by_platform == {"fcm": {"targeted": 1, "sent": 1, "delivered": 1}, "": {"targeted": 1, "excluded": 1}}
    assert (await client.call(api.GetReport(message="cart"))).totals == {}  # under no message


async def test_every_count_is_in_one_platform_row_and_one_app_row(client, mocks):
    _, fcm = mocks
    await admin(fcm, "set_tokens", "acme-push", {"fcm-rows": {}})
    await profile(client, "crm:90", {}, [("fcm", "fcm-rows")])
    await profile(client, "crm:91", {})  # no token: excluded, on no platform
    result = await client.call(api.SendMessage(id="cart", identities=["crm:90", "crm:91"], event={"product": "x"}))
    envelope = {"m": "cart", "v": 1, "x": result.execution}
    # The app reports an open with the envelope only, without its app or platform.
    await client.call(api.IngestEvents(events=[api.Event(identity="crm:90", type="pushTracking.applicationOpened",
                                                         data={"_p": envelope})]))
    report = await wait_for_report(client, lambda r: r.totals.get("opened", 0) >= 1, message="cart")
    assert report.totals == {"targeted": 2, "excluded": 1, "sent": 1, "delivered": 1, "opened": 1, "unique_opened": 1}
    for rows in (report.by_platform, report.by_app, report.by_journey):
        assert {metric: sum(row.get(metric, 0) for row in rows.values()) for metric in report.totals} == report.totals
    none = {"targeted": 1, "excluded": 1, "opened": 1, "unique_opened": 1}
    assert report.by_platform == {"fcm": {"targeted": 1, "sent": 1, "delivered": 1}, "": none}
    assert report.by_app == {APP: {"targeted": 1, "sent": 1, "delivered": 1}, "": none}
    assert "platform (none)" in show_report(report) and "app (none)" in show_report(report)


async def test_audiences_test_sends_and_missing_values(client, mocks):
    apns, _ = mocks
    gold, silver, tester = apns_token(), apns_token(), apns_token()
    await admin(apns, "set_tokens", {t: [APP] for t in (gold, silver, tester)})
    await profile(client, "crm:10", {"tier": "gold"}, [("apns-sandbox", gold)])
    await profile(client, "crm:11", {"tier": "silver"}, [("apns-sandbox", silver)])
    await profile(client, "crm:12", {"tier": "gold", "testProfile": True, "person": {"firstName": "Tess"}},
                  [("apns-sandbox", tester)])
    result = await client.call(api.SendMessage(id="cart", audience="profile.tier == 'gold'", event={"product": "hat"}))
    assert (result.profiles, result.delivered) == (2, 2)
    test = await client.call(api.SendMessage(id="cart", audience="true", test=True, event={"product": "hat"}))
    assert (test.profiles, test.delivered) == (1, 1)
    accepted = await admin(apns, "accepted")
    assert sorted(a["token"] for a in accepted) == sorted([gold, tester, tester])

    await client.call(api.PublishMessage(message=api.MessageSpec(
        id="strict", channel="shop-push", on_missing="exclude",
        content=api.MessageContent(title="Hi {{ profile.person.firstName }}"))))
    strict = await client.call(api.SendMessage(id="strict", identities=["crm:10", "crm:12"]))
    assert strict.excluded == {"MissingValue": 1} and strict.delivered == 1
    assert strict.details == {"MissingValue": "crm:10: $.content.title: 'dict object' has no attribute 'person'"}
    # With on_missing: default, a missing value a template computes with still excludes: the
    # result says why, as a preview would.
    await client.call(api.PublishMessage(message=api.MessageSpec(
        id="points", channel="shop-push", content=api.MessageContent(title="{{ profile.points + 1 }} points"))))
    points = await client.call(api.SendMessage(id="points", identities=["crm:10"]))
    assert points.excluded == {"MissingValue": 1}
    detail = points.details["MissingValue"]
    assert detail.startswith("crm:10: $.content.title: 'dict object' has no attribute 'points'") and "default(" in detail
    assert f"MissingValue: {detail}" in show_send(points)
    preview = await client.call(api.PreviewMessage(id="points", identity="crm:10"))
    assert preview.excluded == "MissingValue" and preview.detail in detail

    from protocols.errors import CallError, Status

    with pytest.raises(CallError) as caught:
        await client.call(api.SendMessage(id="cart", audience="profile."))
    assert caught.value.status == Status.INVALID_ARGUMENT and caught.value.field == "$.audience"
    with pytest.raises(CallError) as caught:
        await client.call(api.SendMessage(id="cart"))
    assert caught.value.field == "$.identities"


async def test_a_profile_whose_data_breaks_the_audience_is_excluded_and_the_send_goes_on(client, mocks):
    apns, _ = mocks
    fine, odd = apns_token(), apns_token()
    await admin(apns, "set_tokens", {t: [APP] for t in (fine, odd)})
    await profile(client, "crm:20", {"age": 40}, [("apns-sandbox", fine)])
    await profile(client, "crm:21", {"age": "forty"}, [("apns-sandbox", odd)])
    result = await client.call(api.SendMessage(id="cart", audience="profile.age > 30", event={"product": "x"}))
    assert result.excluded == {"AudienceError": 1} and result.delivered == 1
    assert result.details["AudienceError"].startswith("crm:21: $.audience: ")


async def wait_for_report(client: Any, done: Any, **filters: Any) -> api.Report:
    """The report once ``done(report)`` holds (reports are counted a moment after the events)."""
    with trio.fail_after(10):
        while not done(report := await client.call(api.GetReport(**filters))):
            await trio.sleep(0.02)
    return report


def opened(identity: str, envelope: dict[str, Any], platform: str) -> api.Event:
    return api.Event(identity=identity, type="pushTracking.applicationOpened", data={"_p": envelope, "platform": platform})


async def test_unique_opens_journeys_and_test_sends_in_reports(client, mocks):
    apns, fcm = mocks
    ios, android, other = apns_token(), "fcm-uniq", apns_token()
    await admin(apns, "set_tokens", {ios: [APP], other: [APP]})
    await admin(fcm, "set_tokens", "acme-push", {android: {}})
    await profile(client, "crm:30", {"testProfile": True}, [("apns-sandbox", ios), ("fcm", android)])
    await profile(client, "crm:31", {}, [("apns-sandbox", other)])
    await client.call(api.LinkIdentity(identity="crm:30", link="email:ana@example.com"))
    result = await client.call(api.SendMessage(id="cart", identities=["crm:30", "crm:31"], event={"product": "x"}))
    assert result.delivered == 3
    envelope = {"m": "cart", "v": 1, "x": result.execution}
    # crm:30 opens on both devices, twice on one, under two of its identities: one unique open.
    await client.call(api.IngestEvents(events=[
        opened("crm:30", envelope, "apns-sandbox"), opened("crm:30", envelope, "apns-sandbox"),
        opened("email:ana@example.com", envelope, "fcm"),
    ]))
    report = await wait_for_report(client, lambda r: r.totals.get("opened", 0) >= 3, message="cart")
    assert (report.totals["opened"], report.totals["unique_opened"]) == (3, 1)
    assert report.by_platform["apns-sandbox"]["unique_opened"] == 1 and "unique_opened" not in report.by_platform["fcm"]
    assert report.open_rate == round(1 / 3, 4)

    # An interaction from a journey's node is counted under the journey (and the node).
    in_journey = {**envelope, "j": "welcome", "n": "push-1"}
    await client.call(api.IngestEvents(events=[opened("crm:31", in_journey, "apns-sandbox")]))
    journey = await wait_for_report(client, lambda r: r.totals.get("opened", 0) >= 1, journey="welcome")
    assert journey.totals == {"opened": 1, "unique_opened": 1} and journey.by_journey == {"welcome": journey.totals}
    assert (await client.call(api.GetReport(journey="welcome", node="push-1"))).totals == journey.totals
    assert (await client.call(api.GetReport(journey="welcome", node="push-2"))).totals == {}
    report = await wait_for_report(client, lambda r: r.totals.get("opened", 0) >= 4, message="cart")
    assert report.by_journey[""]["opened"] == 3 and report.by_journey["welcome"]["opened"] == 1

    # A test send, and its opens, are not counted.
    before = (await client.call(api.GetReport(message="cart"))).totals
    test = await client.call(api.SendMessage(id="cart", audience="true", test=True, event={"product": "x"}))
    assert (test.profiles, test.delivered) == (1, 2)
    test_envelope = {"m": "cart", "v": 1, "x": test.execution, "t": 1}
    assert test_envelope in [a["payload"]["_p"] for a in await admin(apns, "accepted")]
    await client.call(api.IngestEvents(events=[opened("crm:30", test_envelope, "apns-sandbox")]))
    await client.call(api.IngestEvents(events=[opened("crm:31", envelope, "apns-sandbox")]))  # a marker after it
    after = await wait_for_report(client, lambda r: r.totals.get("opened", 0) >= 5, message="cart")
    assert after.totals == {**before, "opened": 5, "unique_opened": 3}


async def test_a_watch_streams_the_report_whenever_it_changes(client, mocks):
    apns, _ = mocks
    token = apns_token()
    await admin(apns, "set_tokens", {token: [APP]})
    await profile(client, "crm:40", {}, [("apns-sandbox", token)])
    seen = []
    with trio.fail_after(15):
        async with client.stream(api.WatchReport(message="cart", interval_s=0.1)) as reports:
            async for report in reports:
                seen.append(report.totals)
                if len(seen) == 1:
                    assert report.totals == {}  # at once, before anything happened
                    result = await client.call(api.SendMessage(id="cart", identities=["crm:40"], event={"product": "x"}))
                    assert result.delivered == 1
                elif report.totals.get("delivered") == 1:
                    break
    assert seen[-1] == {"targeted": 1, "sent": 1, "delivered": 1}
    # Nothing changes: nothing is streamed (the reports are not re-sent every interval).
    # Nothing changes for this message: nothing more is streamed, whatever else is counted.
    items = []
    with trio.move_on_after(3):
        async with client.stream(api.WatchReport(message="cart", interval_s=0.1)) as reports:
            async for report in reports:
                items.append(report.totals)
                if len(items) == 1:
                    await client.call(api.IngestEvents(events=[opened("crm:40", {"m": "other", "v": 1}, "fcm")]))
                    await wait_for_report(client, lambda r: r.totals, message="other")
                    await trio.sleep(0.3)  # three intervals: a report would have come by now
                    break
    assert items == [seen[-1]]


async def test_a_watch_ends_when_the_server_stops(tmp_path, mocks):
    async with serve(tmp_path, mocks) as client:
        with trio.fail_after(10):
            async with client.stream(api.WatchReport()) as reports:
                async for _ in reports:
                    client.pigeon.request_stop()
            # the loop ended: the server ended the stream (not an error)


class Cap:
    """A frequency-cap plugin: at most one message per profile (in memory)."""

    def __init__(self) -> None:
        self.sent: set[str] = set()
        self.calls: list[tuple[str, str, int, str]] = []

    @hookimpl
    def pigeon_exclude(self, identity: str, message: api.MessageSpec, version: int, config: api.ChannelConfig) -> str | None:
        self.calls.append((identity, message.id, version, config.name))
        if identity in self.sent:
            return "FrequencyCap"
        self.sent.add(identity)
        return None


async def test_a_rule_plugin_excludes_profiles_with_its_reason(tmp_path, mocks):
    apns, _ = mocks
    token = apns_token()
    cap = Cap()
    async with serve(tmp_path, mocks, Plugins(entry_points=False, extra={"cap": cap})) as client:
        await admin(apns, "set_tokens", {token: [APP]})
        await profile(client, "crm:50", {}, [("apns-sandbox", token)])
        await profile(client, "crm:51", {})  # no token: excluded before the rule is asked
        first = await client.call(api.SendMessage(id="cart", identities=["crm:50", "crm:51"], event={"product": "x"}))
        second = await client.call(api.SendMessage(id="cart", identities=["crm:50"], event={"product": "x"}))
        assert (first.delivered, first.excluded) == (1, {"NoTokenForApp": 1})
        assert (second.delivered, second.excluded) == (0, {"FrequencyCap": 1})
        assert cap.calls == [("crm:50", "cart", 1, "shop-push")] * 2
        report = await wait_for_report(client, lambda r: r.totals.get("excluded", 0) >= 2, message="cart")
        assert report.reasons["excluded"] == {"NoTokenForApp": 1, "FrequencyCap": 1}
        assert report.totals["targeted"] == report.totals["excluded"] + report.totals["sent"] == 3


async def test_live_reports_and_first_opens_survive_a_restart(tmp_path, mocks):
    envelope = {"m": "cart", "v": 1, "x": "0123456789abcdef"}
    async with serve(tmp_path, mocks) as client:
        await profile(client, "crm:60", {})
        await client.call(api.IngestEvents(events=[opened("crm:60", envelope, "fcm")]))
        live = await wait_for_report(client, lambda r: r.totals.get("opened", 0) >= 1, message="cart", window="live")
    assert live.totals == {"opened": 1, "unique_opened": 1} and len(live.minutes) == 1
    async with serve(tmp_path, mocks) as client:  # the same data folder
        assert await client.call(api.GetReport(message="cart", window="live")) == live
        await client.call(api.IngestEvents(events=[opened("crm:60", envelope, "fcm")]))
        again = await wait_for_report(client, lambda r: r.totals.get("opened", 0) >= 2, message="cart", window="live")
    assert again.totals == {"opened": 2, "unique_opened": 1}  # the first open was remembered


class Broken:
    @hookimpl
    def pigeon_exclude(self, identity: str) -> str | None:
        if identity == "crm:71":
            raise KeyError("a plugin's bug")
        return None


async def test_a_rule_plugin_that_fails_excludes_only_the_profiles_it_fails_on(tmp_path, mocks):
    apns, _ = mocks
    tokens = [apns_token(), apns_token()]
    async with serve(tmp_path, mocks, Plugins(entry_points=False, extra={"broken": Broken()})) as client:
        await admin(apns, "set_tokens", {t: [APP] for t in tokens})
        await profile(client, "crm:70", {}, [("apns-sandbox", tokens[0])])
        await profile(client, "crm:71", {}, [("apns-sandbox", tokens[1])])
        result = await client.call(api.SendMessage(id="cart", identities=["crm:70", "crm:71"], event={"product": "x"}))
        assert (result.delivered, result.excluded) == (1, {"RuleError": 1})


async def test_recovery_leaves_alone_a_send_this_server_is_running(client, mocks):
    """Recovery runs once the listener is up: a send a client started before it read the
    outbox and the executions was resumed (and its staged batches delivered) a second time
    beside itself."""
    from server.messages.pipeline import recover

    apns, fcm = mocks
    await trio.to_thread.run_sync(functools.partial(fcm.admin.set_faults, accept_any_token=True, latency_ms=20))
    for i in range(300):
        await profile(client, f"crm:r{i}", {"n": i}, [("fcm", f"fcm-r{i}")])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.call, api.SendMessage(id="cart", identities=[f"crm:r{i}" for i in range(300)]))
        with trio.fail_after(10):
            while not (await admin(fcm, "stats"))["successes"]:
                await trio.sleep(0.005)
        await recover(client.pigeon)  # while the send goes on
    accepted = [a["token"] for a in await admin(fcm, "accepted")]
    assert sorted(accepted) == sorted(f"fcm-r{i}" for i in range(300))  # once each
    report = await client.call(api.GetReport(message="cart"))
    assert report.totals["targeted"] == report.totals["sent"] == report.totals["delivered"] == 300
    assert "replayed" not in report.totals


async def test_a_send_whose_templates_burn_cpu_lets_other_clients_in_between_profiles(client, mocks):
    """A profile's templates may take 50 ms of CPU; a batch was prepared without letting the
    event loop go for 100 profiles at a time (its first batch, 50 profiles, in one go: 2 s
    here, in which the server, which runs in this test's event loop, answered nobody)."""
    await trio.to_thread.run_sync(functools.partial(mocks[1].admin.set_faults, accept_any_token=True))
    await client.call(api.PublishMessage(message=api.MessageSpec(id="burn", channel="shop-push", content=api.MessageContent(
        title="{% for i in range(9999) %}{% if 'zz' in event.s %}!{% endif %}{% endfor %}Hi"))))
    for i in range(40):
        await profile(client, f"crm:b{i}", {"n": i}, [("fcm", f"fcm-b{i}")])
    answers: list[float] = []
    async with open_client(client.pigeon.addresses[0]) as bystander, trio.open_nursery() as nursery:
        done = trio.Event()

        async def send() -> None:
            await client.call(api.SendMessage(id="burn", identities=[f"crm:b{i}" for i in range(40)],
                                              event={"s": "a" * 16_000}))
            done.set()

        nursery.start_soon(send)
        while not done.is_set():
            await bystander.call(api.GetHealth())
            answers.append(trio.current_time())
    report = await client.call(api.GetReport(message="burn"))
    assert report.reasons["excluded"] == {"TemplateLimit": 40}  # 50 ms of CPU each
    longest = max(b - a for a, b in zip(answers, answers[1:]))
    assert longest < 1.0, f"the bystander waited {longest:.2f} s for an answer"
