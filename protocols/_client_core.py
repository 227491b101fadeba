"""Parts shared by the Trio and asyncio clients: targets, body decoding, event routing."""

from __future__ import annotations

import base64
import logging
import os
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec

from . import api
from .api import METHODS, Request
from .connection import (
    ClientConnection,
    State,
    EndReceived,
    ErrorReceived,
    ItemReceived,
    PongReceived,
    ReplyReceived,
    Welcomed,
)
from .errors import (
    BatchFailed,
    CallError,
    ConnectionClosed,
    FrameTooLarge,
    MalformedFrame,
    NotPigeonServer,
    PigeonProtocolError,
    ProtocolError,
    Status,
)
from .frames import Welcome

__all__ = [
    "parse_target",
    "decoder_for",
    "response_type",
    "route_events",
    "CallSink",
    "StreamSink",
    "Abandoned",
    "abandon",
    "STREAM_WINDOW",
    "closed_error",
    "not_pigeon",
    "describe",
    "BatchBook",
    "new_event_id",
    "BatcherResults",
    "MAX_RETRY_DELAY_S",
    "ClientBase",
    "API_KEY_ENV",
    "SANDBOX_ENV",
    "api_key_or_env",
    "sandbox_or_env",
]

#: Where the clients take their API key from when they are given none.
API_KEY_ENV = "PIGEON_API_KEY"
#: Where the clients find the sandbox when none is given.
SANDBOX_ENV = "PIGEON_SANDBOX"


def sandbox_or_env(sandbox: str | None) -> str | None:
    """``sandbox``, or else the one in the environment variable ``PIGEON_SANDBOX``."""
    return sandbox if sandbox is not None else os.environ.get(SANDBOX_ENV) or None


def api_key_or_env(api_key: str | None) -> str | None:
    """``api_key``, or else the key in the environment variable ``PIGEON_API_KEY``."""
    return api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None

log = logging.getLogger("pigeon.client")

_decoders: dict[Any, msgspec.msgpack.Decoder] = {}


def decoder_for(kind: Any) -> msgspec.msgpack.Decoder:
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.msgpack.Decoder(kind)
    return decoder


def response_type(request: Request[Any]) -> Any:
    spec = METHODS.get(request.method)
    if spec is None:  # a request type defined outside this package (a plugin's method)
        return Any
    return spec.response


def parse_target(target: str) -> tuple[str, str | int]:
    """``HOST:PORT`` or ``unix:PATH`` → (host, port) or ("unix", path)."""
    if target.startswith("unix:"):
        return "unix", target[5:]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{target!r} is not HOST:PORT or unix:PATH")
    return host.strip("[]") or "127.0.0.1", int(port)


class CallSink:
    """Where the reader puts a unary call's outcome: its body, or an error.

    An outcome of None is a stream's end; `route_events` never gives it to a unary call (it
    turns such an end into an INTERNAL error).
    """

    streaming = False
    #: Called once when the call has ended on the wire: its slot (welcome.max_calls) is free.
    on_finish: Callable[[], None] | None = None

    def resolve(self, outcome: msgspec.Raw | BaseException | None) -> None:
        raise NotImplementedError

    def finish(self, outcome: msgspec.Raw | BaseException | None) -> None:
        """The call's terminal outcome: resolve it and free its slot."""
        self.resolve(outcome)
        callback, self.on_finish = self.on_finish, None
        if callback is not None:
            callback()


class Abandoned(CallSink):
    """Stands in for a call whose caller gave up: the server still counts it until it answers
    the cancel, so its slot is only freed then."""

    def __init__(self, on_finish: Callable[[], None] | None) -> None:
        self.on_finish = on_finish

    def resolve(self, outcome: msgspec.Raw | BaseException | None) -> None:
        pass


def abandon(pending: dict[int, CallSink], call_id: int) -> bool:
    """Replace a pending call by its stand-in; True if the server must be told (it was open)."""
    sink = pending.get(call_id)
    if sink is None or isinstance(sink, Abandoned):
        return False
    if isinstance(sink, StreamSink):
        sink.leave()
    pending[call_id] = Abandoned(sink.on_finish)
    sink.on_finish = None
    return True


