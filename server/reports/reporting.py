"""Reporting: what happened to every notification, counted per message, journey, app and
platform, live (the last 24 hours by minute) and for all time.

Counts are kept in LMDB (the ``reports`` database for all time, ``live`` by minute, older
than 24 hours deleted), so both windows survive restarts, and in memory for the live view.
The counts of a notification are stored in the same commit as what they describe, so that no
crash can lose them or count them twice: the sending pipeline adds ``targeted`` and
``excluded`` to the commit that stages a batch in the outbox, and ``sent``, ``delivered``,
``failed`` and ``bounced`` to the commit that settles it (`store_counts` inside its store
op), then shows them in the live view (`Reporting.counted`); ``push.send``, which has no
outbox, stores its counts in a commit of their own (`Reporting.record_counts`). The
interactions the app reports are counted by the actor, which stores each batch of them in
one group commit. Metrics, per notification (a profile with two devices counts twice):

- ``targeted`` = ``excluded`` + ``sent``: a notification the pipeline (or ``push.send``)
  considered;
- ``excluded`` (with a reason): not sent (no token, no consent, a missing value, ...);
- ``sent`` = ``delivered`` + ``failed``: handed to a channel;
- ``delivered``: the provider accepted it; ``failed`` (with the provider's or Pigeon's
  reason): it did not; ``bounced``: among the failed, the token was dead;
- ``replayed``: deliveries again after a crash of notifications the outbox still held
  (staged, not settled: they may have reached the provider before). Each one is counted
  before it goes out again, so ``replayed`` bounds the duplicates the providers received;
  their outcome is counted once, in ``sent`` and the rest, when the batch is settled;
- ``opened``, ``action`` (with the button id), ``received``, ``dismissed``: interactions the
  app reported; ``unique_opened``: the first ``opened`` of each profile for a message version
  (in a journey node: per node), counted once whatever its app or platform.

Test sends (to test profiles) are not counted: their envelope carries ``t``. Which profiles
opened what is kept in ``uniques``.

Databases: ``reports``, the encoded report key (message, version, journey, node, app,
platform, metric, reason) -> count (u64 BE); ``live``, epoch minute (u32 BE) + report key ->
count; ``uniques``, the key's message, version, journey and node + profile id -> empty.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from protocols import api

from server.channels import DeliveryJob, DeliveryResult
from server.runtime.actor import Actor
from server.runtime.errors import ServerError
from server.runtime.values import from_us

if TYPE_CHECKING:
    from server.profiles.store import ProfileStore, Writer

__all__ = ["Reporting", "ReportEvent", "ReportKey", "add_counts", "store_counts", "METRICS", "counted",
           "envelope_key", "count_targeted", "count_outcomes", "journey_dimension", "split_journey"]

log = logging.getLogger("pigeon.reporting")

METRICS = ("targeted", "excluded", "sent", "delivered", "failed", "bounced", "replayed", "received", "opened",
           "unique_opened", "action", "dismissed", "entered", "exited", "goal", "refused")


def counted(tracking: dict[str, Any] | None) -> bool:
    """Whether a notification with this envelope is reported (test sends are not)."""
    return not (tracking and tracking.get("t"))


def journey_dimension(journey: str, version: Any) -> str:
    """A report key's journey: the journey's id, then ``#`` and its version when known (a name
    has no ``#``). So counts are per journey version with no tenth dimension, and a key from
    before (or of no journey) is the id alone, version 0; `split_journey` undoes it."""
    return f"{journey}#{version}" if journey and isinstance(version, int) and version > 0 else journey


def split_journey(dimension: str) -> tuple[str, int]:
    """A report key's journey and its version (0: unknown)."""
    journey, _, version = dimension.partition("#")
    return journey, int(version) if version.isdigit() else 0


def envelope_key(tracking: dict[str, Any] | None) -> tuple[str, int, str, str] | None:
    """The message, version, journey (`journey_dimension`: with the envelope's ``jv``) and node
    a notification with this envelope is counted under (None: not counted, a test send's)."""
    if not counted(tracking):
        return None
    tracking = tracking or {}
    version = tracking.get("v", 0)
    return (str(tracking.get("m", "")), version if isinstance(version, int) else 0,
            journey_dimension(str(tracking.get("j", "")), tracking.get("jv")), str(tracking.get("n", "")))


