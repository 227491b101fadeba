"""An HTTP/2 client connection pool on Trio, for push providers (APNs, FCM).

One `H2Pool` talks to one origin over several TLS connections (ALPN ``h2``), opened lazily.
Requests are submitted without waiting (`H2Pool.try_submit`) and answered through a
callback, so a sender can keep thousands in flight without a task each; when no connection
has a free stream, `H2Pool.wait_capacity` opens another one (up to ``max_connections``) or
waits for a stream to finish. That is the backpressure: a slow server never makes the pool
hold more than ``max_connections × streams_per_connection`` requests.

Each connection speaks HTTP/2 through the sans-IO `protocols.h2client.H2Client` (a few µs a
request, where h2's general state machine cost ~50) and has one reader task and one writer
task; requests only queue frames, so a caller's cancellation cannot cut a frame. The number
of streams per connection follows the server's SETTINGS_MAX_CONCURRENT_STREAMS (capped by
``streams_per_connection``).

GOAWAY: the pool opens no new stream on the connection, fails the streams above
``last_stream_id`` with `StreamRefused` (never processed, safe to retry), and closes the
connection once the others are answered.

Failures reported to the callback:

- `StreamRefused`: the server did not process the request (GOAWAY, REFUSED_STREAM): retry.
- `ConnectionLost`: the connection broke with the request in flight: the server may or may
  not have processed it.
"""

from __future__ import annotations

import logging
import random
import ssl
from collections.abc import Callable
from typing import Any

import trio

from protocols.h2client import (
    LAST_STREAM_ID,
    ErrorCode,
    GoAway,
    H2Client,
    H2ProtocolError,
    PingAck,
    ResponseEnded,
    SettingsChanged,
    StreamReset,
)

from server.runtime.errors import ServerError

__all__ = ["H2Pool", "H2Response", "H2Failure", "StreamRefused", "ConnectionLost", "PoolStatistics"]

log = logging.getLogger("pigeon.http2")

_READ_SIZE = 65536
#: Acknowledgements (PING, SETTINGS) and window updates waiting for a writer that is blocked:
#: beyond this, the server is not reading what it makes us send.
_MAX_OUTBOX = 1 << 20
#: Flow-control window we grant the server (responses are small; be generous).
_WINDOW = 1 << 24


class H2Failure(ServerError):
    """A request that got no HTTP response."""


class StreamRefused(H2Failure):
    """The server did not process the request (GOAWAY above its last stream, REFUSED_STREAM)."""


class ConnectionLost(H2Failure):
    """The connection broke while the request was in flight; it may have been processed."""


class H2Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[bytes, bytes], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"<H2Response {self.status} {len(self.body)} bytes>"


Callback = Callable[[Any], None]


class _Stream:
    """A request in flight: who to tell, and since when (the codec assembles the answer)."""

    __slots__ = ("callback", "started")

    def __init__(self, callback: Callback, started: float) -> None:
        self.callback = callback
        self.started = started


