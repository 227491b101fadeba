"""The send pipeline's outbox: executions as stored, staged notifications, settling, replay.

Durability: an execution is stored when it starts (``executions``). Each batch of profiles
(50 at first, doubling up to 500) is staged in one commit: its notifications go into the
outbox (``outbox``), the execution's cursor moves past the batch, and its ``targeted`` and
``excluded`` counts go into the reports. They are then delivered, and settled as their results come,
in commits of their own (each takes the notifications whose results came meanwhile): out of
the outbox, their outcomes added to the execution's counts and to the reports. So a batch's
successes are settled at once while its failures are being retried (a 503 storm does not make
a batch wait for its slowest member), and a notification's outcome is stored in the same
commit that takes it out of the outbox: exactly one outcome each. The pipeline
(`server.messages.pipeline`) bounds what is staged and not settled. After a crash (or a stop) the server, when it starts, delivers
again what the outbox still holds, batch by batch, each settled as above (these may reach
the provider twice: each is counted as ``replayed``, in a commit before it goes out), then
resumes the executions from their cursors. So, whenever crashes happen, every targeted
profile is staged and counted exactly once, each notification has exactly one outcome in the
reports, and the notifications sent twice are at most those staged and not settled at each
crash.

Databases: ``executions``, the execution id (8 bytes) -> `ExecutionRecord`; ``outbox``, the
execution id + batch (u32 BE) + index (u32 BE) -> `OutboxEntry` (a batch's entries are
together, in order).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from protocols import api
from server.channels import AppRecord, DeliveryJob, DeliveryResult
from server.delivery.apps import get_app
from server.delivery.sender import Progress
from server.profiles.sandboxes import Space
from server.profiles import pushlog
from server.profiles.store import Writer
from server.reports.reporting import ReportKey, count_outcomes, envelope_key, store_counts

if TYPE_CHECKING:
    from server.runtime.app import Server

__all__ = [
    "ExecutionRecord", "OutboxEntry", "Outcomes", "outbox_key", "encode_entry", "decode_execution", "stage_batch",
    "settle_batch", "end_execution", "deliver_batch", "replay", "leftovers", "executions", "Watcher",
]

log = logging.getLogger("pigeon.pipeline")


class ExecutionRecord(msgspec.Struct, kw_only=True):
    """A send in progress, as stored: enough to resume it."""

    execution: str
    message: str
    version: int
    identities: list[str] = []
    audience: str | None = None
    test: bool = False
    event: dict[str, Any] = {}
    #: Identities staged so far, or the last profile id staged (audiences).
    cursor: int = 0
    after: bytes | None = None
    batches: int = 0
    result: api.SendResult


class OutboxEntry(msgspec.Struct, array_like=True):
    """A notification staged for delivery."""

    app: str
    token: str
    platform: str
    content: api.PushContent | None
    apns: api.ApnsOptions
    fcm: api.FcmOptions
    tracking: dict[str, Any]
    #: The profile it goes to (empty: not known; `server.profiles.pushlog`).
    profile: bytes = b""


class _Settled(msgspec.Struct):
    """The part of a stored execution only settles change: its outcomes' counts (decoding it
    skips the identities)."""

    result: api.SendResult


_encoder = msgspec.msgpack.Encoder()
_execution_decoder = msgspec.msgpack.Decoder(ExecutionRecord)
_settled_decoder = msgspec.msgpack.Decoder(_Settled)
_entry_decoder = msgspec.msgpack.Decoder(OutboxEntry)


def outbox_key(execution: str, batch: int, index: int) -> bytes:
    return bytes.fromhex(execution) + batch.to_bytes(4, "big") + index.to_bytes(4, "big")


def stage_batch(w: Writer, state: ExecutionRecord, entries: list[tuple[bytes, bytes]], counts: Counter[ReportKey],
                minute: int) -> None:
    """Store op: the batch's notifications into the outbox, the execution past the batch, and
    the batch's ``targeted`` and ``excluded`` counts into the reports (under ``minute``).

    ``state`` is the execution as the pipeline has it, a copy this op may change: its outcome
    counts are replaced by the stored ones, which only settles change (a batch settled while
    this one was being prepared has added its own)."""
    key = bytes.fromhex(state.execution)
    db = w.dbs["executions"]
    stored = w.txn.get(key, db=db)
    if stored is not None:
        settled = _settled_decoder.decode(stored).result
        result = state.result
        result.sent, result.delivered, result.bounced, result.failed = (
            settled.sent, settled.delivered, settled.bounced, settled.failed)
    w.txn.put(key, _encoder.encode(state), db=db)
    for entry_key, value in entries:
        w.txn.put(entry_key, value, db=w.dbs["outbox"])
    store_counts(w, counts, minute)


def settle_batch(w: Writer, outcomes: Outcomes, execution: str, keys: list[bytes], counts: Counter[ReportKey],
                 minute: int, delivered: Sequence[tuple[bytes, str]] = ()) -> None:
    """Store op: the batch delivered: out of the outbox, its outcomes added to the execution's
    counts, its report counts (``sent``, ``delivered``, ...) into the reports, and the profiles
    ``delivered`` to (ids, with the push: `pushlog.push_of`) into their push logs (frequency
    caps count them).

    Only the batch's own outcomes are added: the cursor, and the counts of the profiles
    staged, are the staging's alone (a batch settled while the next one is being prepared
    must store neither a cursor past profiles not in the outbox yet, nor their counts)."""
    for key in keys:
        w.txn.delete(key, db=w.dbs["outbox"])
    key = bytes.fromhex(execution)
    stored = w.txn.get(key, db=w.dbs["executions"])
    if stored is not None:
        record = _execution_decoder.decode(stored)
        outcomes.add_to(record.result)
        w.txn.put(key, _encoder.encode(record), db=w.dbs["executions"])
    store_counts(w, counts, minute)
    for pid, push in delivered:
        pushlog.log(w, pid, w.now, push)


def end_execution(w: Writer, execution: str) -> None:
    """Store op: the execution ended (each of its batches settled)."""
    w.txn.delete(bytes.fromhex(execution), db=w.dbs["executions"])


#: A batch's results are settled once this many came (a whole batch), or this long after the
#: first one came: with a healthy provider a batch settles in one or two commits, as it did
#: when it settled once (each settle rewrites the execution and the report counters).
_SETTLE_AT_ONCE = 500
_SETTLE_WAIT_S = 0.05


class Watcher:
    """Who follows a batch's delivery (the pipeline, to bound what is staged and not settled)."""

    def settled(self, outcomes: Outcomes, count: int) -> None:
        """``count`` more of the batch's notifications were settled (committed), with ``outcomes``."""

    def waiting(self, delta: int) -> None:
        """``delta`` more (or fewer) of them wait for a retry."""


