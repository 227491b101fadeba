"""Ingestion: validates experience-event batches and feeds them to the store.

`decode_batch` checks every event on its own, so one bad event is reported by its index and
its neighbours are still accepted. Before a batch is decoded it takes its share of the
admission budget (`server.profiles.budget`), its event count read from the body's first
bytes (`peek_event_count`): when the store is behind, the call is refused at once with a retry
hint, at the cost of a few bytes read; an admitted batch gives its share back once the store
has committed it. The actor takes every validated batch waiting in its
mailbox and hands them to the store as one write op (many small ingest calls, one nested
transaction); when the store has committed, each caller gets its own result and the journeys
engine is told how far the committed event log now reaches.

An event may carry a client id: the store op (`server.profiles.writes.ingest_events_once`)
leaves out each event whose id its sandbox stored within ``dedupe_window_us``, in the same
transaction that logs the others, and the caller is told their indexes (``duplicates``). An
event left out is not logged, so neither the journeys engine nor the reports see it again.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any

import msgspec
import trio

from protocols import api

from server.profiles.budget import DecodeLane, IngestBudget
from server.runtime.actor import Actor, Future
from server.runtime.errors import InvalidArgument, ServerError
from server.profiles.keys import MAX_KEY_BYTES
from server.runtime.values import MAX_VALUE_DEPTH, check_depth, to_us
from server.reports.interactions import push_interactions
from server.reports.reporting import ReportEvent
from server.profiles.sandboxes import DEFAULT, Space
from server.profiles.store import InEvent, ProfileStore, WriteOp
from server.profiles.writes import ingest_events_once

log = logging.getLogger("pigeon.ingest")

__all__ = [
    "Ingestion", "decode_batch", "decode_batch_ids", "peek_event_count", "MAX_EVENT_DATA_BYTES", "MAX_FUTURE_SKEW_US",
]

#: Largest encoded ``data`` map of one event.
MAX_EVENT_DATA_BYTES = 64 * 1024
#: How far in the future an event's timestamp may be (clock skew allowance): 5 minutes.
MAX_FUTURE_SKEW_US = 5 * 60 * 1_000_000

_EMPTY_MAP = msgspec.Raw(b"\x80")


class _InEvent(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    identity: api.Identity
    type: api.EventType
    ts: api.Timestamp | None = None
    data: msgspec.Raw = _EMPTY_MAP
    id: api.EventId | None = None


class _Batch(msgspec.Struct, forbid_unknown_fields=True):
    events: Annotated[list[_InEvent], msgspec.Meta(max_length=api.MAX_EVENTS_PER_BATCH)]


class _LooseBatch(msgspec.Struct, forbid_unknown_fields=True):
    events: Annotated[list[msgspec.Raw], msgspec.Meta(max_length=api.MAX_EVENTS_PER_BATCH)]


_batch_decoder = msgspec.msgpack.Decoder(_Batch)
_loose_decoder = msgspec.msgpack.Decoder(_LooseBatch)
_event_decoder = msgspec.msgpack.Decoder(_InEvent)


#: Event data is checked as attributes are: decoded as they are (which checks timestamps),
#: then `check_depth`. The encoded map is what is stored.
_data_decoder = msgspec.msgpack.Decoder(dict[str, Any])
_data_keys = msgspec.msgpack.Decoder(dict[str, msgspec.Raw])


def _data_problem(raw: msgspec.Raw, index: int) -> tuple[str, str] | None:
    """What makes the encoded ``data`` of event ``index`` unfit to store, as ``(message, field)``."""
    # Paths start at "$" and become the event's only when there is a problem: most events
    # have none, and building their path costs as much as checking their data.
    try:
        check_depth(_data_decoder.decode(raw), "$", "data")
        return None
    except msgspec.DecodeError as exc:
        try:
            _data_keys.decode(raw)
        except msgspec.DecodeError:
            message, path = "$: data's keys must be strings", "$"
        else:
            message, found = api.describe_validation_error(str(exc))
            path = found or "$"
    except InvalidArgument as exc:
        message, path = f"{exc.field}: {exc.message}", exc.field or "$"
    except RecursionError:
        message, path = f"$: data nest deeper than {MAX_VALUE_DEPTH} levels", "$"
    field = f"$.events[{index}].data{path[1:]}"
    return field + message[len(path) :], field


_EVENTS_KEYS = (b"\xa6events", b"\xd9\x06events", b"\xda\x00\x06events", b"\xdb\x00\x00\x00\x06events")
#: Encoded bytes of the smallest event (``{"identity": "a:b", "type": "a.b"}``), nearly.
_MIN_EVENT_BYTES = 16


def peek_event_count(body: bytes | msgspec.Raw) -> int:
    """The number of events in an ``events.ingest`` body, from its first bytes only.

    A body is a map of one key, ``events``, holding an array: its count is read from the
    array's header. For any other shape (invalid, or encoded unusually), an upper bound from
    its size, at most `api.MAX_EVENTS_PER_BATCH`; decoding tells the rest.
    """
    view = memoryview(body)
    head = bytes(view[:24])
    bound = min(api.MAX_EVENTS_PER_BATCH, max(1, len(view) // _MIN_EVENT_BYTES))
    if head[:1] == b"\x81":
        at = 1
    elif head[:3] == b"\xde\x00\x01":
        at = 3
    elif head[:5] == b"\xdf\x00\x00\x00\x01":
        at = 5
    else:
        return bound
    for key in _EVENTS_KEYS:
        if head.startswith(key, at):
            at += len(key)
            break
    else:
        return bound
    kind = head[at : at + 1]
    if kind and 0x90 <= kind[0] <= 0x9F:
        return kind[0] - 0x90
    if kind == b"\xdc" and len(head) >= at + 3:
        return min(bound, int.from_bytes(head[at + 1 : at + 3], "big"))
    if kind == b"\xdd" and len(head) >= at + 5:
        return min(bound, int.from_bytes(head[at + 1 : at + 5], "big"))
    return bound


def _is_map(raw: msgspec.Raw) -> bool:
    view = memoryview(raw)
    return len(view) > 0 and (0x80 <= view[0] <= 0x8F or view[0] in (0xDE, 0xDF))


def _rejection(index: int, exc: msgspec.DecodeError) -> api.Rejection:
    """Describe a bad event with paths relative to the batch (``$.events[3].type``)."""
    prefix = f"$.events[{index}]"
    message, field = api.describe_validation_error(str(exc))
    if field is None:
        return api.Rejection(index=index, code="INVALID_ARGUMENT", message=f"{prefix}: {message}", field=prefix)
    full = prefix + field[1:]
    return api.Rejection(index=index, code="INVALID_ARGUMENT", message=full + message[len(field) :], field=full)


def _decode_events(body: bytes | msgspec.Raw) -> tuple[Sequence[_InEvent | None], list[api.Rejection]]:
    """The batch's events (None for each one that does not decode) and the rejections of those."""
    try:
        return _batch_decoder.decode(body).events, []
    except msgspec.ValidationError:
        pass
    except msgspec.DecodeError as exc:
        raise InvalidArgument(f"not an event batch: {exc}") from None
    try:
        raws = _loose_decoder.decode(body).events
    except msgspec.DecodeError as exc:
        message, field = api.describe_validation_error(str(exc))
        raise InvalidArgument(f"not an event batch: {message}", field=field) from None
    events: list[_InEvent | None] = []
    rejected = []
    for index, raw in enumerate(raws):
        try:
            events.append(_event_decoder.decode(raw))
        except msgspec.DecodeError as exc:
            events.append(None)
            rejected.append(_rejection(index, exc))
    return events, rejected


