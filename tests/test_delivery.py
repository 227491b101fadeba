"""Delivery: routes notifications to channels by platform; nothing is dropped silently."""

from __future__ import annotations

from collections import Counter

import pytest
import trio

from protocols import api
from protocols.errors import CallError, Status
from protocols.trio_client import open_client
from server import ConfigError, Server
from server.reports.reporting import count_outcomes
from server.runtime.plugins import Plugins
from server.channels import AppRecord, Channel, DeliveryJob, DeliveryResult
from server import hookimpl

from .conftest import make_config


async def test_a_platform_without_a_channel_fails_with_NoChannel_and_is_counted_when_asked(server, client):
    app = AppRecord(app="com.acme.app")
    jobs = [DeliveryJob(app=app, token="tok", platform="webpush", content=api.PushContent(title="x")) for _ in range(3)]
    results = await server.delivery.deliver(jobs)
    assert [(r.status, r.reason) for r in results] == [("failed", "NoChannel")] * 3
    assert "webpush" in results[0].detail
    stats = await client.call(api.GetStats())
    actors = {a.name: a for a in stats.actors}
    assert actors["delivery"].details["notifications"] == 3
    assert {"apns", "fcm"} <= set(actors["delivery"].details["channels"])
    # By default the caller counts the outcomes (the pipeline, in the commit that settles
    # them); count_outcomes gives their report counts, none for a test send's.
    assert actors["reporting"].details == {"outcomes": {}, "reasons": {}}
    counts = Counter()
    count_outcomes(counts, jobs, results)
    assert counts == {("default", "", 0, "", "", "com.acme.app", "webpush", "sent", ""): 3,
                      ("default", "", 0, "", "", "com.acme.app", "webpush", "failed", "NoChannel"): 3}
    tested = [DeliveryJob(app=app, token="tok", platform="fcm", tracking={"m": "cart", "v": 1, "x": "0", "t": 1})]
    counts = Counter()
    count_outcomes(counts, tested, results[:1])
    assert counts == {}
    # Asked to (push.send, which has no outbox), the actor counts them, stored, before answering.
    await server.delivery.deliver(jobs[:2], count=True)
    assert server.reporting.details() == {"outcomes": {"targeted": 2, "sent": 2, "failed": 2},
                                          "reasons": {"failed:NoChannel": 2}}
    report = await client.call(api.GetReport(app="com.acme.app"))
    assert report.totals == {"targeted": 2, "sent": 2, "failed": 2} and list(report.by_platform) == ["webpush"]


async def test_an_ios_app_without_credentials_fails_on_the_apns_channel(server):
    app = AppRecord(app="com.acme.app")
    [result] = await server.delivery.deliver([DeliveryJob(app=app, token="ab" * 32, platform="apns", content=api.PushContent(title="x"))])
    assert (result.status, result.reason) == ("failed", "NoCredentials")


async def test_an_android_app_without_credentials_fails_on_the_fcm_channel(server):
    app = AppRecord(app="com.acme.app")
    [result] = await server.delivery.deliver([DeliveryJob(app=app, token="tok", platform="fcm", content=api.PushContent(title="x"))])
    assert (result.status, result.reason) == ("failed", "NoCredentials")
    assert "Android" in result.detail


class _Webhook(Channel):
    """A third-party channel, registered through the same hook as the APNs channel."""

    name = "webhook"
    platforms = frozenset({"webhook"})

    def __init__(self) -> None:
        self.received: list[str] = []

    async def send(self, jobs):
        self.received += [job.token for job in jobs]
        return [DeliveryResult(status="sent", provider_id=f"hook-{job.token}") for job in jobs]


class _Broken(Channel):
    name = "broken"
    platforms = frozenset({"web"})

    async def send(self, jobs):
        raise RuntimeError("boom")


async def test_plugin_channels_deliver_and_a_failing_one_fails_only_its_notifications(tmp_path):
    webhook = _Webhook()

    class Plugin:
        @hookimpl
        def pigeon_channels(self, config):
            return [webhook, _Broken()]

    srv = Server(make_config(tmp_path / "data"), plugins=Plugins(env={}, entry_points=False, extra={"hooks": Plugin()}))
    assert sorted(c.name for c in srv.channels) == ["apns", "broken", "fcm", "webhook"]
    app = AppRecord(app="com.acme.app")
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        results = await srv.delivery.deliver([
            DeliveryJob(app=app, token="t1", platform="webhook", content=api.PushContent(title="x")),
            DeliveryJob(app=app, token="t2", platform="web", content=api.PushContent(title="x")),
            DeliveryJob(app=app, token="t3", platform="webhook", content=api.PushContent(title="x")),
        ])
        srv.request_stop()
    assert [(r.status, r.reason) for r in results] == [("sent", None), ("failed", "ChannelError"), ("sent", None)]
    assert "boom" in results[1].detail
    assert webhook.received == ["t1", "t3"]


def test_two_channels_claiming_one_platform_is_a_configuration_error(tmp_path):
    class Plugin:
        @hookimpl
        def pigeon_channels(self, config):
            return [_Webhook(), _Webhook()]

    with pytest.raises(ConfigError, match="both deliver to 'webhook'"):
        Server(make_config(tmp_path / "data"), plugins=Plugins(env={}, entry_points=False, extra={"hooks": Plugin()}))


def test_a_disabled_builtin_plugin_provides_no_channel(tmp_path):
    srv = Server(make_config(tmp_path / "data"), plugins=Plugins(env={"PIGEON_DISABLED_PLUGINS": "apns"}, entry_points=False))
    assert [c.name for c in srv.channels] == ["fcm"]
    srv = Server(make_config(tmp_path / "data2"), plugins=Plugins(env={"PIGEON_DISABLED_PLUGINS": "apns,fcm"}, entry_points=False))
    assert srv.channels == []


async def test_a_plugin_channel_that_does_not_subclass_channel_still_lets_apps_be_refused_clearly(tmp_path):
    """Plugins hand any object with Channel's methods; apps.register-ios asks each channel for
    its app_platform, and one without the attribute is a channel that handles no apps (the move
    of issue 12 read the attribute directly for a while: INTERNAL)."""

    class DuckChannel:
        name = "duck"
        platforms = frozenset({"duck"})

        async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
            task_status.started()
            await trio.sleep_forever()

        async def send(self, jobs):
            return [DeliveryResult(status="sent") for _ in jobs]

        def forget_app(self, app, version=None):
            pass

    class Plugin:
        @hookimpl
        def pigeon_channels(self, config):
            return [DuckChannel()]

    plugins = Plugins(env={"PIGEON_DISABLED_PLUGINS": "apns"}, entry_points=False, extra={"hooks": Plugin()})
    srv = Server(make_config(tmp_path / "data"), plugins=plugins)
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        async with open_client(srv.addresses[0]) as client:
            with pytest.raises(CallError) as info:
                auth = api.ApnsTokenAuth(key_pem="-----BEGIN PRIVATE KEY-----\n", key_id="ABC123DEFG", team_id="ABCDE12345")
                await client.call(api.RegisterIosApp(app="com.acme.app", auth=auth))
        srv.request_stop()
    assert info.value.status == Status.FAILED_PRECONDITION
    assert "no channel plugin handles ios apps" in info.value.message
