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
- Keys: a hello's API key is checked before the welcome (``authenticate``); a key that is not
  valid gets a goaway UNAUTHENTICATED, later the more its host failed lately (``throttle``),
  and each call is checked against the scope its method needs (`server.api.registry`).
- Failures: a frame that cannot be decoded costs its call or its connection (see
  `protocols.connection`); anything unexpected while serving a connection closes that
  connection only, never the listener.
"""

from __future__ import annotations

import errno
import logging
import os
import socket as _stdlib_socket
import ssl
from collections import Counter
from collections.abc import Callable
from typing import Any

import trio
from hdrh.histogram import HdrHistogram

from protocols import api
from protocols.errors import Status
from server.access.service import ANYONE, Grant, Throttle
from server.api.connection import Connection, is_loopback
from server.api.registry import Router
from server.runtime.actor import Actor
from server.runtime.errors import ServerError

__all__ = ["Listener", "parse_address", "is_loopback"]

log = logging.getLogger("pigeon.rpc")

_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
#: The reservation for a method's answer before it has given any.
_FIRST_ESTIMATE = 16 * 1024
#: Seconds in which a method's largest answer so far counts half as much in its reservations.
_ESTIMATE_HALF_LIFE_S = 10.0


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
        authenticate: what a hello's API key may call, in the sandbox the hello names (None:
            refuse the key; a `ServerError`: refuse the hello with it); default: anything.
        throttle: how long refusals of a key wait, by host.
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
        authenticate: Callable[[str | None, str | None], Grant | None] = lambda key, sandbox: ANYONE,
        throttle: Throttle | None = None,
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
        self.authenticate = authenticate
        self.throttle = throttle if throttle is not None else Throttle()
        #: The bound addresses, once listening (a port of 0 is replaced by the real one).
        self.addresses: list[str] = []
        self.connections: set[Connection] = set()
        #: Connections still waiting for their hello, oldest first, and their number by host.
        self.handshaking: dict[Connection, None] = {}
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
        addresses: list[str] = []
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
        connection = Connection(self, stream)
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

    def _make_room(self, new: Connection) -> str | None:
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

    def said_hello(self, connection: Connection) -> None:
        """The connection is no longer waiting for its hello."""
        if self.handshaking.pop(connection, False) is None:
            self.handshaking_hosts[connection.host] -= 1
            if not self.handshaking_hosts[connection.host]:
                del self.handshaking_hosts[connection.host]

    def _forget(self, connection: Connection) -> None:
        """The connection no longer takes a place (closed, or closing after an eviction)."""
        if connection in self.connections:
            self.connections.discard(connection)
            self.said_hello(connection)
            self.peers[connection.host] -= 1
            if not self.peers[connection.host]:
                del self.peers[connection.host]

    def close_key(self, key_id: str, code: Status, message: str) -> int:
        """Close every connection that said hello with the key ``key_id``; how many."""
        closing = [c for c in self.connections if c.grant is not None and c.grant.key_id == key_id]
        for connection in closing:
            connection.revoke(code, message)
        return len(closing)

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


def _unix_socket_in_use(path: str) -> bool:
    probe = _stdlib_socket.socket(_stdlib_socket.AF_UNIX, _stdlib_socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


