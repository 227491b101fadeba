"""The admission budget of ingestion: event batches admitted and not yet committed.

Every ``events.ingest`` call takes a share of one process-wide budget, in events and in
bytes (of its request), before its batch is decoded, and gives it back when the store has
committed the batch (or failed it): the budget bounds the work that waits for the store, the
decoded events held in memory, and the decoding the Trio thread has ahead of it. A call that
finds the budget spent is refused at once with RESOURCE_EXHAUSTED and a retry hint, having
stored nothing, instead of queueing: when clients offer more than the store commits, the
excess is shed, and what is admitted is committed as fast as it would be without the flood.

The hint is the time the store needs to commit half of what is admitted, at the rate it
committed lately (between `MIN_RETRY_MS` and `MAX_RETRY_MS`): a client that comes back then,
with some jitter, finds room. While nothing is admitted any call is, whatever its size, so a
batch larger than the budget is never refused for good.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from server.runtime.errors import ResourceExhausted

__all__ = ["IngestBudget", "Ticket", "BudgetStatistics", "MIN_RETRY_MS", "MAX_RETRY_MS"]

#: The retry hint's bounds, in milliseconds.
MIN_RETRY_MS = 10
MAX_RETRY_MS = 5_000
#: The hint before any commit was measured.
_FIRST_RETRY_MS = 100
#: Seconds over which the commit rate is measured (each window then counts half as much).
_RATE_WINDOW_S = 0.5


class BudgetStatistics(msgspec.Struct, frozen=True):
    """The budget's state and counters (`IngestBudget.statistics`)."""

    max_events: int
    max_bytes: int
    events: int
    bytes: int
    admitted_calls: int
    shed_calls: int
    shed_events: int
    #: Events committed per second lately (what the hint is computed from).
    drain_events_per_s: float


class Ticket:
    """One call's share of the budget; `release` gives it back (once)."""

    __slots__ = ("_budget", "events", "size")

    def __init__(self, budget: IngestBudget, events: int, size: int) -> None:
        self._budget: IngestBudget | None = budget
        self.events = events
        self.size = size

    def resize(self, events: int) -> None:
        """The batch holds ``events`` to store (its count was estimated, or some were rejected)."""
        budget = self._budget
        if budget is not None:
            budget.events += events - self.events
            self.events = events

    def release(self, *, committed: bool = False) -> None:
        """Give the share back; ``committed``: its events were stored (they count in the rate)."""
        budget, self._budget = self._budget, None
        if budget is not None:
            budget._release(self, committed)


class IngestBudget:
    """Events and bytes of ingest calls admitted and not yet answered, process-wide.

    Args:
        max_events: events admitted at most (``ingest.backlog_events``).
        max_bytes: bytes of requests admitted at most (``ingest.backlog_mb``).
        clock: seconds, monotonic.
    """

    def __init__(self, *, max_events: int, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        if max_events < 1 or max_bytes < 1:
            raise ValueError("an ingest budget needs room for something")
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.clock = clock
        self.events = 0
        self.bytes = 0
        self.calls = 0
        self.admitted_calls = 0
        self.shed_calls = 0
        self.shed_events = 0
        self._rate = 0.0
        self._window_start = clock()
        self._window_events = 0

    def admit(self, events: int, size: int) -> Ticket:
        """Take ``events`` and ``size`` bytes, or raise `ResourceExhausted` with a retry hint.

        Nothing is refused while nothing is admitted.
        """
        if self.calls and (self.events + events > self.max_events or self.bytes + size > self.max_bytes):
            self.shed_calls += 1
            self.shed_events += events
            raise ResourceExhausted(
                f"the server is taking in more events than it can store: {self.events} events "
                f"({self.bytes} bytes) are waiting to be committed (ingest.backlog_events "
                f"{self.max_events}, ingest.backlog_mb {self.max_bytes >> 20}); nothing of this "
                "call was stored, retry it after retry_after_ms",
                retry_after_ms=self.retry_after_ms(),
            )
        self.calls += 1
        self.admitted_calls += 1
        self.events += events
        self.bytes += size
        return Ticket(self, events, size)

    def _release(self, ticket: Ticket, committed: bool) -> None:
        self.calls -= 1
        self.events -= ticket.events
        self.bytes -= ticket.size
        if committed:
            self._window_events += ticket.events
            self._measure()

    def _measure(self) -> float:
        """The commit rate, events/s: each window of `_RATE_WINDOW_S` halves the older ones' weight."""
        now = self.clock()
        elapsed = now - self._window_start
        if elapsed >= _RATE_WINDOW_S:
            current = self._window_events / elapsed
            self._rate = current if self._rate == 0 else (self._rate + current) / 2
            self._window_start, self._window_events = now, 0
        return self._rate

    def retry_after_ms(self) -> int:
        """How long a refused call should wait: half the backlog at the recent commit rate."""
        rate = self._measure()
        if rate <= 0:
            return _FIRST_RETRY_MS
        return max(MIN_RETRY_MS, min(MAX_RETRY_MS, round(self.events / 2 / rate * 1000)))

    def statistics(self) -> BudgetStatistics:
        return BudgetStatistics(
            max_events=self.max_events,
            max_bytes=self.max_bytes,
            events=self.events,
            bytes=self.bytes,
            admitted_calls=self.admitted_calls,
            shed_calls=self.shed_calls,
            shed_events=self.shed_events,
            drain_events_per_s=round(self._rate, 1),
        )
