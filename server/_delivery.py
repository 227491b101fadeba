"""Delivery: hands personalized notifications to a channel and reports the outcome.

No channel exists yet (the APNs and FCM channels are plugins still to come), so every request
is recorded and reported as failed with the reason ``NoChannel``: nothing is silently dropped
and the reports already count it.
"""

from __future__ import annotations

from typing import Any

import msgspec
import trio

from ._actor import Actor, Future
from ._reporting import ReportEvent, Reporting

__all__ = ["Delivery", "DeliveryRequest", "DeliveryOutcome"]


class DeliveryOutcome(msgspec.Struct, frozen=True):
    status: str
    reason: str = ""


class DeliveryRequest:
    __slots__ = ("app", "platform", "token", "payload", "future")

    def __init__(self, app: str, platform: str, token: str, payload: dict[str, Any]) -> None:
        self.app = app
        self.platform = platform
        self.token = token
        self.payload = payload
        self.future: Future[DeliveryOutcome] = Future()


class Delivery(Actor):
    def __init__(self, reporting: Reporting, *, mailbox_size: int = 1024) -> None:
        super().__init__("delivery", mailbox_size)
        self.reporting = reporting
        self.requests = 0

    async def deliver(self, request: DeliveryRequest) -> DeliveryOutcome:
        await self.send(request)
        return await request.future.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while requests := await self.receive_batch(256):
            for request in requests:
                self.requests += 1
                await self.reporting.record(
                    ReportEvent(outcome="failed", app=request.app, platform=request.platform, reason="NoChannel")
                )
                request.future.set(DeliveryOutcome("failed", "NoChannel"))

    def details(self) -> dict[str, Any]:
        return {"requests": self.requests, "channels": []}
