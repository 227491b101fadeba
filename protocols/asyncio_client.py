"""The asyncio client, twin of `protocols.trio_client`; it works on any asyncio event loop.

    from protocols import api
    from protocols.asyncio_client import open_client, run

    async def main() -> None:
        async with open_client("127.0.0.1:7600") as client:
            profile = await client.call(api.GetProfile(identity="crm:42"), timeout=5)
            async with client.stream(api.ListEvents(identity="crm:42")) as events:
                async for event in events:
                    ...
            async with client.event_batcher(batch_size=500) as batcher:
                for event in incoming:
                    await batcher.add(event)

    run(main())  # with uvloop when it is installed

Calls are pipelined: any number of tasks may call at once on one connection, one reader task
matches the replies to their calls by id, and frames queued in the same event-loop iteration
go out in one write. Deadlines follow asyncio's convention: ``call(..., timeout=seconds)``
raises `TimeoutError` locally and sends the timeout to the server, which abandons the call
when it runs out. A call whose task is cancelled (including by a timeout) is cancelled on
the server too.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import ssl
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import msgspec

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
from .framing import DEFAULT_MAX_FRAME

__all__ = ["Client", "open_client", "EventBatcher", "BatchFailed", "run"]

R = TypeVar("R")
T = TypeVar("T")

#: Bytes asked for per read, and the StreamReader's buffer limit.
_READ_SIZE = 256 * 1024


def run(main: Coroutine[Any, Any, T], *, debug: bool | None = None) -> T:
    """Run ``main`` to completion on a new event loop, a uvloop one when uvloop is installed.

    Args:
        main: the coroutine to run (like `asyncio.run`).
        debug: the loop's debug mode (default: asyncio's own default).

    Returns:
        What ``main`` returned.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main, debug=debug)
    with asyncio.Runner(debug=debug, loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


class _Unary(CallSink):
    __slots__ = ("future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[msgspec.Raw | BaseException | None] = loop.create_future()

    def resolve(self, outcome: msgspec.Raw | BaseException | None) -> None:
        # The outcome is the future's result, never its exception: a caller that has gone
        # (cancelled) must not leave a "Future exception was never retrieved" behind.
        if not self.future.done():
            self.future.set_result(outcome)


class _Stream(StreamSink):
    def __init__(self) -> None:
        super().__init__()
        self.ready = asyncio.Event()

    def _wake(self) -> None:
        self.ready.set()


class _Items(AsyncIterator[R]):
    """The decoded items of one stream (a plain iterator, so an early exit leaves no
    async generator to finalize). Taking items grants the server credit for more."""

    def __init__(self, client: Client, call_id: int, sink: _Stream, decoder: msgspec.msgpack.Decoder) -> None:
        self._client = client
        self._call_id = call_id
        self._sink = sink
        self._decoder = decoder

    def __aiter__(self) -> _Items[R]:
        return self

    async def __anext__(self) -> R:
        sink = self._sink
        while (body := sink.take()) is None:
            sink.ready.clear()
            await sink.ready.wait()
        due = sink.credit_due()
        if due:
            self._client._conn.grant(self._call_id, due)
            self._client._flush_soon()
        return self._decoder.decode(body)


def _fresh(error: PigeonProtocolError) -> PigeonProtocolError:
    """A copy of a connection-level error for one more caller, so that many callers raising
    it do not all add their frames to one shared traceback."""
    if type(error) is ConnectionClosed:
        copy = ConnectionClosed(error.message, error.status)
        copy.__cause__ = error.__cause__
        return copy
    return error


class Client(ClientBase):
    """A connection to a Pigeon server. Create it with `open_client`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: ClientConnection) -> None:
        super().__init__(conn)
        self._reader = reader
        self._writer = writer
        self._loop = asyncio.get_running_loop()
        self._welcomed = asyncio.Event()
        self._pongs: dict[int, asyncio.Event] = {}
        self._nonces = itertools.count(1)
        self._flush_scheduled = False
        self._reader_task: asyncio.Task[None] | None = None
        #: Calls in flight, at most welcome.max_calls (set once welcomed).
        self._slots = asyncio.Semaphore(1)

    async def call(self, request: api.Request[R], *, timeout: float | None = None) -> R:
        """Call the request's method and return its decoded response.

        Args:
            request: the typed request; its type names the method and the response type.
            timeout: seconds to wait for the answer. The server is told too (``timeout_ms``)
                and gives up on the call when it runs out.

        Raises:
            CallError: the server answered with a non-OK status.
            TimeoutError: ``timeout`` ran out (the call is cancelled on the server).
            ConnectionClosed: the connection ended (or was draining) before the answer.
            FrameTooLarge: the request exceeds the server's frame limit (nothing was sent).
        """
        if timeout is not None and timeout <= 0:
            raise TimeoutError
        sink = _Unary(self._loop)
        async with asyncio.timeout(timeout) as scope:
            call_id = await self._start(request, sink, deadline=scope.when())
            try:
                await self._drain()
                outcome = await sink.future
            except BaseException:
                self._abandon(call_id)
                raise
        if isinstance(outcome, BaseException):
            if timeout is not None and isinstance(outcome, CallError) and outcome.status is Status.DEADLINE_EXCEEDED:
                # The server's clock ran out first; report it the way a local expiry is reported.
                raise TimeoutError(outcome.message) from outcome
            raise outcome
        assert outcome is not None  # route_events ends a unary call with a body or an error
        return decoder_for(response_type(request)).decode(outcome)

    @asynccontextmanager
    async def stream(self, request: api.StreamRequest[R]) -> AsyncIterator[AsyncIterator[R]]:
        """Start a server-streamed call; iterate the yielded object for its items.

        Leaving the block before the stream ends cancels the call on the server. Iterating
        raises `CallError` or `ConnectionClosed` where the stream failed.

        Items are flow-controlled per stream (``Call.window``): a slow consumer holds back its
        own stream only, and other calls on the client keep flowing meanwhile.
        """
        sink = _Stream()
        call_id = await self._start(request, sink, window=sink.window)
        try:
            await self._drain()
            yield _Items(self, call_id, sink, decoder_for(response_type(request)))
        finally:
            self._abandon(call_id)

    async def ping(self) -> float:
        """Round-trip time to the server, in seconds.

        Raises:
            ConnectionClosed: the connection ended before the pong.
        """
        self._check_open()
        nonce = next(self._nonces)
        done = self._pongs[nonce] = asyncio.Event()
        started = time.perf_counter()  # uvloop's loop.time() is cached per iteration, in ms
        self._conn.ping(nonce)
        self._flush_soon()
        try:
            await self._drain()
            await done.wait()
        finally:
            self._pongs.pop(nonce, None)
        self._check_open()
        return time.perf_counter() - started

    def event_batcher(
        self, *, batch_size: int = 500, max_in_flight: int = 4, linger: float = 0.01, call_timeout: float | None = None,
        ids: bool = True,
    ) -> EventBatcher:
        """A helper for high-rate ingestion; see `EventBatcher`."""
        return EventBatcher(
            self, batch_size=batch_size, max_in_flight=max_in_flight, linger=linger, call_timeout=call_timeout, ids=ids
        )

    async def aclose(self) -> None:
        """Close the connection; calls still waiting fail with `ConnectionClosed`."""
        self._fail_all(ConnectionClosed("the client closed the connection"))
        self._writer.transport.abort()  # before any await: a second cancellation cannot skip it
        task = self._reader_task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})
        try:
            await self._writer.wait_closed()
        except OSError:
            pass

    # -- plumbing -----------------------------------------------------------------------------

    def _error_for_caller(self, error: PigeonProtocolError) -> PigeonProtocolError:
        return _fresh(error)

    async def _start(
        self, request: api.Request[Any], sink: CallSink, *, deadline: float | None = None, window: int | None = None
    ) -> int:
        """Take a call slot (at most welcome.max_calls in flight) and queue the call."""
        self._check_open()
        await self._slots.acquire()
        sink.on_finish = self._slots.release
        try:
            timeout_ms = None
            if deadline is not None:
                # rounded up, so the server never gives up before the caller does
                timeout_ms = max(1, math.ceil((deadline - self._loop.time()) * 1000))
            return self._queue_call(request, sink, timeout_ms, window)
        except BaseException:
            sink.on_finish = None
            self._slots.release()
            raise

    def _kick(self) -> None:
        self._flush_soon()

    def _flush_soon(self) -> None:
        """Write the queued frames at the end of this loop iteration, with everything else
        queued by then (pipelined calls share one write)."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_scheduled = False
        data = self._conn.data_to_send()
        if not data or self._closed_error is not None or self._writer.is_closing():
            return
        try:
            self._writer.write(data)
        except (OSError, RuntimeError) as exc:  # uvloop raises RuntimeError on a closed handle
            self._fail_all(closed_error(self._conn, f"sending failed: {describe(exc)}"))

    async def _drain(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        try:
            await self._writer.drain()
        except OSError as exc:
            self._fail_all(closed_error(self._conn, f"sending failed: {describe(exc)}"))
            assert self._closed_error is not None  # set by _fail_all, if it was not already
            raise _fresh(self._closed_error) from exc

    async def _read_loop(self) -> None:
        conn = self._conn
        try:
            while True:
                try:
                    data = await self._reader.read(_READ_SIZE)
                except OSError as exc:  # includes ssl.SSLError and ConnectionResetError
                    self._fail_all(closed_error(conn, f"the connection broke: {describe(exc)}"))
                    return
                self._receive(data)
                if not data:
                    self._fail_all(closed_error(conn))
                    return
        except ProtocolError as exc:
            self._fail_all(exc)
            self._writer.transport.abort()
        except Exception as exc:
            failure = ConnectionClosed(f"the client's reader failed: {exc!r}", Status.INTERNAL)
            failure.__cause__ = exc
            self._fail_all(failure)
            raise

@asynccontextmanager
async def open_client(
    target: str = "127.0.0.1:7600",
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    api_key: str | None = None,
    sandbox: str | None = None,
    client_name: str = "pigeon-asyncio",
    max_frame: int = DEFAULT_MAX_FRAME,
) -> AsyncIterator[Client]:
    """Connect, say hello, wait for the welcome, and yield a `Client`.

    Wrap it in ``asyncio.timeout`` to bound the connection and handshake.

    Args:
        target: ``HOST:PORT`` or ``unix:PATH``.
        ssl_context: speak TLS (``ssl.create_default_context(cafile=...)``); TCP targets only,
            as the server serves unix sockets in the clear.
        server_hostname: the name to verify in the server's certificate (default: the host).
        api_key: the API key sent in the hello (PROTOCOL.md, section 5.1); default: the
            environment variable ``PIGEON_API_KEY``, else none (``server.health`` only, on a
            server with keys).
        sandbox: the sandbox to work in (PROTOCOL.md, section 5.2); default: the environment
            variable ``PIGEON_SANDBOX``, else the key's (``default`` on a server without keys).
        client_name: announced in the hello.
        max_frame: the largest answer this client accepts (announced in the hello); the
            server fails a call whose answer is larger with RESOURCE_EXHAUSTED.

    Raises:
        OSError: the connection could not be made (refused, TLS verification failed, ...).
        ConnectionClosed: the server closed the connection instead of welcoming the client.
        ProtocolError: the server's welcome was not acceptable.
    """
    host, port = parse_target(target)
    if host == "unix":
        reader, writer = await asyncio.open_unix_connection(str(port), limit=_READ_SIZE)
    elif ssl_context is not None:
        reader, writer = await asyncio.open_connection(
            host, port, limit=_READ_SIZE, ssl=ssl_context, server_hostname=server_hostname or host
        )
    else:
        reader, writer = await asyncio.open_connection(host, port, limit=_READ_SIZE)
    conn = ClientConnection(client=client_name, api_key=api_key_or_env(api_key), max_frame=max_frame,
                            sandbox=sandbox_or_env(sandbox))
    client = Client(reader, writer, conn)
    crashed: BaseException | None = None
    try:
        conn.hello()
        client._flush_now()
        client._reader_task = asyncio.create_task(client._read_loop(), name=f"pigeon reader {target}")
        await client._welcomed.wait()
        client._check_open()
        client._slots = asyncio.Semaphore(client.welcome.max_calls)
        yield client
    finally:
        await client.aclose()
        task = client._reader_task
        if task is not None and task.done() and not task.cancelled():
            crashed = task.exception()  # retrieve it, so asyncio does not log it as lost
    if crashed is not None:
        raise crashed


class EventBatcher(BatcherResults):
    """Groups events into ``events.ingest`` calls and keeps several in flight, on asyncio
    (`Client.event_batcher`). What it does and promises, and its results, are told once for
    both clients' batchers: `protocols._client_core.BatcherResults`."""

    def __init__(
        self, client: Client, *, batch_size: int, max_in_flight: int, linger: float, call_timeout: float | None = None,
        ids: bool = True,
    ) -> None:
        self.client = client
        self._book = BatchBook(batch_size=batch_size, max_in_flight=max_in_flight, linger=linger, ids=ids)
        self._call_timeout = call_timeout
        self._slots = asyncio.Semaphore(max_in_flight)
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._crashes: list[Exception] = []
        self._linger_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EventBatcher:
        self._linger_task = asyncio.create_task(self._linger_loop(), name="pigeon batcher linger")
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        try:
            if exc_info[0] is None:
                await self.flush()
        finally:
            tasks = set(self._tasks)
            if self._linger_task is not None:
                tasks.add(self._linger_task)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
        if exc_info[0] is None:
            if self._crashes:
                raise self._crashes[0]
            if self.failed:
                raise self.failed[0]

    async def add(self, event: api.Event) -> None:
        """Add one event; waits while ``max_in_flight`` batches are unanswered."""
        if self._book.add(event, asyncio.get_running_loop().time()):
            await self._send_batch()

    async def flush(self) -> None:
        """Send the partial batch and wait until every batch in flight is answered."""
        if self._book.pending:
            await self._send_batch()
        while self._in_flight:
            await self._idle.wait()

    async def _send_batch(self) -> None:
        # The batch counts as in flight while it waits for a slot, so `flush` waits for it.
        batch = self._book.take()
        self._in_flight += 1
        self._idle.clear()
        try:
            await self._slots.acquire()
        except BaseException:
            self._book.put_back(batch)  # not sent: keep the events for the next batch
            self._call_done()
            raise
        task = asyncio.create_task(self._call(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, batch: list[api.Event]) -> None:
        try:
            self._book.record(batch, await self._ingest(batch))
        except PigeonProtocolError as exc:
            self._book.record(batch, exc)
        except TimeoutError:
            self._book.record(batch, CallError(Status.DEADLINE_EXCEEDED, f"no answer within {self._call_timeout:g}s"))
        except Exception as exc:  # a bug or an unencodable event: raised when the block is left
            self._crashes.append(exc)
        finally:
            self._slots.release()
            self._call_done()

    async def _ingest(self, batch: list[api.Event]) -> api.IngestResult:
        """The batch's call, sent again after the server's retry hint while it sheds load,
        all within ``call_timeout``."""
        loop = asyncio.get_running_loop()
        deadline = None if self._call_timeout is None else loop.time() + self._call_timeout
        attempt = 0
        while True:
            timeout = None if deadline is None else deadline - loop.time()
            try:
                return await self.client.call(api.IngestEvents(events=batch), timeout=timeout)
            except CallError as exc:
                delay = self._book.retry_delay(exc, attempt)
                if delay is None:
                    raise
            attempt += 1
            if deadline is not None and loop.time() + delay >= deadline:
                raise TimeoutError
            await asyncio.sleep(delay)

    def _call_done(self) -> None:
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()

    async def _linger_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._book.linger)
            if self._book.due(loop.time()):
                await self._send_batch()
