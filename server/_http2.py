"""An HTTP/2 client connection pool on Trio and h2, for push providers (APNs, FCM).

One `H2Pool` talks to one origin over several TLS connections (ALPN ``h2``), opened lazily.
Requests are submitted without waiting (`H2Pool.try_submit`) and answered through a
callback, so a sender can keep thousands in flight without a task each; when no connection
has a free stream, `H2Pool.wait_capacity` opens another one (up to ``max_connections``) or
waits for a stream to finish. That is the backpressure: a slow server never makes the pool
hold more than ``max_connections × streams_per_connection`` requests.

Each connection has one reader task and one writer task; requests only queue frames, so a
caller's cancellation cannot cut a frame. The number of streams per connection follows the
server's SETTINGS_MAX_CONCURRENT_STREAMS (capped by ``streams_per_connection``: h2 counts its
open streams by scanning them, so very many per connection cost CPU on every request).

GOAWAY: h2 4.x closes its state machine on a GOAWAY and then rejects the answers the server
still sends for streams it accepted (``last_stream_id`` and below). `_ClientH2` keeps the
connection open for those answers; the pool opens no new stream on it, fails the streams
above ``last_stream_id`` with `StreamRefused` (never processed, safe to retry), and closes
the connection once the others are answered.

Failures reported to the callback:

- `StreamRefused`: the server did not process the request (GOAWAY, REFUSED_STREAM): retry.
- `ConnectionLost`: the connection broke with the request in flight: the server may or may
  not have processed it.
"""

from __future__ import annotations

import logging
import random
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any

import h2.config
import hpack
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from ._errors import ServerError

__all__ = ["H2Pool", "H2Response", "H2Failure", "StreamRefused", "ConnectionLost", "PoolStatistics"]

log = logging.getLogger("pigeon.http2")

_READ_SIZE = 65536
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


