"""The asyncio HTTP/2 server connection under Pigeon's mock providers (`plugins.apns.mock`,
`plugins.fcm.mock`): everything of a mock's connection that is HTTP/2 and not the provider.

`H2ServerConnection` is an asyncio protocol around an h2 server connection. It sets the
connection up (SETTINGS, a 16 MiB connection window), reads frames in batches (one write of
what the batch produced), assembles each request (`Stream`: headers, then the body, kept up to
``max_kept_body`` and counted beyond), sends answers as far as flow control allows and the rest
on WINDOW_UPDATE, forgets finished streams, runs admin requests (``/_mock/``) as tasks, delays
answers (``later``), and has the fault primitives: refusing a stream (RST_STREAM
REFUSED_STREAM), a GOAWAY with debug data that closes the connection once every stream before
it is answered, a TCP reset (`abort`), a change of SETTINGS_MAX_CONCURRENT_STREAMS. A mock
subclasses it and says what its provider does with a request (`request_started`,
`request_complete`); `ServerH2Connection` is the h2 connection it drives, which a mock may
subclass too (how it refuses streams over the limit).

It also holds the HPACK speed-ups of the mocks' own processes (`tune_hpack` and the codecs the
connections use): pure-Python HPACK is most of a request's cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import struct
import sys
import traceback
from typing import TYPE_CHECKING, Any, ClassVar, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import msgspec
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame

from protocols.h2client import HeaderListTooLong, HpackDecoder, HpackError, decode_huffman

if TYPE_CHECKING:
    import ssl

    from plugins._mock_app import MockApp

__all__ = ["CONNECTION_WINDOW", "H2_CONFIG", "H2ServerConnection", "Headers", "ServerH2Connection", "Stream", "tune_hpack"]

#: Request headers as the connections see them: h2 is set up to hand over bytes (H2_CONFIG).
Headers = list[tuple[bytes, bytes]]

#: h2's server configuration for the mocks: headers as bytes, and no validation or
#: normalization either way (the mocks check what their providers check, and answer
#: malformed requests the providers' way).
H2_CONFIG = h2.config.H2Configuration(
    client_side=False,
    header_encoding=None,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    validate_inbound_headers=False,
    normalize_inbound_headers=False,
)
#: The connection-level flow-control window granted to each client.
CONNECTION_WINDOW = 16 * 1024 * 1024

_json_encode = msgspec.json.encode

_DataReceived = h2.events.DataReceived
_RequestReceived = h2.events.RequestReceived
_StreamEnded = h2.events.StreamEnded
_StreamReset = h2.events.StreamReset
_WindowUpdated = h2.events.WindowUpdated
_ConnectionTerminated = h2.events.ConnectionTerminated

# --------------------------------------------------------------------------------------------
# HPACK speed-ups for the mock's own process (pure-Python HPACK is most of a request's cost)

_STATIC_STATUS = {b"200": 8, b"204": 9, b"206": 10, b"304": 11, b"400": 12, b"404": 13, b"500": 14}


def _hpack_length(n: int) -> bytes:
    if n < 127:
        return bytes((n,))
    out = bytearray((127,))
    n -= 127
    while n >= 128:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class _PlainEncoder(hpack.Encoder):
    """Encodes response headers as literals without indexing and without Huffman coding.

    Every response carries fresh ids, so the dynamic table would only churn. The first
    block announces a dynamic table size of 0, which is valid whatever the client's
    SETTINGS_HEADER_TABLE_SIZE is.
    """

    def __init__(self) -> None:
        super().__init__()
        self._announced = False

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        out = bytearray()
        if not self._announced:
            out += b"\x20"
            self._announced = True
        for name, value in headers:
            if name == b":status":
                index = _STATIC_STATUS.get(value)
                if index is not None:
                    out.append(0x80 | index)
                    continue
                out += b"\x08" + _hpack_length(len(value)) + value
            else:
                out += b"\x00" + _hpack_length(len(name)) + name + _hpack_length(len(value)) + value
        return bytes(out)


class _Decoder(HpackDecoder):
    """hpack's `Decoder` as h2 uses it, done by the client codec's decoder (a quarter of the
    cost), raising what hpack raises. Huffman strings are cached (tokens and paths repeat)."""

    huffman = staticmethod(functools.lru_cache(maxsize=4096)(decode_huffman))

    @property
    def max_allowed_table_size(self) -> int:
        return self.max_table_size

    @max_allowed_table_size.setter
    def max_allowed_table_size(self, value: int) -> None:
        self.max_table_size = value

    def decode(self, data: bytes, raw: bool = True) -> list[tuple[bytes, bytes]]:
        try:
            return super().decode(data)
        except HpackError as exc:
            from hpack.exceptions import HPACKDecodingError, OversizedHeaderListError

            raise (OversizedHeaderListError if type(exc) is HeaderListTooLong else HPACKDecodingError)(str(exc)) from None


class _NoLog:
    def debug(self, *args: Any, **kwargs: Any) -> None:
        pass


def tune_hpack() -> None:
    """Make h2 cheaper in the mock's own process (never call it in a test process): no
    debug-log calls in hpack, and no ``repr`` of every frame received for a trace log that
    h2 builds whether or not anyone logs it (6% of the mock's time)."""
    import h2.connection
    import hpack.hpack
    import hpack.table

    # Patching the libraries' module globals: their types say a Logger, and h2 has no `repr` of its own.
    hpack.hpack.log = _NoLog()  # type: ignore[assignment]
    hpack.table.log = _NoLog()  # type: ignore[assignment]
    h2.connection.repr = lambda frame: ""  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------
# The h2 connection


class ServerH2Connection(h2.connection.H2Connection):
    """h2's server connection, counting its open streams itself (h2 walks every stream to count
    them): `unanswered` holds the streams opened and not yet answered or reset. The mock
    forgets finished streams itself (`H2ServerConnection.forget`)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.unanswered: set[int] = set()

    @property
    def open_inbound_streams(self) -> int:
        return len(self.unanswered)

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Frame], list[h2.events.Event]]:
        sid = frame.stream_id
        is_new = sid not in self.streams
        result = super()._receive_headers_frame(frame)
        if is_new:
            self.unanswered.add(sid)  # counted at once: later frames of this read see it
        return result


class Stream:
    """A request being received: its headers, then its body's chunks; ``size`` counts every
    byte (the chunks stop at the connection's ``max_kept_body`` unless ``keep_body``)."""

    __slots__ = ("headers", "chunks", "size", "keep_body")

    def __init__(self, headers: Headers, *, keep_body: bool = False) -> None:
        self.headers = headers
        self.chunks: list[bytes] = []
        self.size = 0
        self.keep_body = keep_body

    def body(self) -> bytes:
        chunks = self.chunks
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# --------------------------------------------------------------------------------------------
# The asyncio protocol


class H2ServerConnection(asyncio.Protocol):
    """One client connection of a mock: an asyncio protocol around a `ServerH2Connection`.

    A subclass says what the provider does: `opened` (what the TLS handshake decided; the
    default starts HTTP/2), `request_started` (HEADERS of a new stream: refuse it, count it,
    inject faults), `request_complete` (the whole request: answer it with `send_response`, now
    or `later`), `stream_limit` (SETTINGS_MAX_CONCURRENT_STREAMS), `drop` (how it gives up a
    connection: close, or abort) and `connection_closed` (bookkeeping once it is gone).

    Frames are handled a read at a time (``in_batch``): what a read produces is written once,
    after it (`settle`). Once ``draining`` (a GOAWAY went out) the connection closes as soon as
    no stream is left unanswered.
    """

    #: SETTINGS_INITIAL_WINDOW_SIZE announced to clients.
    initial_window_size: ClassVar[int] = 65535
    #: SETTINGS_MAX_HEADER_LIST_SIZE announced to clients.
    max_header_list_size: ClassVar[int] = 8000
    #: Request bodies are kept up to this size, then only counted (unless the stream's ``keep_body``).
    max_kept_body: ClassVar[int] = 64 * 1024

    transport: asyncio.Transport
    #: Provider streams opened, and the last stream id of the GOAWAY sent by
    #: ``goaway_after_streams`` (set by each mock's connection).
    nstreams: int
    goaway_last: int | None

    def __init__(self, app: MockApp[Any]) -> None:
        self.app = app
        self.id = 0
        self.h2: ServerH2Connection | None = None
        self.streams: dict[int, Stream] = {}
        self.outq: dict[int, tuple[bytes, int]] = {}  # sid -> (body, bytes sent) held by flow control
        self.closed = False
        self.draining = False
        self.in_batch = False

    # -- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a TLS stream transport: create_server(ssl=...)
        self.id = self.app.next_connection_id()
        self.opened(transport.get_extra_info("ssl_object"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.in_batch = True
        try:
            self.received(data)
        except Exception:  # noqa: BLE001 - a bug in the mock: report it, drop only this connection
            traceback.print_exc(file=sys.stderr)
            self.drop()
            return
        finally:
            self.in_batch = False
        self.settle()

    # -- what a mock says (overridden)

    def opened(self, sslobj: ssl.SSLObject | None) -> None:
        """The TLS handshake is done (``sslobj``: ALPN, client certificate): start HTTP/2."""
        self.start_h2()
        self.app.conns.add(self)

    def new_h2(self) -> ServerH2Connection:
        return ServerH2Connection(config=H2_CONFIG)

    def stream_limit(self) -> int:
        """SETTINGS_MAX_CONCURRENT_STREAMS for this connection now."""
        return self.app.f.max_concurrent_streams

    def received(self, data: bytes) -> None:
        """Bytes from the client (in a batch)."""
        self.h2_received(data)

    def request_started(self, sid: int, headers: Headers) -> None:
        """HEADERS opened stream ``sid``: keep it until it ends (a mock may refuse it instead)."""
        self.streams[sid] = Stream(headers)

    def request_complete(self, sid: int, stream: Stream) -> None:
        """Stream ``sid`` ended: the whole request is in ``stream``; answer it."""
        raise NotImplementedError

    def drop(self) -> None:
        """Give the connection up (after a bug, or at the end of a shutdown's grace)."""
        self.close()

    def connection_closed(self) -> None:
        """The connection is gone (called once, after it left ``app.conns``)."""

    def shutdown(self) -> None:
        """Stop taking requests: GOAWAY (no debug data), then close once everything is answered."""
        if self.closed or self.draining or self.h2 is None:
            return
        self.send_goaway(self.h2.highest_inbound_stream_id)

    # -- HTTP/2

    def start_h2(self) -> None:
        """Our SETTINGS (and the connection window) go out; HTTP/2 starts."""
        conn = self.h2 = self.new_h2()
        conn.encoder = _PlainEncoder()
        conn.decoder = _Decoder()  # type: ignore[assignment]  # hpack's Decoder's interface, not its class
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.HEADER_TABLE_SIZE: 4096,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.stream_limit(),
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: self.initial_window_size,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: 16384,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.max_header_list_size,
            },
        )
        conn.initiate_connection()
        conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self.transport.write(conn.data_to_send())

    def h2_received(self, data: bytes) -> None:
        conn = self.h2
        assert conn is not None
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.transport.write(conn.data_to_send())
            self.close()
            return
        for ev in events:
            # `type(ev) is` rather than isinstance: this loop runs for every frame.
            if type(ev) is _DataReceived:
                stream = self.streams.get(ev.stream_id)
                if stream is not None:
                    if stream.keep_body or stream.size <= self.max_kept_body:  # oversize bodies are only counted
                        stream.chunks.append(ev.data)
                    stream.size += len(ev.data)
                if ev.flow_controlled_length:
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif type(ev) is _RequestReceived:
                self.request_started(ev.stream_id, cast(Headers, ev.headers))  # bytes: H2_CONFIG
            elif type(ev) is _StreamEnded:
                ended = self.streams.pop(ev.stream_id, None)
                if ended is not None:
                    self.request_complete(ev.stream_id, ended)
            elif type(ev) is _StreamReset:
                self.streams.pop(ev.stream_id, None)
                self.outq.pop(ev.stream_id, None)
                self.forget(ev.stream_id)
            elif type(ev) is _WindowUpdated:
                if self.outq:
                    self.pump()
            elif type(ev) is _ConnectionTerminated:
                self.close()
            if self.closed:
                return

    def send_response(self, sid: int, headers: Headers, body: bytes = b"") -> bool:
        """Answer stream ``sid`` (``headers`` start with ``:status``): HEADERS, with END_STREAM
        when there is no body, else the body as flow control allows. False when the stream
        is no longer there to answer."""
        conn = self.h2
        if self.closed or conn is None or sid not in conn.unanswered:
            return False
        try:
            conn.send_headers(sid, headers, end_stream=not body)
        except h2.exceptions.StreamClosedError:
            self.forget(sid)
            return False
        if body:
            self.outq[sid] = (body, 0)
            self.pump()
        else:
            self.forget(sid)
        return True

    def pump(self) -> None:
        """Send queued bodies as far as flow control allows; finish the streams that are done."""
        conn = self.h2
        assert conn is not None
        for sid in list(self.outq):
            data, offset = self.outq[sid]
            try:
                while offset < len(data):
                    n = min(len(data) - offset, conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                    if n <= 0:
                        break
                    conn.send_data(sid, data[offset : offset + n], end_stream=offset + n == len(data))
                    offset += n
            except (h2.exceptions.StreamClosedError, h2.exceptions.FlowControlError):
                offset = len(data)
            if offset < len(data):
                self.outq[sid] = (data, offset)
            else:
                del self.outq[sid]
                self.forget(sid)

    def forget(self, sid: int) -> None:
        """Stream ``sid`` is answered (or reset): it no longer counts, and h2 drops it."""
        conn = self.h2
        assert conn is not None
        conn.unanswered.discard(sid)
        stream = conn.streams.get(sid)
        if stream is not None and stream.closed:
            del conn.streams[sid]
            conn._closed_streams[sid] = stream.closed_by
        if self.draining:
            self.close_if_drained()

    def refuse(self, sid: int) -> None:
        """RST_STREAM(REFUSED_STREAM): the client may retry the request elsewhere."""
        assert self.h2 is not None
        self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
        self.forget(sid)

    def update_stream_limit(self) -> None:
        """Announce `stream_limit` (SETTINGS) if it changed."""
        conn = self.h2
        if self.closed or conn is None:
            return
        limit = self.stream_limit()
        if conn.local_settings.max_concurrent_streams != limit:
            conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limit})
            if not self.in_batch:
                self.flush()

    def _stream_faults(self, sid: int) -> None:
        """``reset_after_streams`` and ``goaway_after_streams`` at a new provider stream (not
        an admin request): each mock says how it sends its GOAWAY (``goaway``), and keeps
        ``nstreams`` and ``goaway_last``."""
        self.nstreams += 1
        f = self.app.f
        if f.reset_after_streams is not None and self.nstreams > f.reset_after_streams:
            self.app.n_resets += 1
            self.flush()
            self.abort()
            return
        if f.goaway_after_streams is not None and self.goaway_last is None and self.nstreams >= f.goaway_after_streams:
            self.goaway(sid, f.goaway_reason)

    def goaway(self, last_stream_id: int, reason: str) -> None:
        """The mock's GOAWAY for ``reason`` (each provider words it its own way)."""
        raise NotImplementedError

    def send_goaway(self, last_stream_id: int, debug: bytes = b"") -> None:
        """GOAWAY NO_ERROR, written by hand (h2 would refuse to answer after it): streams up
        to ``last_stream_id`` are still answered, then the connection closes."""
        assert self.h2 is not None
        frame = GoAwayFrame(0)
        frame.last_stream_id = last_stream_id
        frame.error_code = 0
        frame.additional_data = debug
        self.transport.write(self.h2.data_to_send() + frame.serialize())
        self.draining = True
        self.close_if_drained()

    # -- answers outside a read

    def later(self, delay: float, fn: Any, *args: Any) -> None:
        """Call ``fn(*args)`` in ``delay`` seconds (unless closed by then), then write what it produced."""
        asyncio.get_running_loop().call_later(delay, self._late, fn, args)

    def _late(self, fn: Any, args: tuple[Any, ...]) -> None:
        if not self.closed:
            fn(*args)
            self.settle()

    def start_admin(self, ref: int | None, method: bytes, path: bytes, body: bytes) -> None:
        """Run an admin request (``ref``: its stream) as a task; its answer is JSON."""
        task = asyncio.get_running_loop().create_task(self._admin(ref, method, path, body))
        self.app.tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self.app.tasks.discard)

    async def _admin(self, ref: int | None, method: bytes, path: bytes, body: bytes) -> None:
        try:
            status, doc = await self.app.admin(method, path, body)
        except Exception as exc:  # noqa: BLE001 - report it to the admin client
            status, doc = 500, {"error": f"{type(exc).__name__}: {exc}"}
        if not self.closed:
            self.send_admin(ref, status, _json_encode(doc))
            self.settle()

    def send_admin(self, ref: int | None, status: int, body: bytes) -> None:
        """An admin answer: ``body`` is JSON."""
        assert ref is not None
        headers = [(b":status", str(status).encode()), (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        self.send_response(ref, headers, body)

    # -- writing and closing

    def flush(self) -> None:
        if self.closed or self.h2 is None:
            return
        out = self.h2.data_to_send()
        if out:
            self.transport.write(out)

    def settle(self) -> None:
        """After a read or a late answer: write what it produced; close if drained."""
        if self.closed or self.h2 is None:
            return
        self.flush()
        if self.draining and not self.h2.unanswered:
            self.close()

    def close_if_drained(self) -> None:
        if self.draining and not self.in_batch and self.h2 is not None and not self.h2.unanswered:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.flush()
        self.closed = True
        self.transport.close()
        self._lost()

    def abort(self) -> None:
        """Drop the TCP connection with a RST (SO_LINGER 0), answering nothing more."""
        if self.closed:
            return
        sock = self.transport.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError, TypeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.closed = True
        self.transport.abort()
        self._lost()

    def _lost(self) -> None:
        self.closed = True
        if self in self.app.conns:
            self.app.conns.discard(self)
            self.connection_closed()