_OPEN: Any = object()

#: Items of one stream the client is ready to buffer (sent as ``Call.window``).
STREAM_WINDOW = 64


class StreamSink(CallSink):
    """A streamed call's buffer between the reader and the consumer.

    The server sends at most ``window`` items beyond what the client has granted, so the
    reader can always append without waiting: a slow consumer of one stream never stalls the
    connection's other calls. The consumer grants credit back as it takes items (`credit_due`).
    Clients subclass it to wake their consumer (`_wake`).
    """

    streaming = True

    def __init__(self, window: int = STREAM_WINDOW) -> None:
        self.window = window
        self.items: deque[msgspec.Raw] = deque()
        #: ``None`` once ended, the error once failed; kept apart from the items so that a
        #: failure can never be lost behind a full buffer.
        self.final: Any = _OPEN
        self.left = False
        self._consumed = 0

    def item(self, body: msgspec.Raw) -> None:
        if self.left or self.final is not _OPEN:
            return
        if len(self.items) >= self.window:
            raise MalformedFrame(f"the server sent more than the {self.window} stream items the client allowed")
        self.items.append(body)
        self._wake()

    def resolve(self, outcome: msgspec.Raw | BaseException | None) -> None:
        if self.final is _OPEN:
            self.final = outcome
        self._wake()

    def leave(self) -> None:
        """The consumer is gone: drop the buffer."""
        self.left = True
        self.items.clear()
        if self.final is _OPEN:
            self.final = RuntimeError("the stream's block was left; its items are no longer available")
        self._wake()

    def take(self) -> msgspec.Raw | None:
        """The next item, or None when there is none yet; raises the failure, or
        `StopAsyncIteration` at the end, once the items before it are taken."""
        if self.items:
            self._consumed += 1
            return self.items.popleft()
        if self.final is _OPEN:
            return None
        if self.final is None:
            raise StopAsyncIteration
        error, self.final = self.final, None  # raised once; the iterator is then exhausted
        raise error

    def credit_due(self) -> int:
        """Items to grant back now (half a window at a time), or 0."""
        if self._consumed * 2 >= self.window and self.final is _OPEN:
            due, self._consumed = self._consumed, 0
            return due
        return 0

    def _wake(self) -> None:
        raise NotImplementedError


def route_events(
    events: list[Any],
    pending: dict[int, CallSink],
    *,
    on_welcome: Callable[[], None],
    on_pong: Callable[[int], None],
    on_connection_error: Callable[[CallError], None],
) -> None:
    """Hand every frame of ``events`` to its call; none of this waits."""
    for event in events:
        if isinstance(event, (ReplyReceived, ItemReceived)):
            sink = pending.get(event.id)
            if sink is None:
                continue
            if isinstance(sink, StreamSink):
                sink.item(event.body)
            elif isinstance(sink, Abandoned) and isinstance(event, ItemReceived):
                continue  # a late item of a stream given up: only its end or error frees the slot
            else:
                del pending[event.id]
                sink.finish(event.body)
        elif isinstance(event, (EndReceived, ErrorReceived)):
            if isinstance(event, ErrorReceived) and event.id == 0:
                on_connection_error(CallError(event.code, event.message, event.field))
                continue
            sink = pending.pop(event.id, None)
            if sink is None:
                continue
            outcome = None if isinstance(event, EndReceived) else CallError(
                event.code, event.message, event.field, event.retry_after_ms)
            if outcome is None and not isinstance(sink, (StreamSink, Abandoned)):
                outcome = CallError(Status.INTERNAL, "the server ended a unary call like a stream")
            sink.finish(outcome)
        elif isinstance(event, Welcomed):
            on_welcome()
        elif isinstance(event, PongReceived):
            on_pong(event.nonce)
        # GoAwayReceived and Closed: the connection's state says draining/closed


