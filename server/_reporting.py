"""Reporting: what happened to every notification, counted per message, journey, app and
platform, live (the last 24 hours by minute) and for all time.

The delivery service and the sending pipeline record `ReportEvent` s; the actor counts each
batch in memory (the live view: per-minute buckets, 24 hours) and adds it to the all-time
counters in LMDB (the ``reports`` database, one group commit per batch), so reports survive
restarts. Metrics, per notification (a profile with two devices counts twice):

- ``targeted`` = ``excluded`` + ``sent``: a notification the pipeline considered;
- ``excluded`` (with a reason): not sent (no token, no consent, a missing value, ...);
- ``sent`` = ``delivered`` + ``failed``: handed to a channel;
- ``delivered``: the provider accepted it; ``failed`` (with the provider's or Pigeon's
  reason): it did not; ``bounced``: among the failed, the token was dead;
- ``replayed``: among the sent, delivered again after a crash because the outbox could not
  tell whether they had been (they may have reached the provider twice);
- ``opened``, ``action`` (with the button id), ``received``, ``dismissed``: interactions the
  app reported.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgspec
import trio

from ._actor import Actor
from ._errors import ServerError

__all__ = ["Reporting", "ReportEvent", "ReportKey", "add_counts", "METRICS"]

log = logging.getLogger("pigeon.reporting")

METRICS = ("targeted", "excluded", "sent", "delivered", "failed", "bounced", "replayed", "received", "opened", "action",
           "dismissed")


class ReportEvent(msgspec.Struct, frozen=True, kw_only=True):
    #: One of `METRICS`.
    outcome: str
    app: str = ""
    platform: str = ""
    reason: str = ""
    message: str = ""
    version: int = 0
    journey: str = ""
    node: str = ""


#: (message, version, journey, node, app, platform, outcome, reason)
ReportKey = tuple[str, int, str, str, str, str, str, str]

_key_encoder = msgspec.msgpack.Encoder()
_key_decoder = msgspec.msgpack.Decoder(tuple[str, int, str, str, str, str, str, str])


def _key(event: ReportEvent) -> ReportKey:
    return (event.message, event.version, event.journey, event.node, event.app, event.platform, event.outcome, event.reason)


def add_counts(w: Any, counts: dict[ReportKey, int]) -> None:
    """Store op: add ``counts`` to the all-time counters."""
    db = w.dbs["reports"]
    for key, n in counts.items():
        raw = _key_encoder.encode(key)
        old = w.txn.get(raw, db=db)
        w.txn.put(raw, (n + (int.from_bytes(old, "big") if old else 0)).to_bytes(8, "big"), db=db)


class Reporting(Actor):
    """Counts report events; see the module docstring.

    Args:
        store: where the all-time counters are kept (None: in memory only).
        clock: seconds since the epoch, for the live buckets.
    """

    LIVE_MINUTES = 24 * 60

    def __init__(self, store: Any = None, *, clock: Callable[[], float] = time.time, mailbox_size: int = 4096) -> None:
        super().__init__("reporting", mailbox_size)
        self.store = store
        self.clock = clock
        #: Per minute (epoch minutes) of the last 24 hours.
        self.live: dict[int, Counter[ReportKey]] = {}
        self.counts: Counter[tuple[str, str]] = Counter()
        self.store_failures = 0

    async def record(self, event: ReportEvent) -> None:
        await self.send(event)

    async def record_many(self, events: list[ReportEvent]) -> None:
        """Record ``events`` as one mailbox item (a batch's events, so that a large send does not
        take a mailbox slot per notification)."""
        if events:
            await self.send(events)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while items := await self.receive_batch(4096):
            batch: Counter[ReportKey] = Counter()
            for item in items:
                for event in item if type(item) is list else (item,):
                    batch[_key(event)] += 1
            for key, n in batch.items():
                self.counts[(key[6], key[7])] += n
            minute = int(self.clock() // 60)
            bucket = self.live.get(minute)
            if bucket is None:
                bucket = self.live[minute] = Counter()
                for old in [m for m in self.live if m <= minute - self.LIVE_MINUTES]:
                    del self.live[old]
            bucket.update(batch)
            if self.store is not None:
                try:
                    await self.store.write(add_counts, dict(batch))
                except ServerError as exc:  # the live view still has them
                    self.store_failures += 1
                    log.error("could not store %d report counts: %s", len(batch), exc)

    # -- queries ----------------------------------------------------------------------------

    def live_counts(self, minutes: int = LIVE_MINUTES) -> list[tuple[int, Counter[ReportKey]]]:
        """(epoch minute, counts) of the last ``minutes`` minutes, oldest first."""
        since = int(self.clock() // 60) - minutes
        return sorted((m, c) for m, c in self.live.items() if m > since)

    def all_time(self) -> Counter[ReportKey]:
        if self.store is None:
            total: Counter[ReportKey] = Counter()
            for _, bucket in self.live_counts():
                total.update(bucket)
            return total
        out: Counter[ReportKey] = Counter()
        with self.store.env.begin() as txn:
            for raw, value in txn.cursor(db=self.store._dbs["reports"]):
                out[_key_decoder.decode(raw)] = int.from_bytes(value, "big")
        return out

    def details(self) -> dict[str, Any]:
        totals: Counter[str] = Counter()
        reasons: dict[str, int] = {}
        for (outcome, reason), n in self.counts.items():
            totals[outcome] += n
            if reason:
                reasons[f"{outcome}:{reason}"] = n
        return {"outcomes": dict(totals), "reasons": reasons}
