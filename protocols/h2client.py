"""A sans-IO HTTP/2 client connection (RFC 9113), made for push providers' request/response
traffic: many small requests in flight, each answered by a small response.

Bytes go in (`H2Client.receive`), events come out; frames to write are collected for
`H2Client.data_to_send`. Unlike a general HTTP/2 state machine (h2), it hands back each
response whole, once its stream has ended (`ResponseEnded`), and does only the work that
traffic needs, which makes a request cost a few microseconds instead of tens:

- Request headers are HPACK-encoded without the dynamic table (`StatelessEncoder`): each
  field's encoding depends on the field alone, so the fields a sender repeats (authority,
  topic, the provider token) are encoded once and cached. Responses are decoded with
  our own `HpackDecoder` (the server may use its dynamic table and Huffman coding): hpack's
  costs ~8 µs a response, this one ~2.
- Request bodies go out as the flow-control windows allow; what does not fit waits, in
  order, for the server's WINDOW_UPDATEs. The windows granted to the server are large
  (``window``) and topped up once half is used.
- No server push (refused in our SETTINGS), no priorities (ignored), no trailers kept apart
  (merged into the response's headers), 1xx responses skipped.

Violations by the server raise `H2ProtocolError` (its ``error_code`` is the HTTP/2 error
code; a GOAWAY saying so is queued) and leave the connection closed. A stream-level fault
(a response without a valid ``:status``, a bad WINDOW_UPDATE for one stream) resets only
that stream and is reported as `StreamReset`.

The HPACK halves (RFC 7541: `StatelessEncoder`, `HpackDecoder`, `decode_huffman`) live in
`protocols._hpack`, and the HTTP/2 error codes and errors (`ErrorCode`, `H2ProtocolError`,
`HpackError`, `HeaderListTooLong`) in `protocols.errors`, with the rest of the exception
tree; every one of these names is importable from here, this module's public surface.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any

from ._hpack import HpackDecoder as HpackDecoder
from ._hpack import StatelessEncoder as StatelessEncoder
from ._hpack import decode_huffman as decode_huffman
from .errors import ErrorCode as ErrorCode
from .errors import H2ProtocolError as H2ProtocolError
from .errors import HeaderListTooLong as HeaderListTooLong
from .errors import HpackError as HpackError

__all__ = [
    "H2Client",
    "H2ProtocolError",
    "StatelessEncoder",
    "ResponseEnded",
    "StreamReset",
    "SettingsChanged",
    "GoAway",
    "PingAck",
    "ErrorCode",
    "HpackDecoder",
    "HpackError",
    "HeaderListTooLong",
    "decode_huffman",
]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
# Flags.
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# Settings.
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = range(1, 7)

_MAX_WINDOW = 2**31 - 1
#: The highest client stream id (odd, below 2**31).
LAST_STREAM_ID = 2**31 - 1
_DEFAULT_WINDOW = 65535
_FRAME_SIZE = 16384  # SETTINGS_MAX_FRAME_SIZE we accept (the default; we do not raise it)
_MAX_HEADER_BLOCK = 65536  # a header block (HEADERS + CONTINUATIONs) longer than this is refused
_MAX_CONTINUATIONS = 64  # ... or in more frames than this (empty CONTINUATIONs cost memory too)

_HEAD = struct.Struct(">HBBBL")  # length (high 16 bits, low 8 bits), type, flags, stream id
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")
_GOAWAY = struct.Struct(">LL")


# -- events -----------------------------------------------------------------------------------


class ResponseEnded:
    """A stream's whole response: ``status``, ``headers`` (lower-case names to values; the
    last of repeated names wins, trailers included) and ``body``."""

    __slots__ = ("stream_id", "status", "headers", "body")

    def __init__(self, stream_id: int, status: int, headers: dict[bytes, bytes], body: bytes) -> None:
        self.stream_id = stream_id
        self.status = status
        self.headers = headers
        self.body = body

    def __repr__(self) -> str:
        return f"<ResponseEnded stream {self.stream_id}: {self.status}, {len(self.body)} bytes>"


class StreamReset:
    """The stream ended without a (valid) response: the server reset it, or we did because
    its response broke the rules. ``error_code`` as in RST_STREAM."""

    __slots__ = ("stream_id", "error_code")

    def __init__(self, stream_id: int, error_code: int) -> None:
        self.stream_id = stream_id
        self.error_code = error_code

    def __repr__(self) -> str:
        return f"<StreamReset stream {self.stream_id}: {ErrorCode.name(self.error_code)}>"


class SettingsChanged:
    """The server's SETTINGS were applied (the first one makes the connection ready)."""

    __slots__ = ("max_concurrent_streams",)

    def __init__(self, max_concurrent_streams: int) -> None:
        self.max_concurrent_streams = max_concurrent_streams