class BatchBook:
    """The bookkeeping of an event batcher, shared by both clients; nothing here waits.

    It holds the batcher's results (``accepted``, ``rejected``, ``failed``, ``retried``,
    ``duplicates``: what they are is told once, in `BatcherResults`) and gives an event added
    without an ``id`` a random one (`new_event_id`; with ``ids=False``, none).
    """

    def __init__(self, *, batch_size: int, max_in_flight: int, linger: float, ids: bool = True) -> None:
        if not 1 <= batch_size <= api.MAX_EVENTS_PER_BATCH:
            raise ValueError(f"batch_size must be between 1 and {api.MAX_EVENTS_PER_BATCH}")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.batch_size = batch_size
        self.linger = linger
        self.accepted = 0
        self.rejected: list[tuple[api.Event, api.Rejection]] = []
        self.failed: list[BatchFailed] = []
        self.retried = 0
        self.duplicates = 0
        self.ids = ids
        self.pending: list[api.Event] = []
        self._started = 0.0

    def add(self, event: api.Event, now: float) -> bool:
        """Add an event; True when the batch is full and should be sent."""
        if not self.pending:
            self._started = now
        if self.ids and event.id is None:
            event = msgspec.structs.replace(event, id=new_event_id())
        self.pending.append(event)
        return len(self.pending) >= self.batch_size

    def due(self, now: float) -> bool:
        """Whether a partial batch has waited ``linger`` seconds."""
        return bool(self.pending) and now - self._started >= self.linger

    def take(self) -> list[api.Event]:
        batch, self.pending = self.pending, []
        return batch

    def put_back(self, batch: list[api.Event]) -> None:
        """A batch that was not sent goes back in front of the next one."""
        self.pending[:0] = batch

    def retry_delay(self, error: PigeonProtocolError, attempt: int) -> float | None:
        """Seconds to wait before sending a batch again that failed with ``error`` at its
        ``attempt``-th retry (0 first), or None if it must not be: only a batch the server shed
        (RESOURCE_EXHAUSTED with a retry hint, nothing stored) is. The server's hint, doubled
        at each retry up to 8 times, with up to half as much again of jitter, at most
        `MAX_RETRY_DELAY_S`."""
        if not isinstance(error, CallError) or error.retry_after_ms is None:
            return None
        if error.status is not Status.RESOURCE_EXHAUSTED:
            return None
        self.retried += 1
        delay = error.retry_after_ms / 1000 * min(2**attempt, 8)
        return min(MAX_RETRY_DELAY_S, delay * (1 + random.random() / 2))

    def record(self, batch: list[api.Event], outcome: api.IngestResult | PigeonProtocolError) -> None:
        if isinstance(outcome, PigeonProtocolError):
            self.failed.append(BatchFailed(outcome, batch))
        else:
            self.accepted += outcome.accepted
            self.duplicates += len(outcome.duplicates)
            self.rejected.extend((batch[r.index], r) for r in outcome.rejected)


#: base64url's alphabet, and the same 64 characters in ASCII order.
_IN_ORDER = bytes.maketrans(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
    b"-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz",
)


