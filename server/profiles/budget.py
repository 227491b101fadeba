"""The admission budget of ingestion: event batches admitted and not yet committed.

Every ``events.ingest`` call takes a share of one process-wide budget, in events and in
bytes (of its request), before its batch is decoded, and gives it back when the store has
committed the batch (or failed it): the budget bounds the work that waits for the store, the
decoded events held in memory, and the decoding the Trio thread has ahead of it. A call that
finds the budget spent is refused at once with RESOURCE_EXHAUSTED and a retry hint, having
stored nothing, instead of queueing: when clients offer more than the store commits, the
excess is shed, and what is admitted is committed as fast as it would be without the flood.

While it sheds (or more than half of it is taken), the admitted batches are decoded one at a time, each followed by a pause as
long as its decoding took (`DecodeLane`): decoding, the costliest part of an ingest call on the
Trio thread, then takes at most half of it, and the calls of other clients (a health check, a
profile read) find the event loop free half of the time instead of behind a burst of decodes
each time a commit makes room in the budget.

The hint is the time the store needs to commit half of what is admitted, at the rate it
committed lately (between `MIN_RETRY_MS` and `MAX_RETRY_MS`): a client that comes back then,
with some jitter, finds room. While nothing is admitted any call is, whatever its size, so a
batch larger than the budget is never refused for good.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import msgspec
import trio

from server.runtime.errors import ResourceExhausted

__all__ = ["IngestBudget", "Ticket", "BudgetStatistics", "DecodeLane", "MIN_RETRY_MS", "MAX_RETRY_MS", "SHEDDING_S",
           "DECODE_SHARE"]

#: The retry hint's bounds, in milliseconds.
MIN_RETRY_MS = 10
MAX_RETRY_MS = 5_000
#: The hint before any commit was measured.
_FIRST_RETRY_MS = 100
#: Seconds over which the commit rate is measured (each window then counts half as much).
_RATE_WINDOW_S = 0.5
#: The budget counts as shedding this long after it last refused a call.
SHEDDING_S = 1.0
#: While the budget sheds, decoding takes at most this share of the event loop's time.
DECODE_SHARE = 0.3


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
        self._last_shed = -math.inf

    def admit(self, events: int, size: int) -> Ticket:
        """Take ``events`` and ``size`` bytes, or raise `ResourceExhausted` with a retry hint.

        Nothing is refused while nothing is admitted.
        """
        if self.calls and (self.events + events > self.max_events or self.bytes + size > self.max_bytes):
            self.shed_calls += 1
            self.shed_events += events
            self._last_shed = self.clock()
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

    def pressed(self) -> bool:
        """Whether more than half the budget is taken, or a call was refused within the last
        `SHEDDING_S` seconds."""
        if self.events * 2 > self.max_events or self.bytes * 2 > self.max_bytes:
            return True
        return self.clock() - self._last_shed < SHEDDING_S

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


class DecodeLane:
    """Where admitted batches are decoded: one at a time, in arrival order (a batch waits for
    the next pass of the event loop when another one was decoded in this one), and while the
    budget is under pressure (`IngestBudget.pressed`) each followed by a pause of ``(1 -
    DECODE_SHARE) / DECODE_SHARE`` times its own duration.
    """

    def __init__(self, budget: IngestBudget) -> None:
        self.budget = budget
        self._lock = trio.Lock()
        self._free_at = -math.inf
        #: Decodes that waited for their turn.
        self.paced = 0

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Decode in the block (synchronously: it must not wait)."""
        async with self._lock:
            if self._free_at > trio.current_time():
                self.paced += 1
                await trio.sleep_until(self._free_at)
            started = time.perf_counter()
            try:
                yield
            finally:
                if self.budget.pressed():
                    took = time.perf_counter() - started
                    self._free_at = trio.current_time() + took * (1 - DECODE_SHARE) / DECODE_SHARE
