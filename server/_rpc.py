"""The socket protocol's server: listeners, connections, calls.

Each connection has a reader task, a writer task and a task per call (see `_Connection`).
Whatever a peer does costs only its own connection, and bounded memory:

- Connections: at most ``max_connections``, ``max_connections_per_peer`` from one address, and
  ``max_handshakes`` that have not said hello yet. Past a limit the oldest connection still
  waiting for its hello (from the address with the most of them) is closed to make room, and
  while more than half of ``max_handshakes`` are taken every connection without a hello has
  ``busy_handshake_timeout`` seconds to send it instead of ``handshake_timeout``: idle sockets
  cannot lock honest clients out, and connections that completed a handshake keep their places.
- Calls: ``max_calls`` in flight per connection (announced in the welcome; more are refused
  with RESOURCE_EXHAUSTED). The reader stops reading while the connection's calls hold more
  than ``_REQUEST_HIGH_WATER`` bytes of requests, or more than ``_HIGH_WATER`` bytes of answers
  wait to be written.
- Answers: a call (unary or streamed) starts only when its answer has room: the connection's
  answers waiting to be written, plus a reservation for each call running (the largest answer
  or item its method gave lately, `Listener.reservation`), stay under ``_HIGH_WATER``, and all
  connections' together under ``reply_buffer`` or the connection's share of it; a connection
  with nothing waiting may always start one call. A stream's items wait while more than
  ``_HIGH_WATER`` bytes wait to be written. So a client that pipelines calls for large answers
  and reads nothing holds about ``_HIGH_WATER`` bytes of them (plus one answer larger than its
  method's reservation), and all such clients together about ``reply_buffer`` (plus one answer
  each); a client that reads nothing for ``write_timeout`` seconds is disconnected.
- Failures: a frame that cannot be decoded costs its call or its connection (see
  `protocols.connection`); anything unexpected while serving a connection closes that
  connection only, never the listener.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket as _stdlib_socket
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import msgspec.inspect
import trio
from hdrh.histogram import HdrHistogram

from protocols import api
from protocols.connection import (
    CallCancelled,
    CallReceived,
    CreditGranted,
    Closed,
    HelloReceived,
    ServerConnection,
    Terminated,
)
from protocols.errors import Status
from protocols.frames import Call
from protocols.framing import DECODE_ERRORS, decode_error_text

from ._actor import Actor
from ._errors import ServerError
from ._records import check_depth

__all__ = ["Router", "CallContext", "Listener", "parse_address"]

log = logging.getLogger("pigeon.rpc")

UnaryHandler = Callable[["CallContext", Any], Awaitable[Any]]
StreamHandler = Callable[["CallContext", Any, Callable[[Any], Awaitable[None]]], Awaitable[None]]

_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_STREAM_FLUSH_BYTES = 32 * 1024
#: Bytes written per send; each must make progress within write_timeout.
_WRITE_CHUNK = 64 * 1024
#: Bytes of answers a connection's calls may have queued or reserved (see the module docstring).
_HIGH_WATER = 1024 * 1024
#: Bytes of requests read and not yet decoded that a connection may hold before its reader stops.
_REQUEST_HIGH_WATER = 4 * 1024 * 1024
#: The reservation for a method's answer before it has given any.
_FIRST_ESTIMATE = 16 * 1024
#: Seconds in which a method's largest answer so far counts half as much in its reservations.
_ESTIMATE_HALF_LIFE_S = 10.0


class CallContext(msgspec.Struct):
    """What a handler knows about the call besides its request."""

    method: str
    peer: str
    client: str
    #: The call's undecoded body, for handlers that decode it themselves.
    body: msgspec.Raw


class _Route(msgspec.Struct, frozen=True):
    spec: api.MethodSpec
    handler: Callable[..., Awaitable[Any]]
    decoder: msgspec.msgpack.Decoder | None
    #: The request's free-form maps (``dict[str, Any]`` fields): their depth is checked.
    maps: tuple[str, ...] = ()


def _free_form_maps(request_type: type) -> tuple[str, ...]:
    """The fields of ``request_type`` that hold any map (attributes, payloads, ...)."""
    names = []
    for field in msgspec.inspect.type_info(request_type).fields:  # type: ignore[attr-defined]
        types = field.type.types if isinstance(field.type, msgspec.inspect.UnionType) else (field.type,)
        if any(isinstance(t, msgspec.inspect.DictType) and isinstance(t.value_type, msgspec.inspect.AnyType)
               for t in types):
            names.append(field.name)
    return tuple(names)


class Router:
    """Maps method names to handlers; requests are decoded against the method's types."""

    def __init__(self) -> None:
        self.routes: dict[str, _Route] = {}

    def add(self, request_type: type, handler: Callable[..., Awaitable[Any]], *, raw: bool = False) -> None:
        """Route ``request_type.method`` to ``handler(ctx, request)`` (or ``(ctx, request, send)``
        for a streamed method). With ``raw`` the handler gets ``None`` and decodes ``ctx.body``."""
        spec = api.METHODS[request_type.method]  # type: ignore[attr-defined]
        decoder = None if raw else msgspec.msgpack.Decoder(spec.request)
        self.routes[spec.name] = _Route(spec, handler, decoder, () if raw else _free_form_maps(spec.request))


