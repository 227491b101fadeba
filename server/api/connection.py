"""One client connection of the listener: a reader, a writer and a task per call.

The limits a connection lives under are described in `server.api.listener`.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import ssl
import time
from typing import TYPE_CHECKING, Any

import trio

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
from protocols.frames import Call, Hello
from protocols.framing import DECODE_ERRORS, decode_error_text
from server.access.service import Grant
from server.api.registry import CallContext, Route
from server.runtime.values import check_depth
from server.runtime.errors import ServerError

if TYPE_CHECKING:
    from server.api.listener import Listener

__all__ = ["Connection", "is_loopback"]

log = logging.getLogger("pigeon.rpc")

_STREAM_FLUSH_BYTES = 32 * 1024
#: Bytes written per send; each must make progress within write_timeout.
_WRITE_CHUNK = 64 * 1024
#: Bytes of answers a connection's calls may have queued or reserved (see `server.api.listener`).
_HIGH_WATER = 1024 * 1024
#: Bytes of requests read and not yet decoded that a connection may hold before its reader stops.
_REQUEST_HIGH_WATER = 4 * 1024 * 1024


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, or ``localhost``) is this machine's loopback."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


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




class Connection:
    """One client connection: a reader, a writer, and a task per call.

    - The reader never waits for a call to finish: every frame is handled as it arrives (a
      call beyond ``max_calls`` is refused by the protocol layer), so credit, cancel and ping
      frames are always seen. It stops reading only while the connection holds too many bytes
      of requests or of answers (`_may_read`), which is how a client that does not read is
      held back; and for the ``retry_after_ms`` of a refusal it was sent (the server sheds
      load, `server.profiles.budget`): what the client sends meanwhile waits in its own socket
      buffer, not in the server, and costs the server nothing.
    - A call runs once its answer has room (`_may_start`); a stream's item waits for room
      before it is queued.
    - Only the writer writes to the socket, so cancelling a call can never cut a frame in
      half. A write that makes no progress for ``write_timeout`` seconds closes the connection.
    """

    def __init__(self, listener: Listener, stream: trio.abc.Stream) -> None:
        self.listener = listener
        self.stream = stream
        self.host, self.peer = _peer_name(stream)
        self.local = self.host == "unix" or is_loopback(self.host)
        self.conn = ServerConnection(
            server=listener.server_name, max_frame=listener.max_frame, max_calls=listener.max_calls,
            check_hello=self._check_hello,
        )
        #: What the hello's API key may call (set when the hello is accepted).
        self.grant: Grant | None = None
        #: Why the connection's calls end, once its key was revoked: (code, message).
        self.revoked: tuple[Status, str] | None = None
        #: True while the refusal of a key that is not valid waits (the handshake timer is off).
        self.refusing_key = False
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
        #: Nothing is read before this time (trio clock): a refusal with a retry hint was sent.
        self.read_resumes = 0.0

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
        if self.conn.hello is None and not self.refusing_key:
            log.warning("no hello from %s within %gs; closing", self.peer, trio.current_time() - self.started)
            self.scope.cancel()

    async def _read(self, calls: trio.Nursery) -> None:
        conn = self.conn
        while True:
            while not self._may_read():
                self.kick()
                progress = self._progress
                await progress.wait()
            if self.read_resumes > trio.current_time():
                self.kick()
                await trio.sleep_until(self.read_resumes)
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
                    cancelled = self.calls.get(event.id)
                    if cancelled is not None:
                        self.cancelled_by_client.add(event.id)
                        cancelled.cancel()
                elif isinstance(event, HelloReceived):
                    log.debug("client %r connected from %s", event.hello.client, self.peer)
                    self.listener.said_hello(self)
                    self.handshake.cancel()
                elif isinstance(event, Terminated):
                    # The stream cannot be trusted any more: read nothing else, but answer the
                    # calls already received (the goaway's last_id promises it).
                    if event.code is Status.UNAUTHENTICATED:
                        await self._refuse_key()
                    else:
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

    # -- keys ---------------------------------------------------------------------------------

    def _check_hello(self, hello: Hello) -> tuple[Status, str] | None:
        try:
            grant = self.listener.authenticate(hello.api_key, hello.sandbox)
        except ServerError as exc:  # a key of another sandbox, a sandbox that does not exist
            return exc.status, exc.message
        if grant is None:
            return Status.UNAUTHENTICATED, (
                "the API key is not valid: it was revoked, mistyped, or made by another server; "
                "ask an admin for a key (pigeon keys create)"
            )
        self.grant = grant
        return None

    async def _refuse_key(self) -> None:
        """A hello with a key that is not valid: its refusal waits longer the more this host
        failed lately (`server.access.service.Throttle`); only its own connections wait."""
        self.refusing_key = True
        self.handshake.cancel()
        delay = self.listener.throttle.failed(self.host)
        # Once a host is being slowed down its refusals are counted (stats), not each logged:
        # a flood of bad keys must not flood the log.
        log.log(logging.DEBUG if delay else logging.WARNING, "connection from %s refused: its API key is not valid%s",
                self.peer, f" (refusal delayed {delay:.2f}s)" if delay else "")
        if delay:
            await trio.sleep(delay)

    def revoke(self, code: Status, message: str) -> None:
        """The connection's key was revoked: a goaway, its calls ended, closed within a second."""
        self.revoked = (code, message)
        self.go_away(code, message)
        for scope in list(self.calls.values()):
            scope.cancel()
        self.read_scope.cancel()
        self.scope.deadline = min(self.scope.deadline, trio.current_time() + 1)

    def _refusal(self, route: Route) -> tuple[Status, str] | None:
        """Why this connection may not call ``route``, or None if it may."""
        grant = self.grant
        if grant is not None and route.scope in grant.scopes:
            return None
        name, scope = route.spec.name, route.scope
        if grant is None or grant.key_id is None:
            return Status.UNAUTHENTICATED, (
                f"{name} needs an API key with the {scope} scope, and this connection's hello carried no key "
                "(pass api_key=, --api-key or PIGEON_API_KEY)"
            )
        return Status.PERMISSION_DENIED, (
            f"{name} needs the {scope} scope, which the API key of this connection does not have "
            f"(it has {', '.join(s for s in ('admin', 'operator', 'ingest', 'read') if s in grant.scopes)})"
        )

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
        refusal = self._refusal(route)
        if refusal is not None:
            conn.send_error(call.id, *refusal)
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
            conn.send_error(call.id, exc.status, exc.message, field=exc.field, retry_after_ms=exc.retry_after_ms)
            if exc.retry_after_ms is not None:
                # The client was told to wait: what it sends before then waits in its socket.
                # Jittered, so that connections refused together are not all read again together.
                pause = exc.retry_after_ms / 1000 * (1 + random.random() / 2)
                self.read_resumes = max(self.read_resumes, trio.current_time() + pause)
            return False
        except Exception:
            log.exception("%s failed", call.method)
            conn.send_error(call.id, Status.INTERNAL, f"internal error in {call.method}; see the server log")
            return False
        finally:
            # Only reached without an answer when the scope swallowed a cancellation.
            if call.id in conn.open_calls:
                if self.revoked is not None:
                    conn.send_error(call.id, *self.revoked)
                elif call.id in self.cancelled_by_client:
                    conn.send_error(call.id, Status.CANCELLED, "cancelled by the client")
                else:
                    conn.send_error(call.id, Status.DEADLINE_EXCEEDED, f"deadline of {call.timeout_ms} ms exceeded")
        return False

    async def _answer(self, call: Call, route: Route) -> bool:
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
        ctx = CallContext(call.method, self.peer, conn.hello.client if conn.hello else "", call.body,
                          local=self.local, scopes=self.grant.scopes if self.grant is not None else frozenset(),
                          sandbox=self.grant.sandbox if self.grant is not None else "default")
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