class _Connection:
    def __init__(self, pool: H2Pool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.streams: dict[int, _Stream] = {}
        self.h2 = H2Client(window=_WINDOW)
        self.ready = False
        #: Streams allowed at once: the server's SETTINGS_MAX_CONCURRENT_STREAMS, capped by ours.
        self.limit = 0
        self.draining = False
        self.closed = False
        self.stream: trio.abc.Stream | None = None
        self.scope = trio.CancelScope()
        self._queued = trio.Event()
        #: Bytes the codec produced while reading, for the writer (which alone writes).
        self._outbox: list[bytes] = []
        self._outbox_size = 0
        #: A GOAWAY came before any answer (counted as a failed connection).
        self._sent_away = False
        self._pong = trio.Event()
        self.last_activity = trio.current_time()
        self.opened_streams = 0
        #: Whether the server has answered a request on it (it accepts us).
        self.answered = False
        self._tasks: trio.Nursery
        self._error: BaseException | None = None

    # -- capacity ---------------------------------------------------------------------------

    def free(self) -> int:
        if not self.ready or self.draining or self.closed:
            return 0
        return self.limit - len(self.streams)

    # -- sending ----------------------------------------------------------------------------

    def submit(self, headers: list[tuple[bytes, bytes]], body: bytes, callback: Callback) -> None:
        now = trio.current_time()
        stream_id = self.h2.send_request(headers, body)
        if stream_id >= LAST_STREAM_ID:
            # Out of stream ids after this one (2**30 requests): a new connection takes over.
            self.draining = True
        self.streams[stream_id] = _Stream(callback, now)
        self.opened_streams += 1
        self.last_activity = now
        self._queued.set()

    def kick(self) -> None:
        self._queued.set()

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        pool = self.pool
        started = False
        try:
            with self.scope:
                with trio.fail_after(pool.connect_timeout):
                    self.stream = await pool.connect()
                    self.h2.initiate()
                    await self.stream.send_all(self.h2.data_to_send())
                    # Ready once the server's SETTINGS tell us how many streams it allows.
                    while not self.ready:
                        data = await self.stream.receive_some(_READ_SIZE)
                        if not data:
                            raise ConnectionLost("the server closed the connection during the handshake")
                        self._receive(data)
                        await self._write_now()
                    if self.draining:  # a GOAWAY came with the SETTINGS
                        raise ConnectionLost(f"sent away during the handshake: {pool.last_connect_error}")
                task_status.started()
                started = True
                async with trio.open_nursery() as nursery:
                    self._tasks = nursery
                    nursery.start_soon(self._guard, self._writer)
                    nursery.start_soon(self._guard, self._keepalive)
                    nursery.start_soon(self._guard, self._expire)
                    await self._guard(self._reader)
                    nursery.cancel_scope.cancel()
                if self._error is not None:
                    raise self._error
        except _CONNECTION_ERRORS as exc:
            if not started:
                if not self._sent_away:  # (already counted as a failure)
                    pool._connect_failed()
                    pool.last_connect_error = _describe(exc)
                log.warning("cannot connect to %s: %s", pool.origin, pool.last_connect_error)
                raise ConnectionLost(f"cannot connect to {pool.origin}: {pool.last_connect_error}") from exc
            log.info("connection %d to %s lost: %s", self.number, pool.origin, _describe(exc))
            self._fail_all(ConnectionLost(f"connection to {pool.origin} lost: {_describe(exc)}"))
        finally:
            self.closed = True
            self._fail_all(ConnectionLost(f"connection to {pool.origin} closed"))
            pool._forget(self)
            if self.stream is not None:
                with trio.CancelScope(shield=True):
                    # The GOAWAY saying why, if the codec closed the connection (best effort).
                    goodbye = self.h2.data_to_send() if self.h2.closed else b""
                    if goodbye:
                        with trio.move_on_after(1):
                            try:
                                await self.stream.send_all(goodbye)
                            except (*_CONNECTION_ERRORS, trio.BusyResourceError):
                                pass
                    await trio.aclose_forcefully(self.stream)

    async def _guard(self, task: Callable[[], Any]) -> None:
        """Run one of the connection's tasks; its I/O error ends them all (and is raised by
        `run`, outside the nursery's exception group)."""
        try:
            await task()
        except _CONNECTION_ERRORS as exc:
            if self._error is None:
                self._error = exc
            self.closed = True  # no submission from now on (h2 may already be CLOSED)
            self._tasks.cancel_scope.cancel()

    async def _write_now(self) -> None:
        data = self.h2.data_to_send()
        if self._outbox:
            data = b"".join(self._outbox) + data
            self._outbox.clear()
            self._outbox_size = 0
        if data:
            assert self.stream is not None
            await self.stream.send_all(data)

    async def _writer(self) -> None:
        while True:
            await self._queued.wait()
            self._queued = trio.Event()
            await self._write_now()
            if self.draining and not self.streams:
                self.scope.cancel()

    async def _reader(self) -> None:
        assert self.stream is not None
        while True:
            data = await self.stream.receive_some(_READ_SIZE)
            if not data:
                if self.streams:
                    raise ConnectionLost("the server closed the connection")
                return
            self._receive(data)
            # Wake the writer only for what the reading produced (SETTINGS and PING acks,
            # WINDOW_UPDATEs) or what the callbacks submitted.
            pending = self.h2.data_to_send()
            if pending:
                self._outbox.append(pending)
                self._outbox_size += len(pending)
                if self._outbox_size > _MAX_OUTBOX:
                    raise ConnectionLost(f"the server sends more than it reads ({self._outbox_size} bytes"
                                         " of acknowledgements we cannot write)")
                self._queued.set()
            if self.draining and not self.streams:
                return

    async def _keepalive(self) -> None:
        """PING when idle (keeps the connection warm and proves it alive); close when idle long."""
        pool = self.pool
        while True:
            await trio.sleep(pool.ping_interval)
            idle = trio.current_time() - self.last_activity
            if not self.streams and idle >= pool.idle_timeout:
                log.debug("closing idle connection %d to %s", self.number, pool.origin)
                self.draining = True
                self.h2.close()
                self._queued.set()
                return
            self._pong = trio.Event()
            self.h2.ping(b"pigeon!!")
            self._queued.set()
            with trio.move_on_after(pool.ping_timeout) as waited:
                await self._pong.wait()
            if waited.cancelled_caught:
                raise ConnectionLost(f"no PING answer within {pool.ping_timeout:g}s")

    async def _expire(self) -> None:
        """Fail the streams the server has not answered within ``request_timeout``."""
        pool = self.pool
        timeout = pool.request_timeout
        while True:
            await trio.sleep(min(1.0, timeout / 4))
            limit = trio.current_time() - timeout
            late = [sid for sid, stream in self.streams.items() if stream.started < limit]
            for stream_id in late:
                stream = self.streams.pop(stream_id)
                self.h2.reset(stream_id, ErrorCode.CANCEL)
                pool.timeouts += 1
                self._done(stream, ConnectionLost(f"no answer from {pool.origin} within {timeout:g}s"))
            if late:
                self._queued.set()
                if self.draining and not self.streams:
                    self.scope.cancel()

    def _receive(self, data: bytes | bytearray) -> None:
        try:
            events = self.h2.receive(bytes(data))  # the same object when it is bytes already
        except H2ProtocolError as exc:
            self._handle(exc.events)  # answers read before the violation are answers
            raise
        self._handle(events)

    def _handle(self, events: list[Any]) -> None:
        streams = self.streams
        for event in events:
            kind = type(event)
            if kind is ResponseEnded:
                stream = streams.pop(event.stream_id, None)
                if stream is not None:
                    self._done(stream, H2Response(event.status, event.headers, event.body))
            elif kind is StreamReset:
                stream = streams.pop(event.stream_id, None)
                if stream is not None:
                    if event.error_code == ErrorCode.REFUSED_STREAM:
                        self._done(stream, StreamRefused("the server refused the stream (REFUSED_STREAM)"))
                    else:
                        self._done(stream, ConnectionLost(f"the stream was reset ({ErrorCode.name(event.error_code)})"))
            elif kind is SettingsChanged:
                self.limit = min(event.max_concurrent_streams, self.pool.streams_per_connection)
                self.ready = True
                self.pool._capacity_changed()
            elif kind is GoAway:
                self._goaway(event)
            elif kind is PingAck:
                self._pong.set()

    def _goaway(self, event: GoAway) -> None:
        last = event.last_stream_id
        reason = event.debug_data.decode("utf-8", "replace")
        if event.error_code:
            reason = f"{ErrorCode.name(event.error_code)} {reason}"
        self.draining = True
        self.pool.goaways += 1
        if not self.answered and not self._sent_away:
            # Sent away before answering anything (a refused certificate, a server shutting
            # down): as bad as failing to connect, so the pool backs off before the next one.
            self.pool._connect_failed()
            self.pool.last_connect_error = f"GOAWAY before any answer {reason}".strip()
            self._sent_away = True
        log.info("GOAWAY from %s on connection %d (last stream %d) %s", self.pool.origin, self.number, last, reason)
        refused = [sid for sid in self.streams if sid > last]
        for stream_id in refused:
            self.h2.reset(stream_id)
            self._done(self.streams.pop(stream_id), StreamRefused(f"GOAWAY before the server read it {reason}".strip()))
        self.pool._capacity_changed()

    def _done(self, stream: _Stream, outcome: Any) -> None:
        self.pool.completed += 1
        if type(outcome) is H2Response and not self.answered:
            self.answered = True
            self.pool._connect_succeeded()
        self.last_activity = trio.current_time()
        try:
            stream.callback(outcome)
        except Exception:
            log.exception("a request callback failed")
        self.pool._capacity_changed()

    def _fail_all(self, error: H2Failure) -> None:
        streams = dict(self.streams)
        self.streams.clear()
        for stream in streams.values():
            self._done(stream, error)


_CONNECTION_ERRORS = (
    OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, H2ProtocolError,
    trio.TooSlowError, H2Failure,
)


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    while isinstance(cause, BaseExceptionGroup):  # trio's "all attempts to connect failed"
        cause = cause.exceptions[0]
    return f"{exc}" + (f" ({cause})" if cause is not None and str(cause) not in str(exc) else "")


class PoolStatistics:
    __slots__ = ("connections", "in_flight", "submitted", "completed", "goaways", "connect_failures", "timeouts")

    def __init__(self, **values: int) -> None:
        for name, value in values.items():
            setattr(self, name, value)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class H2Pool:
    """Connections to ``host:port``; run it with ``await nursery.start(pool.run)``.

    Args:
        host, port: the origin.
        ssl_context: TLS settings (ALPN ``h2`` is added); client certificates go here too.
        server_hostname: the name to verify (default: ``host``).
        max_connections: connections opened at most.
        streams_per_connection: streams in flight per connection at most (the server's own
            limit applies too).
        idle_timeout: a connection without traffic this long is closed.
        ping_interval, ping_timeout: PING an idle connection this often; close it if the
            answer takes longer.
        connect_timeout: TCP + TLS + SETTINGS.
        request_timeout: a request the server has not answered after this long fails with
            `ConnectionLost` (and its stream is reset).
        reconnect_min, reconnect_max: after a failed connection (or one sent away before it
            answered anything), wait this long before opening another one, doubling.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        max_connections: int = 4,
        streams_per_connection: int = 100,
        idle_timeout: float = 300.0,
        ping_interval: float = 60.0,
        ping_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        request_timeout: float = 30.0,
        reconnect_min: float = 0.1,
        reconnect_max: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port
        self.origin = f"{host}:{port}"
        ssl_context.set_alpn_protocols(["h2"])
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname or host
        self.max_connections = max_connections
        self.streams_per_connection = streams_per_connection
        self.idle_timeout = idle_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        #: Consecutive failed connections, and no new one before this (trio time).
        self.failed_in_a_row = 0
        self.reconnect_at = 0.0
        self._connections: list[_Connection] = []
        self._connecting = 0
        self._numbers = 0
        self._capacity = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.submitted = 0
        self.completed = 0
        self.goaways = 0
        self.connect_failures = 0
        self.timeouts = 0
        self.last_connect_error: str | None = None

    async def run(self, *, task_status: trio.TaskStatus[H2Pool] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the connections' tasks until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            await trio.sleep_forever()

    async def connect(self) -> trio.abc.Stream:
        stream = await trio.open_tcp_stream(self.host, self.port)
        try:
            tls = trio.SSLStream(stream, self.ssl_context, server_hostname=self.server_hostname, https_compatible=True)
            await tls.do_handshake()
            protocol = tls.selected_alpn_protocol()
            if protocol not in (None, "h2"):
                raise ConnectionLost(f"{self.origin} offered {protocol!r}, not HTTP/2")
        except BaseException:  # a refused certificate, a timeout: the socket is not left to the GC
            await trio.aclose_forcefully(stream)
            raise
        return tls

    # -- submitting ---------------------------------------------------------------------------

    def try_submit(self, headers: list[tuple[bytes, bytes]], body: bytes, callback: Callback) -> bool:
        """Start a request on a connection with a free stream; False if none has one now.

        ``callback`` is called once with an `H2Response` or an `H2Failure`.
        """
        best = None
        free = 0
        for connection in self._connections:
            n = connection.free()
            if n > free:
                best, free = connection, n
        if best is None:
            return False
        try:
            best.submit(headers, body, callback)
        except H2ProtocolError as exc:
            # The connection is closing (its reader has not noticed yet).
            log.info("connection %d to %s cannot take requests: %r", best.number, self.origin, exc)
            best.closed = True
            best.kick()
            return False
        self.submitted += 1
        return True

    async def wait_capacity(self) -> None:
        """Wait until a request may be submitted, opening a connection if the pool may."""
        if any(c.free() > 0 for c in self._connections):
            return
        event = self._capacity
        if event.is_set():
            event = self._capacity = trio.Event()
        if len(self._connections) + self._connecting < self.max_connections and not self._connecting:
            if trio.current_time() < self.reconnect_at and not any(c.streams for c in self._connections):
                # Connections keep failing and none is working: the caller's requests wait
                # (their retries back off) rather than this pool hammering the server.
                raise ConnectionLost(f"cannot connect to {self.origin}: {self.last_connect_error}"
                                     f" ({self.failed_in_a_row} failure(s) in a row; backing off)")
            await self._open()
            return
        await event.wait()

    async def _open(self) -> None:
        assert self._nursery is not None, "run the pool first"
        self._connecting += 1
        self._numbers += 1
        connection = _Connection(self, self._numbers)
        try:
            await self._nursery.start(connection.run)
        finally:
            self._connecting -= 1
        if not connection.closed:
            self._connections.append(connection)
        self._capacity_changed()

    def _connect_failed(self) -> None:
        self.connect_failures += 1
        self.failed_in_a_row += 1
        backoff = min(self.reconnect_max, self.reconnect_min * 2 ** (self.failed_in_a_row - 1))
        self.reconnect_at = trio.current_time() + backoff * random.uniform(0.5, 1.0)

    def _connect_succeeded(self) -> None:
        self.failed_in_a_row = 0
        self.reconnect_at = 0.0

    def _forget(self, connection: _Connection) -> None:
        if connection in self._connections:
            self._connections.remove(connection)
        self._capacity_changed()

    def _capacity_changed(self) -> None:
        self._capacity.set()

    def drop_connections(self) -> None:
        """Close every connection gracefully: no new streams; each closes when its last stream
        is answered (for example after credentials changed)."""
        for connection in self._connections:
            connection.draining = True
            connection.kick()
            if not connection.streams:
                connection.scope.cancel()

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(
            connections=len(self._connections),
            in_flight=sum(len(c.streams) for c in self._connections),
            submitted=self.submitted,
            completed=self.completed,
            goaways=self.goaways,
            connect_failures=self.connect_failures,
            timeouts=self.timeouts,
        )

    def flush(self) -> None:
        """Wake every connection's writer (after a burst of submissions)."""
        for connection in self._connections:
            connection.kick()