class _MethodStats:
    __slots__ = ("calls", "errors", "histogram")

    def __init__(self) -> None:
        self.calls = 0
        self.errors = 0
        self.histogram = HdrHistogram(1, 60_000_000, 2)

    def snapshot(self) -> api.MethodStats:
        h = self.histogram
        return api.MethodStats(
            calls=self.calls,
            errors=self.errors,
            p50_us=float(h.get_value_at_percentile(50)),
            p99_us=float(h.get_value_at_percentile(99)),
            max_us=float(h.get_max_value()),
        )


def parse_address(address: str) -> tuple[str, str | int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``unix:PATH`` → (host or "unix", port or path)."""
    if address.startswith("unix:"):
        path = address[5:]
        if not path:
            raise ValueError(f"{address!r}: a unix address needs a path (unix:/run/pigeon.sock)")
        return "unix", path
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not HOST:PORT (e.g. 127.0.0.1:7600) or unix:PATH")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class Listener(Actor):
    """Serves the socket protocol on every configured address.

    Args:
        router: the methods.
        listen: addresses (see `parse_address`).
        ssl_context: wrap TCP connections in TLS when given.
        server_name: announced in the welcome.
        max_frame, max_calls: per connection, announced in the welcome.
        max_connections: further connections get a goaway and are closed.
        max_connections_per_peer: connections from one address (host) at most.
        max_handshakes: connections waiting for their hello at most.
        write_timeout: seconds a write may make no progress before the connection is dropped.
        handshake_timeout: seconds a new connection has to send its hello.
        busy_handshake_timeout: the same, while more than half of ``max_handshakes`` are taken.
        reply_buffer: bytes of answers queued or reserved for all connections together.
    """

    def __init__(
        self,
        router: Router,
        *,
        listen: list[str],
        ssl_context: ssl.SSLContext | None = None,
        server_name: str,
        max_frame: int,
        max_calls: int,
        max_connections: int,
        max_connections_per_peer: int | None = None,
        max_handshakes: int | None = None,
        write_timeout: float,
        handshake_timeout: float = 10.0,
        busy_handshake_timeout: float = 1.0,
        reply_buffer: int = 64 * 1024 * 1024,
    ) -> None:
        super().__init__("listener", 1)
        self.router = router
        self.listen = listen
        self.ssl_context = ssl_context
        self.server_name = server_name
        self.max_frame = max_frame
        self.max_calls = max_calls
        self.max_connections = max_connections
        self.max_connections_per_peer = max_connections_per_peer or max_connections
        self.max_handshakes = max_handshakes or max_connections
        self.write_timeout = write_timeout
        self.handshake_timeout = handshake_timeout
        self.busy_handshake_timeout = min(busy_handshake_timeout, handshake_timeout)
        self.reply_buffer = reply_buffer
        #: The bound addresses, once listening (a port of 0 is replaced by the real one).
        self.addresses: list[str] = []
        self.connections: set[_Connection] = set()
        #: Connections still waiting for their hello, oldest first, and their number by host.
        self.handshaking: dict[_Connection, None] = {}
        self.handshaking_hosts: Counter[str] = Counter()
        #: Connections per peer host.
        self.peers: Counter[str] = Counter()
        #: Connections closed to make room for new ones (no hello yet, limits reached).
        self.evicted = 0
        #: Bytes of answers queued, being written or reserved, all connections together.
        self.buffered = 0
        #: Set (and replaced) whenever buffered bytes are freed: calls waiting for room wake.
        self.room = trio.Event()
        #: The largest answer (or stream item) each method gave lately, and when.
        self.answer_sizes: dict[str, tuple[int, float]] = {}
        self.method_stats: dict[str, _MethodStats] = {}
        self.accepted = 0
        self.protocol_errors = 0
        #: Connections ended by an unexpected error in their own handling (logged).
        self.connection_failures = 0
        self.frames_in = 0
        self.frames_out = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await self._open_listeners()
        try:
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    for listener in listeners:
                        accepting.start_soon(self._accept_loop, listener, connections)
                    log.info("listening on %s", ", ".join(self.addresses))
                    task_status.started()
                    while await self.receive_batch():
                        pass
                    accepting.cancel_scope.cancel()
                # Stop requested: no new connections; tell the open ones, let their calls finish.
                for connection in list(self.connections):
                    connection.go_away(Status.UNAVAILABLE, "the server is shutting down")
        finally:
            for listener in listeners:
                with trio.CancelScope(shield=True):
                    await listener.aclose()
            for address in self.addresses:
                if address.startswith("unix:"):
                    try:
                        os.unlink(address[5:])
                    except OSError:
                        pass

    async def _open_listeners(self) -> list[trio.abc.Listener[Any]]:
        listeners: list[trio.abc.Listener[Any]] = []
        addresses = []
        for address in self.listen:
            try:
                listeners.extend(await self._listen_on(address, addresses))
            except OSError as exc:
                for listener in listeners:
                    await listener.aclose()
                raise ServerError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
        if self.ssl_context is not None:
            listeners = [
                l if isinstance(l, trio.SocketListener) and l.socket.family == _stdlib_socket.AF_UNIX
                else trio.SSLListener(l, self.ssl_context)
                for l in listeners
            ]
        self.addresses = addresses
        return listeners

    async def _listen_on(self, address: str, addresses: list[str]) -> list[trio.abc.Listener[Any]]:
        try:
            host, port = parse_address(address)
        except ValueError as exc:
            raise ServerError(str(exc)) from None
        if host == "unix":
            assert isinstance(port, str)
            sock = trio.socket.socket(_stdlib_socket.AF_UNIX, _stdlib_socket.SOCK_STREAM)
            if os.path.exists(port):
                if _unix_socket_in_use(port):
                    raise ServerError(f"cannot listen on {address}: a running server is listening there")
                os.unlink(port)  # left behind by a server that stopped
            await sock.bind(port)
            sock.listen(128)
            addresses.append(f"unix:{port}")
            return [trio.SocketListener(sock)]
        listeners: list[trio.abc.Listener[Any]] = []
        if not _is_loopback(host):
            log.warning(
                "listening on %s: anyone who can reach it can call every method (API keys are not enforced yet)",
                address,
            )
        for tcp in await trio.open_tcp_listeners(int(port), host=host):
            name = tcp.socket.getsockname()
            addresses.append(f"[{name[0]}]:{name[1]}" if ":" in name[0] else f"{name[0]}:{name[1]}")
            listeners.append(tcp)
        return listeners

    async def _accept_loop(self, listener: trio.abc.Listener[Any], nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                    log.error("accept failed (%s); retrying in 100 ms", os.strerror(exc.errno or 0))
                    await trio.sleep(0.1)
                    continue
                raise
            self.accepted += 1
            nursery.start_soon(self._serve_connection, stream)

    async def _serve_connection(self, stream: trio.abc.Stream) -> None:
        connection = _Connection(self, stream)
        refusal = self._make_room(connection)
        if refusal is not None:
            await connection.refuse(Status.RESOURCE_EXHAUSTED, refusal)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
            return
        self.connections.add(connection)
        self.peers[connection.host] += 1
        self.handshaking[connection] = None
        self.handshaking_hosts[connection.host] += 1
        if len(self.handshaking) > self.max_handshakes // 2:
            # Busy with connections that say nothing: every one of them gets the short budget.
            for waiting in self.handshaking:
                waiting.shorten_handshake(self.busy_handshake_timeout)
        try:
            await connection.serve()
        except Exception:
            # A connection's failure, whatever it is, ends that connection only: never the
            # listener (a restart would drop every other client).
            self.connection_failures += 1
            log.exception("connection from %s failed; closing it", connection.peer)
        finally:
            self._forget(connection)
            connection.release()
            self.frames_in += connection.conn.frames_in
            self.frames_out += connection.conn.frames_out
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    def _make_room(self, new: _Connection) -> str | None:
        """Make room for a new connection by closing the oldest ones that have not said hello
        yet where a limit is reached; or say why it is refused."""
        host = new.host
        if self.peers[host] >= self.max_connections_per_peer and not self._evict(host):
            return f"{host} already has {self.max_connections_per_peer} connections (max_connections_per_peer)"
        if len(self.handshaking) >= self.max_handshakes:
            self._evict()
        if len(self.connections) >= self.max_connections and not self._evict():
            return f"the server already has {self.max_connections} connections"
        return None

    def _evict(self, host: str | None = None) -> bool:
        """Close the oldest connection still waiting for its hello from ``host``, or from the
        host with the most of them (a flood from one address does not close others')."""
        if host is None:
            if not self.handshaking_hosts:
                return False
            host = max(self.handshaking_hosts, key=self.handshaking_hosts.__getitem__)
        for connection in self.handshaking:
            if connection.host == host:
                break
        else:
            return False
        self._forget(connection)
        self.evicted += 1
        connection.evict("no hello was received, and the server needs the place for a new connection")
        return True

    def said_hello(self, connection: _Connection) -> None:
        """The connection is no longer waiting for its hello."""
        if self.handshaking.pop(connection, False) is None:
            self.handshaking_hosts[connection.host] -= 1
            if not self.handshaking_hosts[connection.host]:
                del self.handshaking_hosts[connection.host]

    def _forget(self, connection: _Connection) -> None:
        """The connection no longer takes a place (closed, or closing after an eviction)."""
        if connection in self.connections:
            self.connections.discard(connection)
            self.said_hello(connection)
            self.peers[connection.host] -= 1
            if not self.peers[connection.host]:
                del self.peers[connection.host]

    def buffered_changed(self, delta: int) -> None:
        self.buffered += delta
        if delta < 0:
            self.room.set()
            self.room = trio.Event()

    def reservation(self, method: str) -> int:
        """Bytes a call of ``method`` reserves for its answer (or a stream for each item) while
        it runs: the largest the method gave, halved every `_ESTIMATE_HALF_LIFE_S` since (so
        that one large answer does not hold every later call back for good)."""
        seen = self.answer_sizes.get(method)
        if seen is None:
            return _FIRST_ESTIMATE
        size, when = seen
        return size >> min(62, int((trio.current_time() - when) / _ESTIMATE_HALF_LIFE_S))

    def answered(self, method: str, size: int) -> None:
        if size >= self.reservation(method) or method not in self.answer_sizes:
            self.answer_sizes[method] = (size, trio.current_time())

    def stats_for(self, method: str) -> _MethodStats:
        stats = self.method_stats.get(method)
        if stats is None:
            stats = self.method_stats[method] = _MethodStats()
        return stats

    def connection_stats(self) -> api.ConnectionStats:
        return api.ConnectionStats(
            open=len(self.connections),
            handshaking=len(self.handshaking),
            evicted=self.evicted,
            buffered_bytes=self.buffered,
            accepted=self.accepted,
            closed_by_protocol_error=self.protocol_errors,
            frames_in=self.frames_in + sum(c.conn.frames_in for c in self.connections),
            frames_out=self.frames_out + sum(c.conn.frames_out for c in self.connections),
        )

    def details(self) -> dict[str, Any]:
        return {"addresses": self.addresses, "connections": len(self.connections)}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _unix_socket_in_use(path: str) -> bool:
    probe = _stdlib_socket.socket(_stdlib_socket.AF_UNIX, _stdlib_socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def _peer_name(stream: trio.abc.Stream) -> tuple[str, str]:
    """(host, host:port) of the peer; ``unix`` for a unix socket."""
    inner = getattr(stream, "transport_stream", stream)
    sock = getattr(inner, "socket", None)
    try:
        name = sock.getpeername() if sock is not None else "?"
    except OSError:
        return "?", "?"
    if isinstance(name, tuple):
        return name[0], f"{name[0]}:{name[1]}"
    return "unix", name or "unix"


class _Connection:
    """One client connection: a reader, a writer, and a task per call.

    - The reader never waits for a call to finish: every frame is handled as it arrives (a
      call beyond ``max_calls`` is refused by the protocol layer), so credit, cancel and ping
      frames are always seen. It stops reading only while the connection holds too many bytes
      of requests or of answers (`_may_read`), which is how a client that does not read is
      held back.
    - A call runs once its answer has room (`_may_start`); a stream's item waits for room
      before it is queued.
    - Only the writer writes to the socket, so cancelling a call can never cut a frame in
      half. A write that makes no progress for ``write_timeout`` seconds closes the connection.
    """

    def __init__(self, listener: Listener, stream: trio.abc.Stream) -> None:
        self.listener = listener
        self.stream = stream
        self.host, self.peer = _peer_name(stream)
        self.conn = ServerConnection(
            server=listener.server_name, max_frame=listener.max_frame, max_calls=listener.max_calls
        )
        self.calls: dict[int, trio.CancelScope] = {}
        #: Flow-control windows of streamed calls that asked for one (``Call.window``).
        self.windows: dict[int, _Window] = {}
        self.cancelled_by_client: set[int] = set()
        self.closing = False
        #: False once the reader has stopped for good (a fatal violation, or the client closed).
        self.reading = True
        #: Cancelled to drop the connection at once (broken, stuck, or a handshake timeout).
        self.scope = trio.CancelScope()
        #: Cancelled to stop reading once nothing is left to answer.
        self.read_scope = trio.CancelScope()
        #: Ends when the hello arrives; its deadline is the time left to send it.
        self.started = trio.current_time()
        self.handshake = trio.CancelScope(deadline=self.started + listener.handshake_timeout)
        self._queued = trio.Event()
        self._progress = trio.Event()
        self._writing = False
        #: Bytes taken by the writer and not yet written.
        self._writing_bytes = 0
        #: Bytes reserved for the answers of the calls running.
        self.reserved = 0
        #: Bytes of the requests of the calls open.
        self.request_bytes = 0
        #: This connection's part of ``listener.buffered``.
        self._counted = 0

    # -- memory -------------------------------------------------------------------------------

    @property
    def answer_bytes(self) -> int:
        """Bytes of answers queued, being written or reserved."""
        return self.conn.pending_bytes + self._writing_bytes + self.reserved

    def account(self) -> None:
        """Bring ``listener.buffered`` up to date with this connection's answer bytes."""
        held = self.answer_bytes
        if held != self._counted:
            delta, self._counted = held - self._counted, held
            self.listener.buffered_changed(delta)
            if delta < 0:
                self._progress.set()
                self._progress = trio.Event()

    def release(self) -> None:
        """The connection is gone: nothing it holds counts any more."""
        if self._counted:
            self.listener.buffered_changed(-self._counted)
            self._counted = 0

    def _may_read(self) -> bool:
        return (self.conn.pending_bytes + self._writing_bytes <= _HIGH_WATER
                and self.request_bytes <= _REQUEST_HIGH_WATER)

    def _may_start(self, reservation: int) -> bool:
        """Whether a call reserving ``reservation`` bytes for its answer may start: there is
        room on this connection, and in all or within the connection's share of all; or the
        connection has nothing waiting (so that it always makes progress)."""
        held = self.answer_bytes
        if held == 0:
            return True
        if held + reservation > _HIGH_WATER:
            return False
        listener = self.listener
        return (listener.buffered + reservation <= listener.reply_buffer
                or held + reservation <= listener.reply_buffer // len(listener.connections))

    async def _wait_for_room(self, reservation: int) -> None:
        while not self._may_start(reservation):
            self.kick()
            room = self.listener.room
            await room.wait()

    async def _wait_writable(self) -> None:
        """Wait while more than ``_HIGH_WATER`` bytes wait to be written (a stream's items)."""
        while self.conn.pending_bytes + self._writing_bytes > _HIGH_WATER:
            self.kick()
            progress = self._progress
            await progress.wait()

    # -- writing ------------------------------------------------------------------------------

    def kick(self) -> None:
        """Tell the writer that frames are queued."""
        self._queued.set()

    async def _writer(self) -> None:
        while True:
            await self._queued.wait()
            self._queued = trio.Event()
            data = self.conn.data_to_send()
            self._writing = True
            self._writing_bytes = len(data)
            # In chunks, each with its own timer: a client that reads slowly but steadily is
            # served; one that reads nothing for write_timeout seconds is dropped.
            view = memoryview(data)
            for offset in range(0, len(data), _WRITE_CHUNK):
                chunk = view[offset : offset + _WRITE_CHUNK]
                with trio.move_on_after(self.listener.write_timeout) as waited:
                    try:
                        await self.stream.send_all(chunk)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as exc:
                        log.debug("send to %s failed: %r", self.peer, exc)
                        self.scope.cancel()
                        return
                if waited.cancelled_caught:
                    log.warning(
                        "client %s read nothing for %gs; closing its connection",
                        self.peer, self.listener.write_timeout,
                    )
                    self.scope.cancel()
                    return
                self._writing_bytes -= len(chunk)
                self.account()
            self._writing = False
            self._progress.set()
            self._progress = trio.Event()

    async def _drain(self) -> None:
        """Wait until everything queued has been written."""
        while self.conn.pending_bytes or self._writing:
            self.kick()
            progress = self._progress
            await progress.wait()

    # -- lifecycle ----------------------------------------------------------------------------

    async def refuse(self, code: Status, message: str) -> None:
        """Turn the connection away before serving it (a goaway, then close)."""
        self.conn.send_goaway(code, message)
        with trio.move_on_after(1):
            try:
                await self.stream.send_all(self.conn.data_to_send())
            except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
                pass

    def go_away(self, code: Status, message: str) -> None:
        """Send a goaway: no new calls; close once the open ones are answered."""
        self.conn.send_goaway(code, message)
        self.closing = True
        self.kick()
        if not self.conn.open_calls:
            self.read_scope.cancel()

    def evict(self, message: str) -> None:
        """Close a connection that has not said hello: a goaway, and one second to write it."""
        log.warning("closing connection from %s: %s", self.peer, message)
        self.go_away(Status.RESOURCE_EXHAUSTED, message)
        self.scope.deadline = min(self.scope.deadline, trio.current_time() + 1)

    def shorten_handshake(self, seconds: float) -> None:
        """Give the connection at most ``seconds`` from its start to send its hello."""
        self.handshake.deadline = min(self.handshake.deadline, self.started + seconds)

    async def serve(self) -> None:
        with self.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer)
                nursery.start_soon(self._handshake_deadline)
                async with trio.open_nursery() as calls:
                    with self.read_scope:
                        await self._read(calls)
                # Nothing more to read and every call answered: write the rest, then close. The
                # writer's per-chunk write_timeout drops a client that stops reading.
                await self._drain()
                nursery.cancel_scope.cancel()

    async def _handshake_deadline(self) -> None:
        with self.handshake:
            await trio.sleep_forever()
        if self.conn.hello is None:
            log.warning("no hello from %s within %gs; closing", self.peer, trio.current_time() - self.started)
            self.scope.cancel()

    async def _read(self, calls: trio.Nursery) -> None:
        conn = self.conn
        while True:
            while not self._may_read():
                self.kick()
                progress = self._progress
                await progress.wait()
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as exc:
                log.debug("connection from %s broke: %r", self.peer, exc)
                calls.cancel_scope.cancel()
                return
            for event in conn.receive_data(data):
                if isinstance(event, CallReceived):
                    # The call's scope and window exist from now on, so that a cancel or a
                    # credit read in this same chunk finds them.
                    call = event.call
                    scope = self.calls[call.id] = trio.CancelScope()
                    if call.timeout_ms is not None:
                        scope.deadline = trio.current_time() + call.timeout_ms / 1000
                    if call.window is not None and self.reading:
                        self.windows[call.id] = _Window(call.window)
                    self.request_bytes += len(call.body)
                    calls.start_soon(self._run_call, call, scope)
                elif isinstance(event, CreditGranted):
                    window = self.windows.get(event.id)
                    if window is not None:
                        window.grant(event.items)
                elif isinstance(event, CallCancelled):
                    scope = self.calls.get(event.id)
                    if scope is not None:
                        self.cancelled_by_client.add(event.id)
                        scope.cancel()
                elif isinstance(event, HelloReceived):
                    log.debug("client %r connected from %s", event.hello.client, self.peer)
                    self.listener.said_hello(self)
                    self.handshake.cancel()
                elif isinstance(event, Terminated):
                    # The stream cannot be trusted any more: read nothing else, but answer the
                    # calls already received (the goaway's last_id promises it).
                    self.listener.protocol_errors += 1
                    log.warning("closing connection from %s: %s: %s", self.peer, event.code, event.message)
                    self._reader_gone()
                    self.kick()
                    return
                elif isinstance(event, Closed):
                    if event.truncated:
                        log.warning(
                            "connection from %s closed in the middle of a frame (%d bytes discarded)",
                            self.peer, event.truncated,
                        )
                    # The client will send nothing more; answer what is open if it still reads.
                    self._reader_gone()
                    return
            self.account()
            self.kick()
            if self.closing and not conn.open_calls:
                return

    def _reader_gone(self) -> None:
        """No frame will be read any more, so no credit can come: lift the streams' windows."""
        self.reading = False
        for window in self.windows.values():
            window.grant(2**62)

    # -- calls --------------------------------------------------------------------------------

    async def _run_call(self, call: Call, scope: trio.CancelScope) -> None:
        known = call.method in self.listener.router.routes
        stats = self.listener.stats_for(call.method if known else "(unknown method)")
        started = time.perf_counter()
        ok = False
        try:
            ok = await self._dispatch(call, scope)
        finally:
            if self.calls.get(call.id) is scope:  # else the id was answered and is in use again
                del self.calls[call.id]
                self.windows.pop(call.id, None)
                self.cancelled_by_client.discard(call.id)
            self.request_bytes -= len(call.body)
            self._progress.set()  # the reader may be waiting for request bytes to be freed
            self._progress = trio.Event()
            self.account()
            stats.calls += 1
            stats.errors += not ok
            stats.histogram.record_value(max(1, int((time.perf_counter() - started) * 1e6)))
        self.kick()
        if self.closing and not self.conn.open_calls:
            self.read_scope.cancel()

    async def _dispatch(self, call: Call, scope: trio.CancelScope) -> bool:
        """Run the call's handler and queue its answer; True if it succeeded."""
        conn = self.conn
        route = self.listener.router.routes.get(call.method)
        if route is None:
            conn.send_error(call.id, Status.UNIMPLEMENTED, f"unknown method {call.method!r}", field="$.method")
            return False
        # What its answer, or each item of a stream, may take: a stream holds one at a time.
        reservation = self.listener.reservation(call.method)
        try:
            with scope:
                # A cancel or deadline read before the call started stops it here, even if its
                # handler would never suspend.
                await trio.lowlevel.checkpoint_if_cancelled()
                await self._wait_for_room(reservation)
                self.reserved += reservation
                self.account()  # so that other connections see it in listener.buffered
                try:
                    return await self._answer(call, route)
                finally:
                    self.reserved -= reservation
        except ServerError as exc:
            conn.send_error(call.id, exc.status, exc.message, field=exc.field)
            return False
        except Exception:
            log.exception("%s failed", call.method)
            conn.send_error(call.id, Status.INTERNAL, f"internal error in {call.method}; see the server log")
            return False
        finally:
            # Only reached without an answer when the scope swallowed a cancellation.
            if call.id in conn.open_calls:
                if call.id in self.cancelled_by_client:
                    conn.send_error(call.id, Status.CANCELLED, "cancelled by the client")
                else:
                    conn.send_error(call.id, Status.DEADLINE_EXCEEDED, f"deadline of {call.timeout_ms} ms exceeded")
        return False

    async def _answer(self, call: Call, route: _Route) -> bool:
        """Decode the request, run the handler, queue the answer."""
        conn = self.conn
        try:
            request = route.decoder.decode(call.body) if route.decoder is not None else None
        except DECODE_ERRORS as exc:
            message, field = api.describe_validation_error(decode_error_text(exc), route.spec.request)
            conn.send_error(call.id, Status.INVALID_ARGUMENT, message, field=field)
            return False
        for name in route.maps:  # what is stored or rendered can be encoded and read back
            value = getattr(request, name)
            if value:
                check_depth(value, f"$.{name}", name)
        ctx = CallContext(call.method, self.peer, conn.hello.client if conn.hello else "", call.body)
        if route.spec.streaming:
            await route.handler(ctx, request, lambda item: self._send_item(call, item))
            conn.send_end(call.id)
        else:
            result = await route.handler(ctx, request)
            before = conn.pending_bytes
            conn.send_reply(call.id, result)
            self.listener.answered(call.method, conn.pending_bytes - before)
        return True

    async def _send_item(self, call: Call, item: Any) -> None:
        call_id = call.id
        window = self.windows.get(call_id)
        if window is not None:
            while window.available <= 0:
                self.kick()  # the client can only grant credit for what it received
                await window.wait_for_credit()
            window.available -= 1
        await self._wait_writable()
        before = self.conn.pending_bytes
        if not self.conn.send_item(call_id, item):
            # The call ended under the handler (its answer was refused): stop producing.
            self.calls[call_id].cancel()
            await trio.lowlevel.checkpoint()
        self.listener.answered(call.method, self.conn.pending_bytes - before)
        # The writer sends what is queued when it next runs (items queued meanwhile go in the
        # same write): a stream that sends now and then (reports.watch) is not held back.
        self.account()
        self.kick()
        if self.conn.pending_bytes >= _STREAM_FLUSH_BYTES:
            await trio.lowlevel.checkpoint()  # let the writer take what is queued


class _Window:
    """Items a streamed call may still send before the client grants more."""

    __slots__ = ("available", "_credit")

    def __init__(self, size: int) -> None:
        self.available = size
        self._credit = trio.Event()

    def grant(self, items: int) -> None:
        self.available += items
        self._credit.set()

    async def wait_for_credit(self) -> None:
        # Credit may have come since the caller looked: check before waiting for more.
        if self.available <= 0:
            self._credit = trio.Event()
            await self._credit.wait()