class ReportEvent(msgspec.Struct, frozen=True, kw_only=True):
    #: One of `METRICS` (``unique_opened`` is counted here, from ``opened``).
    outcome: str
    #: The sandbox it happened in.
    sandbox: str = "default"
    app: str = ""
    platform: str = ""
    reason: str = ""
    message: str = ""
    version: int = 0
    journey: str = ""
    node: str = ""
    #: The identity an interaction came from (for unique opens); not a dimension.
    profile: str = ""


#: (sandbox, message, version, journey, node, app, platform, outcome, reason); stored in the
#: sandbox's own databases without its first element.
ReportKey = tuple[str, str, int, str, str, str, str, str, str]
#: An ``opened`` that may be the profile's first for its message: (the ``unique_opened`` key,
#: the identity).
Candidate = tuple[ReportKey, str]

_key_encoder = msgspec.msgpack.Encoder()
_key_decoder = msgspec.msgpack.Decoder(tuple[str, int, str, str, str, str, str, str])


def _key(event: ReportEvent) -> ReportKey:
    return (event.sandbox, event.message, event.version, event.journey, event.node, event.app, event.platform,
            event.outcome, event.reason)


def _unique_key(key: ReportKey, pid: bytes) -> bytes:
    """Who opened what: the message, version, journey and node, and the profile."""
    return _key_encoder.encode(key[1:5]) + pid


def _by_sandbox(counts: Mapping[ReportKey, int]) -> dict[str, dict[ReportKey, int]]:
    out: dict[str, dict[ReportKey, int]] = {}
    for key, n in counts.items():
        out.setdefault(key[0], {})[key] = n
    return out


def add_counts(w: Writer, counts: Mapping[ReportKey, int], minute: int, candidates: list[Candidate],
               keep_after: int) -> Counter[ReportKey]:
    """Store op: count the ``candidates`` that are first opens (returned, as ``unique_opened``
    counts), then add everything to the all-time counters and to ``minute`` 's live counts;
    live counts of minutes before ``keep_after`` are deleted. Every key is of the sandbox
    the op runs in (`sandboxes.Space.write`)."""
    uniques: Counter[ReportKey] = Counter()
    seen = w.dbs["uniques"]
    for key, identity in candidates:
        pid = w.pid(identity)
        if pid is None:  # no such profile (deleted since): an open, not a unique one
            continue
        marker = _unique_key(key, pid)
        if w.txn.get(marker, db=seen) is None:
            w.txn.put(marker, b"", db=seen)
            uniques[key] += 1
    db, live = w.dbs["reports"], w.dbs["live"]
    prefix = minute.to_bytes(4, "big")

    def add(key: bytes, n: int, db: Any) -> None:
        old = w.txn.get(key, db=db)
        w.txn.put(key, (n + (int.from_bytes(old, "big") if old else 0)).to_bytes(8, "big"), db=db)

    for key, n in itertools.chain(counts.items(), uniques.items()):
        raw = _key_encoder.encode(key[1:])
        add(raw, n, db)
        add(prefix + raw, n, live)
    cursor = w.txn.cursor(db=live)
    limit = keep_after.to_bytes(4, "big")
    while cursor.first() and cursor.key()[:4] < limit:
        cursor.delete()
    return uniques


def store_counts(w: Writer, counts: Mapping[ReportKey, int], minute: int) -> None:
    """Store op (alone, or a step of another op, in its transaction): add ``counts`` of
    notifications to the all-time counters and to ``minute`` 's live counts. The caller shows
    them in the live view once committed (`Reporting.counted`)."""
    if counts:
        add_counts(w, counts, minute, [], minute - Reporting.LIVE_MINUTES + 1)


def count_targeted(counts: Counter[ReportKey], jobs: list[DeliveryJob]) -> None:
    """Add to ``counts`` a ``targeted`` count for each job (none for a test send's)."""
    for job in jobs:
        head = envelope_key(job.tracking)
        if head is not None:
            counts[(job.app.sandbox, *head, job.app.app, job.platform, "targeted", "")] += 1