def decode_batch(
    body: bytes | msgspec.Raw, *, now_us: int, retention_us: int
) -> tuple[list[InEvent], list[api.Rejection]]:
    """Decode and check an ``events.ingest`` body.

    Returns the accepted events (identity, type, µs timestamp, encoded data) and a rejection
    per bad event, by index. Raises `InvalidArgument` only when the body as a whole is not a
    batch (not a map with an ``events`` list).
    """
    accepted, _, rejected = decode_batch_ids(body, now_us=now_us, retention_us=retention_us)
    return accepted, rejected


def decode_batch_ids(
    body: bytes | msgspec.Raw, *, now_us: int, retention_us: int
) -> tuple[list[InEvent], list[str | None] | None, list[api.Rejection]]:
    """`decode_batch`, and the client id of each accepted event (None for an event without
    one; None for all when none has one)."""
    try:
        events, rejected = _decode_events(body)
    except RecursionError:
        # Too deep for msgspec even to skip over: no event of it can be told apart.
        raise InvalidArgument(
            f"not an event batch: it nests far deeper than the {MAX_VALUE_DEPTH} levels event data may",
            field="$.events",
        ) from None
    accepted: list[InEvent] = []
    ids: list[str | None] | None = None
    oldest = max(0, now_us - retention_us)  # no event is older than 1970
    newest = now_us + MAX_FUTURE_SKEW_US
    for index, event in enumerate(events):
        if event is None:
            continue
        problem = None
        if event.ts is None:
            ts = now_us
        else:
            ts = to_us(event.ts)
            if ts > newest:
                problem = ("OUT_OF_RANGE", "ts is more than 5 minutes in the future", "ts")
            elif ts < oldest:
                days = retention_us / 86_400_000_000
                problem = ("OUT_OF_RANGE", f"ts is older than the retention window of {days:g} days", "ts")
        if problem is None:
            if not _is_map(event.data):
                problem = ("INVALID_ARGUMENT", "data must be a map", "data")
            elif (size := memoryview(event.data).nbytes) > MAX_EVENT_DATA_BYTES:
                problem = (
                    "INVALID_ARGUMENT",
                    f"data is {size} bytes encoded; the limit is {MAX_EVENT_DATA_BYTES}",
                    "data",
                )
            elif len(event.identity.encode()) > MAX_KEY_BYTES:
                problem = ("INVALID_ARGUMENT", f"identity is longer than {MAX_KEY_BYTES} bytes", "identity")
        if problem is not None:
            code, message, name = problem
            field = f"$.events[{index}].{name}"
            rejected.append(api.Rejection(index=index, code=code, message=f"{field}: {message}", field=field))
            continue
        if bad := _data_problem(event.data, index):
            message, field = bad
            rejected.append(api.Rejection(index=index, code="INVALID_ARGUMENT", message=message, field=field))
            continue
        if event.id is not None and ids is None:
            ids = [None] * len(accepted)
        if ids is not None:
            ids.append(event.id)
        accepted.append((event.identity, event.type, ts, event.data))
    rejected.sort(key=lambda r: r.index)
    return accepted, ids, rejected


