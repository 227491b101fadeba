"""The Trio client.

    async with open_client("127.0.0.1:7600") as client:
        profile = await client.call(GetProfile(identity="crm:42"))
        async with client.stream(ListEvents(identity="crm:42")) as events:
            async for event in events:
                ...
        async with client.event_batcher(batch_size=500) as batcher:
            for event in events:
                await batcher.add(event)

Calls are pipelined: any number of tasks may call at once on one connection and replies are
matched by id. Deadlines follow Trio's rule: wrap a call in ``trio.fail_after``; the
remaining time is sent to the server, which abandons the call when it runs out.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import msgspec
import trio

from . import api
from ._client_core import (
    BatchBook,
    BatcherResults,
    CallSink,
    api_key_or_env,
    sandbox_or_env,
    ClientBase,
    StreamSink,
    closed_error,
    decoder_for,
    describe,
    parse_target,
    response_type,
)
from .connection import ClientConnection
from .errors import BatchFailed, CallError, ConnectionClosed, PigeonProtocolError, ProtocolError, Status
from .frames import DEFAULT_MAX_FRAME

__all__ = ["Client", "open_client", "EventBatcher", "BatchFailed"]

R = TypeVar("R")


class _Unary(CallSink):
    __slots__ = ("event", "outcome")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.outcome: msgspec.Raw | BaseException | None = None

    def resolve(self, outcome: msgspec.Raw | BaseException | None) -> None:
        self.outcome = outcome
        self.event.set()


class _Stream(StreamSink):
    def __init__(self) -> None:
        super().__init__()
        self.ready = trio.Event()

    def _wake(self) -> None:
        self.ready.set()


class Client(ClientBase):
    """A connection to a Pigeon server. Create it with `open_client`."""

    def __init__(self, stream: trio.abc.Stream, conn: ClientConnection, nursery: trio.Nursery) -> None:
        super().__init__(conn)
        self._stream = stream
        self._nursery = nursery
        #: Set when frames are queued; only the writer task writes to the stream, so a caller's
        #: cancellation can never leave half a frame on the wire.
        self._queued = trio.Event()
        self._welcomed = trio.Event()
        self._pongs: dict[int, trio.Event] = {}
        #: Calls in flight, at most welcome.max_calls (set once welcomed).
        self._slots = trio.Semaphore(1)

    # -- calls --------------------------------------------------------------------------------

    async def call(self, request: api.Request[R]) -> R:
        """Call the request's method and return its decoded response.

        Raises:
            CallError: the server answered with a non-OK status.
            ConnectionClosed: the connection ended before the answer.
            FrameTooLarge: the request exceeds the server's frame limit (nothing was sent).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        sink = _Unary()
        call_id = await self._start(request, sink)
        try:
            self._kick()
            await sink.event.wait()
        except BaseException:
            self._abandon(call_id)
            raise
        outcome = sink.outcome
        if isinstance(outcome, BaseException):
            if (
                isinstance(outcome, CallError)
                and outcome.status is Status.DEADLINE_EXCEEDED
                and trio.current_time() >= trio.current_effective_deadline()
            ):
                # The server enforced the caller's own deadline; let it surface the Trio way
                # (the checkpoint raises Cancelled, which fail_after turns into TooSlowError).
                await trio.lowlevel.checkpoint()
            raise outcome
        assert outcome is not None  # route_events ends a unary call with a body or an error
        return decoder_for(response_type(request)).decode(outcome)

    @asynccontextmanager
    async def stream(self, request: api.StreamRequest[R]) -> AsyncIterator[AsyncIterator[R]]:
        """Start a server-streamed call; iterate the yielded object for its items.

        Items are flow-controlled per stream (``Call.window``): a slow consumer holds back its
        own stream only, never the connection's other calls. Leaving the block early cancels
        the call on the server.
        """
        sink = _Stream()
        call_id = await self._start(request, sink, window=sink.window)
        items = self._items(call_id, sink, decoder_for(response_type(request)))
        try:
            self._kick()
            yield items
        finally:
            await items.aclose()  # a loop left early leaves the generator suspended: end it here
            self._abandon(call_id)

    async def _items(self, call_id: int, sink: _Stream, decoder: msgspec.msgpack.Decoder) -> AsyncGenerator[Any, None]:
        while True:
            try:
                body = sink.take()
            except StopAsyncIteration:
                return
            if body is None:
                sink.ready = trio.Event()
                await sink.ready.wait()
                continue
            due = sink.credit_due()
            if due:
                self._conn.grant(call_id, due)
                self._kick()
            yield decoder.decode(body)

    async def ping(self) -> float:
        """Round-trip time to the server, in seconds."""
        nonce = len(self._pongs) + 1
        while nonce in self._pongs:
            nonce += 1
        done = self._pongs[nonce] = trio.Event()
        started = trio.current_time()
        self._conn.ping(nonce)
        try:
            self._kick()
            await done.wait()
        finally:
            self._pongs.pop(nonce, None)
        if self._closed_error is not None:
            raise self._closed_error
        return trio.current_time() - started

    def event_batcher(
        self, *, batch_size: int = 500, max_in_flight: int = 4, linger: float = 0.01, call_timeout: float | None = None,
        ids: bool = True,
    ) -> EventBatcher:
        """A helper for high-rate ingestion; see `EventBatcher`."""
        return EventBatcher(
            self, batch_size=batch_size, max_in_flight=max_in_flight, linger=linger, call_timeout=call_timeout, ids=ids
        )

    # -- plumbing -----------------------------------------------------------------------------

    async def _start(self, request: api.Request[Any], sink: CallSink, window: int | None = None) -> int:
        """Take a call slot (at most welcome.max_calls in flight) and queue the call."""
        self._check_open()
        await self._slots.acquire()
        sink.on_finish = self._slots.release
        try:
            deadline = trio.current_effective_deadline()
            timeout_ms = None
            if math.isfinite(deadline):
                # rounded up, so the server never gives up before the caller does
                timeout_ms = max(1, math.ceil((deadline - trio.current_time()) * 1000))
            return self._queue_call(request, sink, timeout_ms, window)
        except BaseException:
            sink.on_finish = None
            self._slots.release()
            raise

    def _kick(self) -> None:
        self._queued.set()

    async def _writer(self) -> None:
        while True:
            await self._queued.wait()
            self._queued = trio.Event()
            data = self._conn.data_to_send()
            if data:
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._fail_all(closed_error(self._conn, f"sending failed: {describe(exc)}"))
                    return

    async def _reader(self) -> None:
        try:
            while True:
                try:
                    data = await self._stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as exc:
                    self._fail_all(closed_error(self._conn, f"the connection broke: {describe(exc)}"))
                    return
                self._receive(data)
                if not data:
                    self._fail_all(closed_error(self._conn))
                    return
        except ProtocolError as exc:
            self._fail_all(exc)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self._stream)

    async def aclose(self) -> None:
        self._fail_all(ConnectionClosed("the client closed the connection"))
        await trio.aclose_forcefully(self._stream)