class _Settling(Progress):
    """The results the delivery told, not settled yet."""

    __slots__ = ("ready", "wake", "watcher", "delivered")

    def __init__(self, watcher: Watcher | None) -> None:
        self.ready: list[tuple[int, DeliveryResult]] = []
        self.wake = trio.Event()
        self.watcher = watcher
        self.delivered = False

    def result(self, index: int, result: DeliveryResult) -> None:
        self.ready.append((index, result))
        self.wake.set()

    def waiting(self, delta: int) -> None:
        if self.watcher is not None:
            self.watcher.waiting(delta)


async def deliver_batch(server: Server, space: Space, execution: str, jobs: list[DeliveryJob], keys: list[bytes],
                        watcher: Watcher | None = None) -> Outcomes:
    """Deliver a staged batch, settling its notifications (`settle_batch`) as their results
    come, in a commit for those that came meanwhile, and showing their counts; its outcomes.
    ``watcher`` is told each part settled."""
    outcomes = Outcomes()
    if not jobs:
        await _settle(server, space, execution, jobs, keys, [], outcomes, watcher)
        return outcomes
    settling = _Settling(watcher)

    async def deliver() -> None:
        try:
            await server.delivery.deliver_each(jobs, settling)
        finally:
            settling.delivered = True
            settling.wake.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(deliver)
        while settling.ready or not settling.delivered:
            if not settling.ready:
                await settling.wake.wait()
                settling.wake = trio.Event()
                continue
            # A moment for more results: fewer, larger commits (each rewrites the execution).
            with trio.move_on_after(_SETTLE_WAIT_S):
                while not settling.delivered and len(settling.ready) < _SETTLE_AT_ONCE:
                    settling.wake = trio.Event()
                    await settling.wake.wait()
            chunk, settling.ready = settling.ready, []
            await _settle(server, space, execution, jobs, keys, chunk, outcomes, watcher)
    return outcomes