class GoAway:
    """The server will process no stream above ``last_stream_id``."""

    __slots__ = ("last_stream_id", "error_code", "debug_data")

    def __init__(self, last_stream_id: int, error_code: int, debug_data: bytes) -> None:
        self.last_stream_id = last_stream_id
        self.error_code = error_code
        self.debug_data = debug_data


class PingAck:
    """The answer to our PING."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


# -- the connection ---------------------------------------------------------------------------


class _Stream:
    __slots__ = ("status", "headers", "body", "size", "send_window", "pending", "recv_window", "unacked")

    def __init__(self, send_window: int, recv_window: int) -> None:
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.size = 0
        self.send_window = send_window
        #: Request body not sent yet (waiting for window).
        self.pending = b""
        self.recv_window = recv_window
        self.unacked = 0


def _frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    length = len(payload)
    return _HEAD.pack(length >> 8, length & 0xFF, kind, flags, stream_id) + payload


class H2Client:
    """The client side of one HTTP/2 connection.

    Args:
        window: the flow-control window granted to the server, per stream and for the
            connection (responses to pushes are small: be generous).
        max_header_list_size: a response's header list longer than this is refused.
        max_body: a response body longer than this resets its stream (`StreamReset` with
            ``CANCEL``): push providers answer in a few KiB.
    """

    def __init__(self, *, window: int = 1 << 24, max_header_list_size: int = 65536, max_body: int = 1 << 20) -> None:
        if not _DEFAULT_WINDOW <= window <= _MAX_WINDOW:
            raise ValueError(f"window must be between {_DEFAULT_WINDOW} and {_MAX_WINDOW}, not {window}")
        self.window = window
        self.max_body = max_body
        self.encoder = StatelessEncoder()
        self.decoder = HpackDecoder(max_header_list_size=max_header_list_size)
        self.max_header_list_size = max_header_list_size
        #: Open streams: sent, response not ended.
        self.streams: dict[int, _Stream] = {}
        self.next_stream_id = 1
        #: The server's settings that matter here.
        self.max_concurrent_streams = 2**31 - 1
        self.initial_window = _DEFAULT_WINDOW
        self.max_frame_size = _FRAME_SIZE
        #: Our send window for the connection, and receiving credit not yet returned.
        self.send_window = _DEFAULT_WINDOW
        self.recv_window = window
        self._recv_unacked = 0
        #: Streams with body waiting for window, in order.
        self._blocked: deque[int] = deque()
        self._out: list[bytes] = []
        #: The start of a frame not yet whole.
        self._buffer = bytearray()
        #: A header block being received: its stream, flags of the HEADERS frame, fragments.
        self._block_stream = 0
        self._block_end_stream = False
        self._block: list[bytes] = []
        self._block_size = 0
        self._block_frames = 0
        self.goaway_received: GoAway | None = None
        self.closed = False

    # -- sending ------------------------------------------------------------------------------

    def initiate(self) -> None:
        """Queue the connection preface: the magic, our SETTINGS, the connection window."""
        settings = b"".join(
            _SETTING.pack(code, value)
            for code, value in (
                (ENABLE_PUSH, 0),
                (INITIAL_WINDOW_SIZE, self.window),
                (MAX_HEADER_LIST_SIZE, self.max_header_list_size),
            )
        )
        self._out.append(PREFACE + _frame(SETTINGS, 0, 0, settings))
        if self.window > _DEFAULT_WINDOW:
            self._out.append(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.window - _DEFAULT_WINDOW)))

    def send_request(self, headers: Any, body: bytes = b"") -> int:
        """Queue a request (headers as ``(name, value)`` byte pairs, pseudo-headers first);
        returns its stream id. The body goes out as the windows allow."""
        if self.closed or self.goaway_received is not None:
            raise H2ProtocolError("the connection is closing: no new stream", ErrorCode.NO_ERROR)
        stream_id = self.next_stream_id
        if stream_id > LAST_STREAM_ID:
            raise H2ProtocolError("out of stream ids", ErrorCode.NO_ERROR)
        self.next_stream_id = stream_id + 2
        block = self.encoder.encode(headers)
        flags = END_HEADERS if body else END_HEADERS | END_STREAM
        size = self.max_frame_size
        out = self._out
        if len(block) <= size:
            out.append(_frame(HEADERS, flags, stream_id, block))
        else:
            out.append(_frame(HEADERS, flags & ~END_HEADERS, stream_id, block[:size]))
            for start in range(size, len(block), size):
                last = start + size >= len(block)
                out.append(_frame(CONTINUATION, END_HEADERS if last else 0, stream_id, block[start:start + size]))
        stream = self.streams[stream_id] = _Stream(self.initial_window, self.window)
        if body:
            stream.pending = body
            # With connection window left, what waits is waiting for its own stream's window.
            if self.send_window <= 0 or not self._send_body(stream_id, stream):
                self._blocked.append(stream_id)
        return stream_id

    def _send_body(self, stream_id: int, stream: _Stream) -> bool:
        """Send what the windows allow of the stream's body; True once all of it is sent."""
        body = stream.pending
        while body:
            n = min(len(body), self.send_window, stream.send_window, self.max_frame_size)
            if n <= 0:
                stream.pending = body
                return False
            chunk, body = body[:n], body[n:]
            self.send_window -= n
            stream.send_window -= n
            self._out.append(_frame(DATA, 0 if body else END_STREAM, stream_id, chunk))
        stream.pending = b""
        return True

    def _send_blocked(self) -> None:
        """Send waiting bodies in order while the connection's window lasts (a stream waiting
        for its own window lets the next ones go)."""
        blocked = self._blocked
        waiting: deque[int] = deque()
        while blocked and self.send_window > 0:
            stream_id = blocked.popleft()
            stream = self.streams.get(stream_id)
            if stream is not None and stream.pending and not self._send_body(stream_id, stream):
                waiting.append(stream_id)
        waiting.extend(blocked)
        self._blocked = waiting

    def reset(self, stream_id: int, error_code: int = ErrorCode.CANCEL) -> None:
        """Abandon a stream (RST_STREAM); nothing more is reported for it."""
        if self._drop(stream_id) is None:
            return
        if not self.closed:
            self._out.append(_frame(RST_STREAM, 0, stream_id, _U32.pack(error_code)))

    def _drop(self, stream_id: int) -> _Stream | None:
        """Forget a stream (and its body waiting for window, if any)."""
        stream = self.streams.pop(stream_id, None)
        if stream is not None and stream.pending:
            self._blocked.remove(stream_id)
        return stream

    def ping(self, data: bytes) -> None:
        """Queue a PING (8 bytes of opaque data); its answer is a `PingAck`."""
        if len(data) != 8:
            raise ValueError("a PING carries exactly 8 bytes")
        self._out.append(_frame(PING, 0, 0, data))

    def close(self, error_code: int = ErrorCode.NO_ERROR, debug_data: bytes = b"") -> None:
        """Queue a GOAWAY; no new request from now on."""
        if not self.closed:
            self.closed = True
            self._out.append(_frame(GOAWAY, 0, 0, _GOAWAY.pack(0, error_code) + debug_data))

    def data_to_send(self) -> bytes:
        """The bytes queued for the server (and forget them)."""
        out = self._out
        if not out:
            return b""
        data = b"".join(out)
        out.clear()
        return data

    # -- receiving ----------------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Any]:
        """Feed bytes from the server; returns the events they complete, in order."""
        buffer = self._buffer
        if buffer:
            buffer += data
            if len(buffer) < 9:
                return []
            length = buffer[0] << 16 | buffer[1] << 8 | buffer[2]
            if length <= _FRAME_SIZE and len(buffer) < 9 + length:
                return []  # (copying the buffer at each read of a trickle would be quadratic)
            data = bytes(buffer)
            buffer.clear()
        events: list[Any] = []
        end = len(data)
        pos = 0
        unpack = _HEAD.unpack_from
        try:
            while end - pos >= 9:
                high, low, kind, flags, stream_id = unpack(data, pos)
                length = high << 8 | low
                if length > _FRAME_SIZE:
                    raise H2ProtocolError(f"a frame of {length} bytes (at most {_FRAME_SIZE})", ErrorCode.FRAME_SIZE_ERROR)
                if end - pos - 9 < length:
                    break
                payload = data[pos + 9:pos + 9 + length]
                pos += 9 + length
                stream_id &= 0x7FFFFFFF
                if self._block_stream and kind != CONTINUATION:
                    raise H2ProtocolError("a header block interrupted by another frame")
                if kind == HEADERS:
                    self._headers(stream_id, flags, payload, events)
                elif kind == DATA:
                    self._data(stream_id, flags, payload, events)
                elif kind == CONTINUATION:
                    if stream_id != self._block_stream or not stream_id:
                        raise H2ProtocolError("CONTINUATION without a header block to continue")
                    self._fragment(payload, flags, events)
                elif kind == SETTINGS:
                    self._settings(stream_id, flags, payload, events)
                elif kind == WINDOW_UPDATE:
                    self._window_update(stream_id, payload, events)
                elif kind == RST_STREAM:
                    if stream_id == 0 or length != 4:
                        raise H2ProtocolError("a malformed RST_STREAM", ErrorCode.PROTOCOL_ERROR if stream_id == 0 else ErrorCode.FRAME_SIZE_ERROR)
                    if self._drop(stream_id) is not None:
                        events.append(StreamReset(stream_id, _U32.unpack(payload)[0]))
                elif kind == PING:
                    if stream_id != 0 or length != 8:
                        raise H2ProtocolError("a malformed PING", ErrorCode.FRAME_SIZE_ERROR if stream_id == 0 else ErrorCode.PROTOCOL_ERROR)
                    if flags & ACK:
                        events.append(PingAck(payload))
                    else:
                        self._out.append(_frame(PING, ACK, 0, payload))
                elif kind == GOAWAY:
                    if stream_id != 0 or length < 8:
                        raise H2ProtocolError("a malformed GOAWAY")
                    last, code = _GOAWAY.unpack_from(payload)
                    event = GoAway(last & 0x7FFFFFFF, code, payload[8:])
                    self.goaway_received = event
                    events.append(event)
                elif kind == PUSH_PROMISE:
                    raise H2ProtocolError("PUSH_PROMISE though push is disabled")
                elif kind == PRIORITY:
                    if stream_id == 0:
                        raise H2ProtocolError("PRIORITY on stream 0")
                    if length != 5:
                        raise H2ProtocolError("a malformed PRIORITY", ErrorCode.FRAME_SIZE_ERROR)
                # Other frame types are extensions: ignored (RFC 9113 4.1).
        except H2ProtocolError as exc:
            self._buffer.clear()
            self.close(exc.error_code, str(exc).encode()[:256])
            exc.events = events
            raise
        if pos < end:
            buffer += data[pos:]
        if self._recv_unacked >= self.window >> 1:
            self._out.append(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._recv_unacked)))
            self.recv_window += self._recv_unacked
            self._recv_unacked = 0
        return events

    def _idle(self, stream_id: int) -> bool:
        """A stream we never opened (even ids are the server's, which may not open any)."""
        return stream_id >= self.next_stream_id or not stream_id & 1

    def _headers(self, stream_id: int, flags: int, payload: bytes, events: list[Any]) -> None:
        if stream_id == 0 or self._idle(stream_id):
            raise H2ProtocolError(f"HEADERS on stream {stream_id}, which we did not open")
        if flags & PADDED:
            if not payload:
                raise H2ProtocolError("a padded HEADERS frame without its padding length", ErrorCode.FRAME_SIZE_ERROR)
            pad = payload[0]
            if pad >= len(payload):
                raise H2ProtocolError("HEADERS padding longer than the frame")
            payload = payload[1:len(payload) - pad]
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise H2ProtocolError("a HEADERS frame too short for its priority", ErrorCode.FRAME_SIZE_ERROR)
            payload = payload[5:]
        self._block_end_stream = bool(flags & END_STREAM)
        self._block_stream = stream_id
        self._block_size = 0
        self._block_frames = 0
        self._fragment(payload, flags, events)

    def _fragment(self, payload: bytes, flags: int, events: list[Any]) -> None:
        self._block_size += len(payload)
        self._block_frames += 1
        if self._block_size > _MAX_HEADER_BLOCK or self._block_frames > _MAX_CONTINUATIONS:
            raise H2ProtocolError(f"a header block over {_MAX_HEADER_BLOCK} bytes or {_MAX_CONTINUATIONS} frames",
                                  ErrorCode.ENHANCE_YOUR_CALM)
        if not flags & END_HEADERS:
            self._block.append(payload)
            return
        if self._block:
            self._block.append(payload)
            payload = b"".join(self._block)
            self._block.clear()
        stream_id = self._block_stream
        self._block_stream = 0
        fields = self.decoder.decode(payload)
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # a stream we reset or that ended: the block only updated the decoder
        headers = stream.headers
        if stream.status == 0 or stream.status < 200:  # the response's head (after 1xx ones)
            status = 0
            for name, value in fields:
                if name == b":status":
                    status = int(value) if len(value) == 3 and value.isdigit() else -1
                else:
                    headers[name] = value
            if status < 100:
                self._stream_error(stream_id, events)
                return
            if status < 200:
                if self._block_end_stream:
                    self._stream_error(stream_id, events)
                    return
                headers.clear()
            stream.status = status
        else:  # trailers
            if not self._block_end_stream:
                self._stream_error(stream_id, events)
                return
            for name, value in fields:
                if name[:1] == b":":
                    self._stream_error(stream_id, events)
                    return
                headers[name] = value
        if self._block_end_stream:
            self._end(stream_id, stream, events)

    def _stream_error(self, stream_id: int, events: list[Any]) -> None:
        self.reset(stream_id, ErrorCode.PROTOCOL_ERROR)
        events.append(StreamReset(stream_id, ErrorCode.PROTOCOL_ERROR))

    def _end(self, stream_id: int, stream: _Stream, events: list[Any]) -> None:
        self._drop(stream_id)
        if stream.pending:  # answered before our body was all sent: end our side too
            self._out.append(_frame(RST_STREAM, 0, stream_id, _U32.pack(ErrorCode.NO_ERROR)))
        body = stream.body
        events.append(ResponseEnded(stream_id, stream.status, stream.headers,
                                    body[0] if len(body) == 1 else b"".join(body)))

    def _data(self, stream_id: int, flags: int, payload: bytes, events: list[Any]) -> None:
        if stream_id == 0 or self._idle(stream_id):
            raise H2ProtocolError(f"DATA on stream {stream_id}, which we did not open")
        length = len(payload)
        self.recv_window -= length
        if self.recv_window < 0:
            raise H2ProtocolError("DATA beyond the connection's window", ErrorCode.FLOW_CONTROL_ERROR)
        self._recv_unacked += length
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # reset or ended: counted for the connection only
        if stream.status < 200:
            self._stream_error(stream_id, events)  # DATA before the final response's head
            return
        if flags & PADDED:
            if not payload:
                raise H2ProtocolError("a padded DATA frame without its padding length", ErrorCode.FRAME_SIZE_ERROR)
            pad = payload[0]
            if pad >= length:
                raise H2ProtocolError("DATA padding longer than the frame")
            payload = payload[1:length - pad]
        if payload:
            stream.body.append(payload)
            stream.size += len(payload)
            if stream.size > self.max_body:
                self.reset(stream_id, ErrorCode.CANCEL)
                events.append(StreamReset(stream_id, ErrorCode.CANCEL))
                return
        if flags & END_STREAM:
            self._end(stream_id, stream, events)
            return
        stream.recv_window -= length
        stream.unacked += length
        if stream.recv_window < 0:
            self.reset(stream_id, ErrorCode.FLOW_CONTROL_ERROR)
            events.append(StreamReset(stream_id, ErrorCode.FLOW_CONTROL_ERROR))
        elif stream.unacked >= self.window >> 1:
            self._out.append(_frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(stream.unacked)))
            stream.recv_window += stream.unacked
            stream.unacked = 0

    def _settings(self, stream_id: int, flags: int, payload: bytes, events: list[Any]) -> None:
        if stream_id != 0:
            raise H2ProtocolError("SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise H2ProtocolError("a SETTINGS acknowledgement with a payload", ErrorCode.FRAME_SIZE_ERROR)
            return
        if len(payload) % 6:
            raise H2ProtocolError("a SETTINGS frame whose length is not a multiple of 6", ErrorCode.FRAME_SIZE_ERROR)
        for offset in range(0, len(payload), 6):
            code, value = _SETTING.unpack_from(payload, offset)
            if code == MAX_CONCURRENT_STREAMS:
                self.max_concurrent_streams = value
            elif code == INITIAL_WINDOW_SIZE:
                if value > _MAX_WINDOW:
                    raise H2ProtocolError(f"SETTINGS_INITIAL_WINDOW_SIZE {value}", ErrorCode.FLOW_CONTROL_ERROR)
                delta = value - self.initial_window
                self.initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > _MAX_WINDOW:
                        raise H2ProtocolError("a stream window above 2**31-1", ErrorCode.FLOW_CONTROL_ERROR)
            elif code == MAX_FRAME_SIZE:
                if not _FRAME_SIZE <= value <= 2**24 - 1:
                    raise H2ProtocolError(f"SETTINGS_MAX_FRAME_SIZE {value}")
                self.max_frame_size = value
            elif code == ENABLE_PUSH and value > 1:
                raise H2ProtocolError(f"SETTINGS_ENABLE_PUSH {value}")
            # HEADER_TABLE_SIZE: our encoder uses no dynamic table; others do not concern us.
        self._out.append(_frame(SETTINGS, ACK, 0, b""))
        events.append(SettingsChanged(self.max_concurrent_streams))
        if self._blocked:
            self._send_blocked()

    def _window_update(self, stream_id: int, payload: bytes, events: list[Any]) -> None:
        if len(payload) != 4:
            raise H2ProtocolError("a malformed WINDOW_UPDATE", ErrorCode.FRAME_SIZE_ERROR)
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                raise H2ProtocolError("a WINDOW_UPDATE of 0 for the connection")
            self.send_window += increment
            if self.send_window > _MAX_WINDOW:
                raise H2ProtocolError("a connection window above 2**31-1", ErrorCode.FLOW_CONTROL_ERROR)
        else:
            stream = self.streams.get(stream_id)
            if stream is None:
                if self._idle(stream_id):
                    raise H2ProtocolError(f"WINDOW_UPDATE on stream {stream_id}, which we did not open")
                return
            if increment == 0 or stream.send_window + increment > _MAX_WINDOW:
                code = ErrorCode.PROTOCOL_ERROR if increment == 0 else ErrorCode.FLOW_CONTROL_ERROR
                self.reset(stream_id, code)
                events.append(StreamReset(stream_id, code))
                return
            stream.send_window += increment
        if self._blocked:
            self._send_blocked()
