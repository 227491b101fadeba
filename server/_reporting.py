"""Reporting: counts what happened to notifications, by outcome and reason.

Until messages and journeys exist, the delivery actor is its only source. Counters live in
memory and are shown by ``server.stats``; persistent, per-message reports come with messages.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgspec
import trio

from ._actor import Actor

__all__ = ["Reporting", "ReportEvent"]


class ReportEvent(msgspec.Struct, frozen=True, kw_only=True):
    #: targeted, excluded, sent, delivered, failed, bounced, opened, ...
    outcome: str
    app: str = ""
    platform: str = ""
    reason: str = ""


class Reporting(Actor):
    def __init__(self, *, mailbox_size: int = 4096) -> None:
        super().__init__("reporting", mailbox_size)
        self.counts: Counter[tuple[str, str]] = Counter()

    async def record(self, event: ReportEvent) -> None:
        await self.send(event)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while events := await self.receive_batch(4096):
            for event in events:
                self.counts[(event.outcome, event.reason)] += 1

    def details(self) -> dict[str, Any]:
        totals: Counter[str] = Counter()
        reasons: dict[str, int] = {}
        for (outcome, reason), n in self.counts.items():
            totals[outcome] += n
            if reason:
                reasons[f"{outcome}:{reason}"] = n
        return {"outcomes": dict(totals), "reasons": reasons}
