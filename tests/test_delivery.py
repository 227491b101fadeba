"""Delivery: routes notifications to channels by platform; nothing is dropped silently."""

from __future__ import annotations

import trio

from protocols import api
from server.channels import AppRecord, DeliveryJob


async def test_a_platform_without_a_channel_fails_with_NoChannel_and_is_reported(server, client):
    app = AppRecord(app="com.acme.app")
    jobs = [DeliveryJob(app=app, token="tok", platform="fcm", content=api.PushContent(title="x")) for _ in range(3)]
    results = await server.delivery.deliver(jobs)
    assert [(r.status, r.reason) for r in results] == [("failed", "NoChannel")] * 3
    assert "fcm" in results[0].detail
    with trio.fail_after(5):
        while server.reporting.details()["outcomes"].get("failed", 0) < 3:
            await trio.sleep(0.01)
    stats = await client.call(api.GetStats())
    actors = {a.name: a for a in stats.actors}
    assert actors["delivery"].details["notifications"] == 3
    assert "apns" in actors["delivery"].details["channels"]
    assert actors["reporting"].details == {"outcomes": {"failed": 3}, "reasons": {"failed:NoChannel": 3}}


async def test_an_ios_app_without_credentials_fails_on_the_apns_channel(server):
    app = AppRecord(app="com.acme.app")
    [result] = await server.delivery.deliver([DeliveryJob(app=app, token="ab" * 32, platform="apns", content=api.PushContent(title="x"))])
    assert (result.status, result.reason) == ("failed", "NoCredentials")