def _hpack_integer(value: int, prefix_bits: int, flags: int) -> bytes:
    """An HPACK integer (RFC 7541 5.1) with ``flags`` in the first byte's high bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((flags | value,))
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_STATIC_FIELDS = {(n, v): i for i, (n, v) in enumerate(hpack.table.HeaderTable.STATIC_TABLE, 1)}
_STATIC_NAMES: dict[bytes, int] = {}
for (_name, _), _index in _STATIC_FIELDS.items():
    _STATIC_NAMES.setdefault(_name, _index)


class _StatelessHpack:
    """An HPACK encoder that never uses the dynamic table (and says so: its first block sets
    the table size to 0), so that each field's encoding depends on nothing but the field.

    Requests to APNs repeat almost every field (authority, topic, push type, the provider
    token), so their encodings are cached; hpack's general encoder spends ~20 µs a request
    searching its tables and Huffman-coding. Values are sent as they are (no Huffman):
    a few more bytes on the wire. Sensitive fields (`hpack.NeverIndexedHeaderTuple`) are
    sent as never-indexed literals.
    """

    _CACHE_LIMIT = 1024

    def __init__(self) -> None:
        self.header_table_size = 4096  # h2 sets it from the peer's SETTINGS; unused here
        self._first = True
        self._cache: dict[tuple[bytes, bytes, bool], bytes] = {}

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        cache = self._cache
        parts = []
        if self._first:
            self._first = False
            parts.append(b"\x20")  # dynamic table size update: 0
        for field in headers:
            name, value = field
            sensitive = type(field) is hpack.NeverIndexedHeaderTuple
            key = (name, value, sensitive)
            encoded = cache.get(key)
            if encoded is None:
                encoded = self._field(name, value, sensitive)
                if name != b":path" and (sensitive or len(value) <= 128):  # values that may repeat
                    if len(cache) >= self._CACHE_LIMIT:
                        cache.clear()
                    cache[key] = encoded
            parts.append(encoded)
        return b"".join(parts)

    @staticmethod
    def _field(name: bytes, value: bytes, sensitive: bool) -> bytes:
        if not sensitive:
            index = _STATIC_FIELDS.get((name, value))
            if index is not None:
                return _hpack_integer(index, 7, 0x80)
        flags = 0x10 if sensitive else 0x00  # never indexed / without indexing
        index = _STATIC_NAMES.get(name)
        if index is not None:
            head = _hpack_integer(index, 4, flags)
        else:
            head = bytes((flags,)) + _hpack_integer(len(name), 7, 0) + name
        return head + _hpack_integer(len(value), 7, 0) + value


class _ClientH2(h2.connection.H2Connection):
    """h2's connection, except that

    - a received GOAWAY leaves it open for the answers to the streams the server accepted
      (see the module docstring);
    - it counts open streams from the pool's own table instead of scanning all of its streams
      on every request (h2 also drops its closed streams during that scan: `forget` does it
      for the streams the pool saw end).
    """

    #: How closed streams were closed, kept for frames that arrive late (h2 keeps 65,536 per
    #: connection, ~6 MB each: memory that grows for the first 65,536 requests).
    MAX_CLOSED_STREAMS = 2048

    def __init__(self, config: h2.config.H2Configuration, streams: dict[int, Any]) -> None:
        super().__init__(config=config)
        self._pool_streams = streams
        self._ended: list[int] = []

    @property
    def open_outbound_streams(self) -> int:
        return len(self._pool_streams)

    def forget(self, stream_id: int) -> None:
        """The pool is done with ``stream_id``; drop h2's record of it once it is closed."""
        ended = self._ended
        ended.append(stream_id)
        if len(ended) >= 64:
            streams, closed = self.streams, self._closed_streams
            keep = []
            for sid in ended:
                stream = streams.get(sid)
                if stream is None:
                    continue
                if stream.closed:
                    del streams[sid]
                    closed[sid] = stream.closed_by
                else:  # the request body is still going out
                    keep.append(sid)
            self._ended = keep

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[Any]]:
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors._error_code_from_int(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


_CONFIG = h2.config.H2Configuration(
    client_side=True,
    header_encoding=None,
    # The senders build well-formed headers; validating them costs ~30 µs a request.
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    validate_inbound_headers=False,
    normalize_inbound_headers=False,
)


class _Stream:
    __slots__ = ("callback", "status", "headers", "body", "started")

    def __init__(self, callback: Callback, started: float) -> None:
        self.callback = callback
        self.started = started
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []


class _Connection:
    def __init__(self, pool: H2Pool, number: int) -> None:
        self.pool = pool
        self.number = number
        self.streams: dict[int, _Stream] = {}
        self.h2 = _ClientH2(_CONFIG, self.streams)
        if pool.stateless_hpack:
            self.h2.encoder = _StatelessHpack()  # type: ignore[assignment]
        #: Bodies waiting for flow-control window: (stream id, remaining bytes).
        self.blocked: deque[tuple[int, bytes]] = deque()
        self.ready = False
        #: Streams allowed at once: the server's SETTINGS_MAX_CONCURRENT_STREAMS, capped by ours.
        self.limit = 0
        self.draining = False
        self.closed = False
        self.stream: trio.abc.Stream | None = None
        self.scope = trio.CancelScope()
        self._queued = trio.Event()
        #: Bytes h2 produced while reading, for the writer (which alone writes).
        self._outbox: list[bytes] = []
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
        h2c = self.h2
        now = trio.current_time()
        stream_id = h2c.get_next_available_stream_id()
        if stream_id >= _LAST_STREAM_ID:
            # Out of stream ids after this one (2**30 requests): a new connection takes over.
            self.draining = True
        h2c.send_headers(stream_id, headers, end_stream=not body)
        self.streams[stream_id] = _Stream(callback, now)
        if body:
            if self.blocked or h2c.local_flow_control_window(stream_id) < len(body):
                self.blocked.append((stream_id, body))
            else:
                h2c.send_data(stream_id, body, end_stream=True)
        self.opened_streams += 1
        self.last_activity = now
        self._queued.set()

    def _send_blocked(self) -> None:
        h2c = self.h2
        while self.blocked:
            stream_id, body = self.blocked[0]
            if stream_id not in self.streams:
                self.blocked.popleft()
                continue
            window = min(h2c.local_flow_control_window(stream_id), h2c.max_outbound_frame_size)
            if window <= 0:
                return
            chunk, rest = body[:window], body[window:]
            h2c.send_data(stream_id, chunk, end_stream=not rest)
            if rest:
                self.blocked[0] = (stream_id, rest)
            else:
                self.blocked.popleft()

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
                    h2c = self.h2
                    h2c.initiate_connection()
                    h2c.update_settings(
                        {
                            h2.settings.SettingCodes.ENABLE_PUSH: 0,
                            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
                        }
                    )
                    h2c.increment_flow_control_window(_WINDOW - 65535)
                    await self.stream.send_all(h2c.data_to_send())
                    # Ready once the server's SETTINGS tell us how many streams it allows.
                    while not self.ready:
                        data = await self.stream.receive_some(_READ_SIZE)
                        if not data:
                            raise ConnectionLost("the server closed the connection during the handshake")
                        self._receive(data)
                        await self._write_now()
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
                self.h2.close_connection()
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
                try:
                    self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                except h2.exceptions.ProtocolError:
                    pass  # already closed on h2's side
                pool.timeouts += 1
                self._done(stream_id, stream, ConnectionLost(f"no answer from {pool.origin} within {timeout:g}s"))
            if late:
                self._queued.set()
                if self.draining and not self.streams:
                    self.scope.cancel()

    def _receive(self, data: bytes) -> None:
        streams = self.streams
        for event in self.h2.receive_data(data):
            kind = type(event)
            if kind is h2.events.ResponseReceived:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    for name, value in event.headers:
                        if name == b":status":
                            stream.status = int(value)
                        else:
                            stream.headers[name] = value
            elif kind is h2.events.DataReceived:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.body.append(event.data)
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif kind is h2.events.StreamEnded:
                stream = streams.pop(event.stream_id, None)
                if self.blocked and any(sid == event.stream_id for sid, _ in self.blocked):
                    # Answered before our body was all sent: end our side too.
                    self.h2.reset_stream(event.stream_id, h2.errors.ErrorCodes.CANCEL)
                if stream is not None:
                    self._done(event.stream_id, stream, H2Response(stream.status, stream.headers, b"".join(stream.body)))
            elif kind is h2.events.StreamReset:
                stream = streams.pop(event.stream_id, None)
                if stream is not None:
                    if event.error_code == h2.errors.ErrorCodes.REFUSED_STREAM:
                        self._done(event.stream_id, stream, StreamRefused("the server refused the stream (REFUSED_STREAM)"))
                    else:
                        self._done(event.stream_id, stream, ConnectionLost(f"the server reset the stream ({event.error_code!r})"))
            elif kind is h2.events.WindowUpdated:
                self._send_blocked()
            elif kind is h2.events.RemoteSettingsChanged:
                self.limit = min(self.h2.remote_settings.max_concurrent_streams, self.pool.streams_per_connection)
                self.ready = True
                if self.blocked:  # the initial window may have grown
                    self._send_blocked()
                self.pool._capacity_changed()
            elif kind is h2.events.ConnectionTerminated:
                self._goaway(event)
            elif kind is h2.events.PingAckReceived:
                self._pong.set()

    def _goaway(self, event: h2.events.ConnectionTerminated) -> None:
        last = event.last_stream_id if event.last_stream_id is not None else 0
        reason = event.additional_data.decode("utf-8", "replace") if event.additional_data else ""
        self.draining = True
        self.pool.goaways += 1
        if not self.answered:
            # Sent away before answering anything (a refused certificate, a server shutting
            # down): as bad as failing to connect, so the pool backs off before the next one.
            self.pool._connect_failed()
            self.pool.last_connect_error = f"GOAWAY before any answer {reason}".strip()
        log.info("GOAWAY from %s on connection %d (last stream %d) %s", self.pool.origin, self.number, last, reason)
        refused = [sid for sid in self.streams if sid > last]
        for stream_id in refused:
            self._done(stream_id, self.streams.pop(stream_id), StreamRefused(f"GOAWAY before the server read it {reason}".strip()))
        self.pool._capacity_changed()

    def _done(self, stream_id: int, stream: _Stream, outcome: Any) -> None:
        self.h2.forget(stream_id)
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
        self.streams.clear()  # in place: the h2 connection counts open streams from it
        self.blocked.clear()
        for stream_id, stream in streams.items():
            self._done(stream_id, stream, error)


#: The highest client stream id (odd, below 2**31).
_LAST_STREAM_ID = 2**31 - 1

_CONNECTION_ERRORS = (
    OSError, trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, h2.exceptions.ProtocolError,
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
        stateless_hpack: encode headers without HPACK's dynamic table, caching each field's
            encoding (much less CPU for requests that repeat their fields, a few more bytes).
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
        stateless_hpack: bool = False,
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
        self.stateless_hpack = stateless_hpack
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
        tls = trio.SSLStream(stream, self.ssl_context, server_hostname=self.server_hostname, https_compatible=True)
        await tls.do_handshake()
        protocol = tls.selected_alpn_protocol()
        if protocol not in (None, "h2"):
            raise ConnectionLost(f"{self.origin} offered {protocol!r}, not HTTP/2")
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
        except h2.exceptions.ProtocolError as exc:
            # h2 closed the connection under us (its reader has not noticed yet).
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