class _Job:
    __slots__ = ("events", "ids", "rejected", "future", "space", "duplicates")

    def __init__(
        self, events: list[InEvent], rejected: list[api.Rejection], space: Space | None = None,
        ids: list[str | None] | None = None,
    ) -> None:
        self.events = events
        self.ids = ids
        self.rejected = rejected
        self.space = space
        self.future: Future[api.IngestResult] = Future()
        #: The positions in ``events`` of those not stored (their ids were), once committed.
        self.duplicates: list[int] = []

    def batch_indexes(self, positions: list[int]) -> list[int]:
        """The indexes in the batch of the accepted events at these ``positions``."""
        if not self.rejected or not positions:
            return positions
        refused = {r.index for r in self.rejected}
        indexes = [i for i in range(len(self.events) + len(refused)) if i not in refused]
        return [indexes[p] for p in positions]


def _groups(jobs: list[_Job], limit: int) -> list[list[_Job]]:
    """Consecutive jobs, grouped so that a group holds at most ``limit`` events (or one job),
    all of one sandbox."""
    groups: list[list[_Job]] = [[]]
    size = 0
    for job in jobs:
        if groups[-1] and (size + len(job.events) > limit or job.space is not groups[-1][0].space):
            groups.append([])
            size = 0
        groups[-1].append(job)
        size += len(job.events)
    return groups


