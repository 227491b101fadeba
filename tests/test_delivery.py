"""Delivery without channels: every request is recorded and reported, none is dropped."""

from __future__ import annotations

import trio

from protocols import api
from server._delivery import DeliveryRequest


async def test_requests_are_reported_as_failed_for_want_of_a_channel(server, client):
    outcomes = []
    async with trio.open_nursery() as nursery:
        for platform in ("apns", "fcm", "fcm"):

            async def deliver(platform: str = platform) -> None:
                outcomes.append(await server.delivery.deliver(DeliveryRequest("com.acme.app", platform, "tok", {"aps": {}})))

            nursery.start_soon(deliver)
    assert [(o.status, o.reason) for o in outcomes] == [("failed", "NoChannel")] * 3
    with trio.fail_after(5):
        while server.reporting.details()["outcomes"].get("failed", 0) < 3:
            await trio.sleep(0.01)
    stats = await client.call(api.GetStats())
    actors = {a.name: a for a in stats.actors}
    assert actors["delivery"].details == {"requests": 3, "channels": []}
    assert actors["reporting"].details == {"outcomes": {"failed": 3}, "reasons": {"failed:NoChannel": 3}}