async def _settle(server: Server, space: Space, execution: str, jobs: list[DeliveryJob], keys: list[bytes],
                  chunk: list[tuple[int, DeliveryResult]], outcomes: Outcomes, watcher: Watcher | None) -> None:
    """Settle ``chunk``, results of ``jobs`` by index (one commit), add them to ``outcomes``."""
    part = Outcomes()
    counts: Counter[ReportKey] = Counter()
    for _, result in chunk:
        part.count(result)
    count_outcomes(counts, [jobs[i] for i, _ in chunk], [result for _, result in chunk])
    minute = server.reporting.minute()
    delivered = [(jobs[i].profile, pushlog.push_of(execution, jobs[i].tracking)) for i, result in chunk
                 if result.status == "sent" and jobs[i].profile]
    await space.write(settle_batch, part, execution, [keys[i] for i, _ in chunk], counts, minute, delivered)
    server.reporting.counted(counts, minute)
    part.add_to_outcomes(outcomes)
    if watcher is not None:
        watcher.settled(part, len(chunk))


class Outcomes:
    """What became of one batch's notifications."""

    __slots__ = ("sent", "delivered", "bounced", "failed")

    def __init__(self) -> None:
        self.sent = self.delivered = self.bounced = 0
        self.failed: Counter[str] = Counter()

    def count(self, result: DeliveryResult) -> None:
        self.sent += 1
        if result.status == "sent":
            self.delivered += 1
        else:
            self.failed[result.reason or "Unknown"] += 1
            if result.status == "invalid":
                self.bounced += 1

    def add_to_outcomes(self, other: Outcomes) -> None:
        other.sent += self.sent
        other.delivered += self.delivered
        other.bounced += self.bounced
        other.failed.update(self.failed)

    def add_to(self, result: api.SendResult) -> None:
        result.sent += self.sent
        result.delivered += self.delivered
        result.bounced += self.bounced
        result.failed = dict(Counter(result.failed) + self.failed)


async def replay(server: Server, space: Space, staged: list[tuple[bytes, bytes]]) -> None:
    """Deliver a batch the outbox held again, and settle it. Its notifications are counted as
    ``replayed`` in a commit before they go out: a crash during this delivery leaves them in
    the outbox, to be delivered, and counted as replayed, again at the next start."""
    reporting = server.reporting
    jobs = []
    replayed: Counter[ReportKey] = Counter()
    for _, value in staged:
        entry = _entry_decoder.decode(value)
        app = get_app(space, entry.app) or AppRecord(app=entry.app, sandbox=space.name)
        jobs.append(DeliveryJob(app=app, token=entry.token, platform=entry.platform, content=entry.content,
                                apns=entry.apns, fcm=entry.fcm, tracking=entry.tracking, profile=entry.profile))
        head = envelope_key(entry.tracking)
        if head is not None:
            replayed[(space.name, *head, entry.app, entry.platform, "replayed", "")] += 1
    minute = reporting.minute()
    await space.write(store_counts, replayed, minute)
    reporting.counted(replayed, minute)
    await deliver_batch(server, space, staged[0][0][:8].hex(), jobs, [key for key, _ in staged])


def leftovers(store: Space, running: set[bytes]) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    """What a stop or a crash left: the outbox's entries, and the keys of the executions that
    did not end, but for the executions in ``running`` (run by this process)."""
    with store.env.begin() as txn:
        staged = [item for item in txn.cursor(db=store.db("outbox")) if item[0][:8] not in running]
        pending = [key for key, _ in txn.cursor(db=store.db("executions")) if key not in running]
    return staged, pending


def executions(store: Space, keys: list[bytes]) -> list[ExecutionRecord]:
    """The stored executions of ``keys`` that still exist."""
    with store.env.begin() as txn:
        stored = [txn.get(key, db=store.db("executions")) for key in keys]
    return [_execution_decoder.decode(value) for value in stored if value is not None]


def encode_entry(entry: OutboxEntry) -> bytes:
    return _encoder.encode(entry)


def decode_execution(value: bytes) -> ExecutionRecord:
    return _execution_decoder.decode(value)