class Ingestion(Actor):
    """Validates event batches and forwards them to the store, coalescing concurrent batches.

    Args:
        store: where events are written.
        on_committed: called with the last committed sequence number after each commit
            (the journeys engine's trigger).
        clock: current time in µs.
        retention_us: events older than this are refused.
        max_coalesce: most batches merged into one store op.
        budget: the admission budget of batches waiting for the store (default: 50,000
            events, 32 MiB).
        dedupe_window_us: an event whose client id an event of its sandbox stored less than
            this long ago is not stored again (0: ids are not remembered).
    """

    def __init__(
        self,
        store: ProfileStore,
        *,
        on_committed: Callable[[int, int], None],
        clock: Callable[[], int],
        retention_us: int,
        mailbox_size: int = 256,
        max_coalesce: int = 64,
        on_interactions: Callable[[list[ReportEvent]], Awaitable[None]] | None = None,
        budget: IngestBudget | None = None,
        dedupe_window_us: int = 86_400 * 1_000_000,
    ) -> None:
        super().__init__("ingestion", mailbox_size)
        self.budget = budget if budget is not None else IngestBudget(max_events=50_000, max_bytes=32 << 20)
        self.lane = DecodeLane(self.budget)
        self.store = store
        self.on_committed = on_committed
        self.clock = clock
        self.retention_us = retention_us
        self.max_coalesce = max_coalesce
        self.dedupe_window_us = dedupe_window_us
        #: Called with the push interactions of each stored batch (reporting).
        self.on_interactions = on_interactions
        self.interactions_lost = 0
        self.accepted = 0
        self.rejected = 0
        self.duplicates = 0
        self.batches = 0
        self.store_ops = 0

    async def ingest(self, body: bytes | msgspec.Raw, space: Space | None = None) -> api.IngestResult:
        """Validate a raw ``events.ingest`` body, store what is valid in ``space`` (None:
        sandbox ``default``), return once durable.

        Raises:
            ResourceExhausted: the admission budget is spent (with a retry hint); nothing was
                stored.
        """
        # Taken before decoding, given back when the store has answered: a caller that leaves
        # (a deadline) after handing its batch over does not take its events out of the
        # store's queue, so they still count.
        ticket = self.budget.admit(peek_event_count(body), memoryview(body).nbytes)
        try:
            async with self.lane.turn():
                events, ids, rejected = decode_batch_ids(body, now_us=self.clock(), retention_us=self.retention_us)
            self.rejected += len(rejected)
            if not events:
                ticket.release()
                return api.IngestResult(accepted=0, rejected=rejected)
            ticket.resize(len(events))
            job = _Job(events, rejected, space, ids)
            job.future.on_done(lambda done: ticket.release(committed=not done.failed))
            await self.send(job)
        except BaseException:
            ticket.release()  # the batch was not handed over (a send cancelled sends nothing)
            raise
        result = await job.future.wait()
        if job.duplicates:
            skipped = set(job.duplicates)
            events = [event for position, event in enumerate(events) if position not in skipped]
        if self.on_interactions is not None:
            interactions = push_interactions(events, space.name if space is not None else DEFAULT)
            if interactions:
                try:
                    await self.on_interactions(interactions)
                except ServerError as exc:  # the events are stored: the call succeeded all the same
                    self.interactions_lost += len(interactions)
                    log.warning("%d push interactions not counted: %s", len(interactions), exc)
        return result

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while jobs := await self.receive_batch(self.max_coalesce):
            for group in _groups(jobs, self.store.max_commit_events):
                op = WriteOp(ingest_events_once, [job.events for job in group], [job.ids for job in group],
                             self.dedupe_window_us, weight=sum(len(j.events) for j in group), space=group[0].space)
                op.future.on_done(functools.partial(self._committed, group))
                await self.store.send(op)
                # The store now holds the op; its outcome resolves the jobs.
                self._in_hand = self._in_hand[len(group) :]
                self.batches += len(group)
                self.store_ops += 1

    def _committed(self, jobs: list[_Job], done: Future[list[tuple[int, list[int]]]]) -> None:
        try:
            outcomes = done.result()
        except BaseException as exc:
            for job in jobs:
                job.future.fail(exc)
            return
        count = 0
        for job, (last, duplicates) in zip(jobs, outcomes):
            stored = len(job.events) - len(duplicates)
            count += stored
            job.duplicates = duplicates
            self.duplicates += len(duplicates)
            job.future.set(api.IngestResult(accepted=stored, rejected=job.rejected, last_seq=last,
                                            duplicates=job.batch_indexes(duplicates)))
        self.accepted += count
        if count:  # a batch of duplicates only logs nothing
            self.on_committed(max(last for last, _ in outcomes), count)

    def details(self) -> dict[str, Any]:
        return {
            "events_accepted": self.accepted,
            "events_rejected": self.rejected,
            "events_duplicate": self.duplicates,
            "batches": self.batches,
            "store_ops": self.store_ops,
            "budget": msgspec.structs.asdict(self.budget.statistics()),
            "decodes_paced": self.lane.paced,
        }