@asynccontextmanager
async def open_client(
    target: str = "127.0.0.1:7600",
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    api_key: str | None = None,
    sandbox: str | None = None,
    client_name: str = "pigeon-trio",
    max_frame: int = DEFAULT_MAX_FRAME,
) -> AsyncIterator[Client]:
    """Connect, say hello, wait for the welcome, and yield a `Client`.

    Args:
        target: ``HOST:PORT`` or ``unix:PATH``.
        ssl_context: speak TLS (``ssl.create_default_context(cafile=...)``).
        server_hostname: the name to verify in the server's certificate (default: the host).
        api_key: the API key sent in the hello (PROTOCOL.md, section 5.1); default: the
            environment variable ``PIGEON_API_KEY``, else none (``server.health`` only, on a
            server with keys).
        sandbox: the sandbox to work in (PROTOCOL.md, section 5.2); default: the environment
            variable ``PIGEON_SANDBOX``, else the key's (``default`` on a server without keys).
        max_frame: the largest answer this client accepts (announced in the hello); the
            server fails a call whose answer is larger with RESOURCE_EXHAUSTED.
    """
    host, port = parse_target(target)
    if host == "unix":
        stream: trio.abc.Stream = await trio.open_unix_socket(str(port))
    else:
        stream = await trio.open_tcp_stream(host, int(port))
        if ssl_context is not None:
            stream = trio.SSLStream(stream, ssl_context, server_hostname=server_hostname or host)
    conn = ClientConnection(client=client_name, api_key=api_key_or_env(api_key), max_frame=max_frame,
                            sandbox=sandbox_or_env(sandbox))
    try:
        async with _unwrapped(), trio.open_nursery() as nursery:
            client = Client(stream, conn, nursery)
            conn.hello()
            client._kick()
            nursery.start_soon(client._writer)
            nursery.start_soon(client._reader)
            await client._welcomed.wait()
            if client._closed_error is not None:
                raise client._closed_error
            client._slots = trio.Semaphore(client.welcome.max_calls)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)