def count_outcomes(counts: Counter[ReportKey], jobs: list[DeliveryJob], results: list[DeliveryResult]) -> None:
    """Add to ``counts`` the report counts of delivered jobs: ``sent``, then ``delivered`` or
    ``failed`` (and ``bounced`` for a dead token), with the message and journey of each job's
    tracking envelope (none for a test send's)."""
    last: Any = ()
    head = None
    for job, result in zip(jobs, results):
        if job.tracking is not last:  # a send's jobs share their envelope
            last = job.tracking
            head = envelope_key(last)
        if head is None:
            continue
        where = (job.app.sandbox, *head, job.app.app, job.platform)
        counts[(*where, "sent", "")] += 1
        if result.status == "sent":
            counts[(*where, "delivered", "")] += 1
        else:
            counts[(*where, "failed", result.reason or "")] += 1
            if result.status == "invalid":
                counts[(*where, "bounced", result.reason or "")] += 1


class Reporting(Actor):
    """Counts the interactions the app reports, and shows every count in the live view; see
    the module docstring.

    Args:
        store: where the all-time counters are kept (None: in memory only).
        clock: seconds since the epoch, for the live buckets.
    """

    LIVE_MINUTES = 24 * 60

    def __init__(self, store: ProfileStore | None = None, *, clock: Callable[[], float] = time.time, mailbox_size: int = 4096) -> None:
        super().__init__("reporting", mailbox_size)
        self.store = store
        self.clock = clock
        #: Per minute (epoch minutes) of the last 24 hours.
        self.live: dict[int, Counter[ReportKey]] = {}
        self.counts: Counter[tuple[str, str]] = Counter()
        self.store_failures = 0
        #: Batches counted so far, and an event set at each (watchers wait on it).
        self.changes = 0
        self.changed = trio.Event()
        self._opened: set[bytes] = set()  # first opens without a store

    async def record_many(self, events: list[ReportEvent]) -> None:
        """Record ``events`` (the push interactions of an ingested batch) as one mailbox item."""
        if events:
            await self.send(events)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._load_live()
        task_status.started()
        while items := await self.receive_batch(4096):
            batch: Counter[ReportKey] = Counter()
            candidates: list[Candidate] = []
            for item in items:
                for event in item:
                    key = _key(event)
                    batch[key] += 1
                    if event.outcome == "opened" and event.profile:
                        candidates.append((key[:7] + ("unique_opened", ""), event.profile))
            minute = self.minute()
            uniques = await self._store(batch, minute, candidates)
            batch.update(uniques)
            self.counted(batch, minute)

    def minute(self) -> int:
        """The current minute of the live view (epoch minutes), to store counts under."""
        return int(self.clock() // 60)

    def counted(self, counts: Mapping[ReportKey, int], minute: int) -> None:
        """Show counts stored under ``minute`` in the live view, and wake the report watches."""
        if not counts:
            return
        for key, n in counts.items():
            self.counts[(key[7], key[8])] += n
        bucket = self.live.get(minute)
        if bucket is None:
            bucket = self.live[minute] = Counter()
            for old in [m for m in self.live if m <= minute - self.LIVE_MINUTES]:
                del self.live[old]
        bucket.update(counts)
        self.changes += 1
        self.wake()

    async def record_counts(self, counts: Mapping[ReportKey, int]) -> None:
        """Store counts in a commit of their own, then show them (``push.send`` 's: no outbox
        to commit them with). Counts the store fails to write are logged, and shown in the live
        view only."""
        if not counts:
            return
        minute = self.minute()
        if self.store is not None:
            for sandbox, part in _by_sandbox(counts).items():
                try:
                    await self.store.space(sandbox).write(store_counts, part, minute)
                except ServerError as exc:
                    self.store_failures += 1
                    log.error("could not store %d report counts: %s", len(part), exc)
        self.counted(counts, minute)

    def wake(self) -> None:
        """Wake whoever waits for a change (report watches)."""
        self.changed.set()
        self.changed = trio.Event()

    async def _store(self, batch: Counter[ReportKey], minute: int, candidates: list[Candidate]) -> Counter[ReportKey]:
        """Store the batch; the first opens among the candidates."""
        if self.store is None:
            uniques: Counter[ReportKey] = Counter()
            for key, identity in candidates:
                marker = _unique_key(key, identity.encode())
                if marker not in self._opened:
                    self._opened.add(marker)
                    uniques[key] += 1
            return uniques
        uniques = Counter()
        for sandbox, part in _by_sandbox(batch).items():
            mine = [c for c in candidates if c[0][0] == sandbox]
            try:
                uniques.update(await self.store.space(sandbox).write(
                    add_counts, part, minute, mine, minute - self.LIVE_MINUTES + 1))
            except ServerError as exc:  # the live view still has them
                self.store_failures += 1
                log.error("could not store %d report counts (%d possible first opens not counted): %s", len(part),
                          len(mine), exc)
        return uniques

    def _load_live(self) -> None:
        """The live counts of the last 24 hours, as stored (they survive restarts)."""
        if self.store is None:
            return
        since = int(self.clock() // 60) - self.LIVE_MINUTES
        live: dict[int, Counter[ReportKey]] = {}
        with self.store.env.begin() as txn:
            for space in self.store.spaces():
                for raw, value in txn.cursor(db=space.db("live")):
                    minute = int.from_bytes(raw[:4], "big")
                    if minute > since:
                        key = (space.name, *_key_decoder.decode(raw[4:]))
                        live.setdefault(minute, Counter())[key] = int.from_bytes(value, "big")  # type: ignore[index]
        self.live = live

    # -- queries ----------------------------------------------------------------------------

    def live_counts(self, minutes: int = LIVE_MINUTES) -> list[tuple[int, Counter[ReportKey]]]:
        """(epoch minute, counts) of the last ``minutes`` minutes, oldest first."""
        since = int(self.clock() // 60) - minutes
        return sorted((m, c) for m, c in self.live.items() if m > since)

    def all_time(self, sandbox: str) -> Counter[ReportKey]:
        """The all-time counts of ``sandbox``."""
        if self.store is None:
            total: Counter[ReportKey] = Counter()
            for _, bucket in self.live_counts():
                total.update({key: n for key, n in bucket.items() if key[0] == sandbox})
            return total
        out: Counter[ReportKey] = Counter()
        space = self.store.space(sandbox)
        with space.env.begin() as txn:
            for raw, value in txn.cursor(db=space.db("reports")):
                out[(sandbox, *_key_decoder.decode(raw))] = int.from_bytes(value, "big")  # type: ignore[index]
        return out

    def report(self, query: api.GetReport | api.WatchReport, sandbox: str = "default") -> api.Report:
        """The counts of ``sandbox`` that match the query's filters, totalled and grouped."""
        filters = [(i, value) for i, value in enumerate((sandbox, query.message, query.version, None,
                                                          query.node, query.app, query.platform)) if value is not None]
        journeys = query.journey, query.journey_version

        def add(counts: Counter[ReportKey]) -> None:
            for key, n in counts.items():
                if any(key[i] != value for i, value in filters) or not _journey_matches(key[3], *journeys):
                    continue
                _, _, _, dimension, _, app, platform, outcome, reason = key
                journey = split_journey(dimension)[0]
                out.totals[outcome] = out.totals.get(outcome, 0) + n
                if reason:
                    per = out.reasons.setdefault(outcome, {})
                    per[reason] = per.get(reason, 0) + n
                # Every count in one row of each: "" holds those without (no journey; an
                # exclusion has no platform, an interaction the app reported without them neither).
                for group, name in ((out.by_platform, platform), (out.by_app, app), (out.by_journey, journey)):
                    row = group.setdefault(name, {})
                    row[outcome] = row.get(outcome, 0) + n

        out = api.Report(window=query.window)
        if query.window == "live":
            for minute, counts in self.live_counts():
                before = dict(out.totals)
                add(counts)
                delta = {k: v - before.get(k, 0) for k, v in out.totals.items() if v != before.get(k, 0)}
                if delta:
                    out.minutes.append(api.MinuteCounts(start=from_us(minute * 60_000_000), counts=delta))
        else:
            add(self.all_time(sandbox))
        delivered = out.totals.get("delivered", 0)
        if delivered:
            out.open_rate = round(out.totals.get("unique_opened", 0) / delivered, 4)
        return out

    def details(self) -> dict[str, Any]:
        totals: Counter[str] = Counter()
        reasons: dict[str, int] = {}
        for (outcome, reason), n in self.counts.items():
            totals[outcome] += n
            if reason:
                reasons[f"{outcome}:{reason}"] = n
        return {"outcomes": dict(totals), "reasons": reasons}


def _journey_matches(dimension: str, journey: str | None, version: int | None) -> bool:
    """Whether a key's journey (`journey_dimension`) passes the ``journey`` and
    ``journey_version`` filters."""
    if journey is None and version is None:
        return True
    id, of = split_journey(dimension)
    return (journey is None or id == journey) and (version is None or of == version)
