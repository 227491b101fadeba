"""The journey engine.

No journeys exist yet, so the engine evaluates nothing. It already follows the committed event
log by sequence number: ingestion tells it how far the log reaches after each commit, and when
journeys arrive, event-triggered entries will read the log from the engine's position, so a
notification lost to a full mailbox delays an entry but never drops it.
"""

from __future__ import annotations

from typing import Any

import msgspec
import trio

from server.runtime.actor import Actor
from server.runtime.errors import ActorError, ResourceExhausted

__all__ = ["Journeys", "EventsCommitted"]


class EventsCommitted(msgspec.Struct, frozen=True):
    """The event log now reaches ``last_seq``; ``count`` events were added by the commit."""

    last_seq: int
    count: int


class Journeys(Actor):
    def __init__(self, *, mailbox_size: int = 1024) -> None:
        super().__init__("journeys", mailbox_size)
        #: Highest event sequence number known to be committed.
        self.log_end = 0
        #: Highest sequence number the engine has evaluated (all of them, with no journeys).
        self.position = 0
        self.events_seen = 0
        self.hints_dropped = 0
        self.live_journeys = 0

    def events_committed(self, last_seq: int, count: int) -> None:
        """Called by ingestion after a commit; never blocks the caller."""
        try:
            self.send_nowait(EventsCommitted(last_seq, count))
        except (ResourceExhausted, ActorError):
            # Only a hint: the log itself is in LMDB and the next hint carries a higher seq.
            # (ActorError: the engine is stopping or restarting.)
            self.hints_dropped += 1
        self.log_end = max(self.log_end, last_seq)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while hints := await self.receive_batch(1024):
            for hint in hints:
                self.events_seen += hint.count
                # With no live journey there is nothing to evaluate: the position moves on.
                self.position = max(self.position, hint.last_seq)

    def details(self) -> dict[str, Any]:
        return {
            "live_journeys": self.live_journeys,
            "log_end": self.log_end,
            "position": self.position,
            "events_seen": self.events_seen,
            "hints_dropped": self.hints_dropped,
        }