@asynccontextmanager
async def _unwrapped() -> AsyncIterator[None]:
    """Let the caller see its own exception, not a group of one, when it leaves the block."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1 and not isinstance(group.exceptions[0], BaseExceptionGroup):
            raise group.exceptions[0] from None
        raise


class EventBatcher(BatcherResults):
    """Groups events into ``events.ingest`` calls and keeps several in flight, on Trio
    (`Client.event_batcher`). What it does and promises, and its results, are told once for
    both clients' batchers: `protocols._client_core.BatcherResults`."""

    def __init__(
        self, client: Client, *, batch_size: int, max_in_flight: int, linger: float, call_timeout: float | None = None,
        ids: bool = True,
    ) -> None:
        self.client = client
        self._book = BatchBook(batch_size=batch_size, max_in_flight=max_in_flight, linger=linger, ids=ids)
        self._call_timeout = math.inf if call_timeout is None else call_timeout
        self._slots = trio.Semaphore(max_in_flight)
        self._in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        self._nursery: trio.Nursery | None = None

    async def __aenter__(self) -> EventBatcher:
        self._cm = trio.open_nursery()
        self._nursery = await self._cm.__aenter__()
        self._nursery.start_soon(self._linger_loop)
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        assert self._nursery is not None
        try:
            if exc_info[0] is None:
                await self.flush()
            self._nursery.cancel_scope.cancel()
        finally:
            async with _unwrapped():
                result = await self._cm.__aexit__(*exc_info)
        if exc_info[0] is None and self.failed:
            raise self.failed[0]
        return result

    async def add(self, event: api.Event) -> None:
        """Add one event; waits while ``max_in_flight`` batches are unanswered."""
        if self._book.add(event, trio.current_time()):
            await self._send_batch()

    async def flush(self) -> None:
        """Send the partial batch and wait until every batch in flight is answered."""
        if self._book.pending:
            await self._send_batch()
        while self._in_flight:
            await self._idle.wait()

    async def _send_batch(self) -> None:
        batch = self._book.take()
        # Counted before waiting for a slot, so that flush() waits for this batch too.
        self._in_flight += 1
        if self._idle.is_set():
            self._idle = trio.Event()
        try:
            await self._slots.acquire()
        except BaseException:
            self._book.put_back(batch)
            self._done_one()
            raise
        assert self._nursery is not None
        self._nursery.start_soon(self._call, batch)

    def _done_one(self) -> None:
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()

    async def _call(self, batch: list[api.Event]) -> None:
        try:
            with trio.fail_after(self._call_timeout):
                self._book.record(batch, await self._ingest(batch))
        except PigeonProtocolError as exc:
            self._book.record(batch, exc)
        except trio.TooSlowError:
            self._book.record(batch, CallError(Status.DEADLINE_EXCEEDED, f"no answer within {self._call_timeout:g}s"))
        finally:
            self._slots.release()
            self._done_one()

    async def _ingest(self, batch: list[api.Event]) -> api.IngestResult:
        """The batch's call, sent again after the server's retry hint while it sheds load."""
        attempt = 0
        while True:
            try:
                return await self.client.call(api.IngestEvents(events=batch))
            except CallError as exc:
                delay = self._book.retry_delay(exc, attempt)
                if delay is None:
                    raise
            attempt += 1
            await trio.sleep(delay)

    async def _linger_loop(self) -> None:
        while True:
            await trio.sleep(self._book.linger)
            if self._book.due(trio.current_time()):
                await self._send_batch()