def new_event_id() -> str:
    """A new event id, 22 characters: the time in milliseconds (6 bytes) and 10 random bytes,
    in base64 with an alphabet in ASCII order (letters, digits, ``-``, ``_``).

    Ids made later sort later, so the server's index of remembered ids grows at one end:
    random ids would dirty a page of it per event and commit, ids led by the time a few.
    """
    raw = (time.time_ns() // 1_000_000).to_bytes(6, "big") + os.urandom(10)
    return base64.urlsafe_b64encode(raw).translate(_IN_ORDER).rstrip(b"=").decode()


#: The longest an event batcher waits before sending a shed batch again.
MAX_RETRY_DELAY_S = 30.0


class BatcherResults:
    """What the event batchers of both clients (``EventBatcher``) share: their results, from
    their `BatchBook`, and what they promise.

    A batcher groups events into ``events.ingest`` calls and keeps several in flight. Use it
    as an async context manager; ``add`` waits when ``max_in_flight`` batches are outstanding
    (backpressure), a partial batch is sent after ``linger`` seconds, and leaving the block
    sends the rest and waits for every acknowledgement. Leaving it with an exception cancels
    the batches still in flight instead. With ``call_timeout``, a batch not acknowledged
    within that many seconds fails with DEADLINE_EXCEEDED.

    Each event added without an ``id`` gets a unique one (the time and 10 random bytes; an
    event that has one keeps it; ``ids=False``: none), so that a batch sent again is stored
    once within the server's window (``ingest.dedupe_window_s``, 24 hours by default). The
    batcher does not reconnect: when a batch fails without an answer (a broken connection,
    ``call_timeout``), its events may or may not be stored, and the caller may send
    ``BatchFailed.events`` again, on a new connection, without storing any twice.
    """

    _book: BatchBook

    @property
    def retried(self) -> int:
        """Batches sent again because the server shed them: a RESOURCE_EXHAUSTED with a retry
        hint stored nothing, so the batch waits for the hint (doubled at each refusal up to 8
        times, with jitter, at most 30 s; within ``call_timeout``) and is sent again, holding
        its place in ``max_in_flight`` meanwhile."""
        return self._book.retried

    @property
    def accepted(self) -> int:
        """Events acknowledged as durable."""
        return self._book.accepted

    @property
    def duplicates(self) -> int:
        """Events the server did not store because it had stored an event with the same id
        within its window (``IngestResult.duplicates``)."""
        return self._book.duplicates

    @property
    def rejected(self) -> list[tuple[api.Event, api.Rejection]]:
        """``(event, rejection)`` for each event the server refused, the event as sent (with its id)."""
        return self._book.rejected

    @property
    def failed(self) -> list[BatchFailed]:
        """`BatchFailed` errors for batches whose call failed (leaving the block raises the
        first of them)."""
        return self._book.failed


class ClientBase:
    """What the Trio and asyncio clients share: the sans-IO connection, the calls in flight and
    their bookkeeping. Nothing here waits; a subclass supplies the I/O: `_kick` (frames are
    queued for the writer) and the ``_welcomed`` and pong events (anything with ``set()``).
    """

    _welcomed: Any
    _pongs: dict[int, Any]

    def __init__(self, conn: ClientConnection) -> None:
        self._conn = conn
        self._pending: dict[int, CallSink] = {}
        self._closed_error: PigeonProtocolError | None = None
        #: Errors the server sent about the connection itself (call id 0).
        self.connection_errors: list[CallError] = []
        #: The first bytes from the server, kept until its welcome to say what it is if not Pigeon.
        self._head = b""

    @property
    def welcome(self) -> Welcome:
        """The server's welcome: its name, frame limit and calls-in-flight limit."""
        assert self._conn.welcome is not None
        return self._conn.welcome

    def _kick(self) -> None:
        raise NotImplementedError

    def _error_for_caller(self, error: PigeonProtocolError) -> PigeonProtocolError:
        return error

    def _check_open(self) -> None:
        if self._closed_error is not None:
            raise self._error_for_caller(self._closed_error)

    def _queue_call(self, request: Request[Any], sink: CallSink, timeout_ms: int | None, window: int | None) -> int:
        """Queue a call and remember its sink; raises if the connection is closed or draining."""
        self._check_open()
        try:
            call_id = self._conn.start_call(request.method, request, timeout_ms=timeout_ms, window=window)
        except ProtocolError as exc:
            if self._conn.state in (State.DRAINING, State.CLOSED):
                raise closed_error(self._conn) from exc
            raise
        self._pending[call_id] = sink
        self._kick()
        return call_id

    def _abandon(self, call_id: int) -> None:
        """The caller gave up: cancel the call on the server (its slot stays taken until the
        server answers)."""
        if abandon(self._pending, call_id) and self._closed_error is None:
            self._conn.cancel(call_id)
            self._kick()

    def _receive(self, data: bytes | bytearray) -> None:
        """Bytes from the server (b"" at its end): hand every frame to its call.

        Raises:
            NotPigeonServer: before the welcome, bytes that are not Pigeon frames.
            ProtocolError: the server broke the protocol.
        """
        conn = self._conn
        try:
            if conn.welcome is None and conn.goaway is None:
                events = self._receive_first(data)
            else:
                events = conn.receive_data(data)
        except ProtocolError as exc:
            self._route(exc.events)  # the answers that came before the violation
            raise
        self._route(events)
        if self._conn.pending_bytes:  # pongs
            self._kick()

    def _route(self, events: list[Any]) -> None:
        route_events(
            events,
            self._pending,
            on_welcome=self._welcomed.set,
            on_pong=self._pong,
            on_connection_error=self._connection_error,
        )

    def _receive_first(self, data: bytes | bytearray) -> list[Any]:
        """Bytes before the welcome: a server that answers in another protocol (an HTTP server,
        a TLS port) is named as such, not reported as a broken Pigeon stream."""
        if len(self._head) < _HEAD_KEPT:
            self._head += data[: _HEAD_KEPT - len(self._head)]
        try:
            events = self._conn.receive_data(data)
        except (FrameTooLarge, MalformedFrame) as exc:
            if self._conn.welcome is not None:
                raise  # it welcomed us in the same bytes: a Pigeon server that broke the protocol
            raise not_pigeon(self._head) from exc
        if not data and self._head and self._conn.goaway is None:
            raise not_pigeon(self._head)  # it closed after bytes that made no frame
        return events

    def _connection_error(self, error: CallError) -> None:
        log.warning("the server reported a connection error: %s", error)
        self.connection_errors.append(error)

    def _pong(self, nonce: int) -> None:
        event = self._pongs.get(nonce)
        if event is not None:
            event.set()

    def _fail_all(self, error: PigeonProtocolError) -> None:
        """The connection is over: fail every call, wake every waiter."""
        if self._closed_error is None:
            self._closed_error = error
        pending, self._pending = self._pending, {}
        for sink in pending.values():
            sink.finish(self._error_for_caller(error))
        self._welcomed.set()
        for event in self._pongs.values():
            event.set()


def describe(exc: BaseException) -> str:
    """An I/O error with what caused it (a TLS failure hides behind a broken stream)."""
    cause = exc.__cause__ or exc.__context__
    return f"{exc!r} caused by {cause!r}" if cause is not None else repr(exc)


def closed_error(conn: ClientConnection, reason: str | None = None) -> ConnectionClosed:
    """The error for calls on a connection that ended: the server's goaway, else ``reason``
    (default: it was closed)."""
    if conn.goaway is not None:
        # ClientConnection stores the goaway with its code already mapped to a Status.
        return ConnectionClosed(conn.goaway.message, Status(conn.goaway.code))
    if reason is None:
        # A Pigeon server welcomes a client or sends a goaway; a TLS port read without TLS just closes.
        reason = ("the connection was closed" if conn.welcome is not None else
                  "the server closed the connection without a welcome: is it a Pigeon server (one that serves TLS?)")
    return ConnectionClosed(reason, Status.UNAVAILABLE)


#: Bytes of the server's first answer kept to describe it.
_HEAD_KEPT = 64


def not_pigeon(head: bytes) -> NotPigeonServer:
    """The error for a server whose first bytes ``head`` are not a Pigeon frame."""
    if head.startswith(b"HTTP/"):
        line = head.splitlines()[0].decode("latin-1")
        return NotPigeonServer(f"not a Pigeon server: it answered in HTTP ({line})", "http")
    if len(head) >= 2 and head[0] in (0x15, 0x16) and head[1] == 0x03:  # a TLS alert or handshake record
        return NotPigeonServer("the server speaks TLS: it answered the plaintext hello with a TLS record", "tls")
    return NotPigeonServer(f"not a Pigeon server: its first bytes were {head[:32]!r}")
