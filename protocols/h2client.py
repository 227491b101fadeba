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
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any

import hpack

from .errors import ProtocolError

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


class ErrorCode:
    """HTTP/2 error codes (RFC 9113 7), as plain ints."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD

    @classmethod
    def name(cls, code: int) -> str:
        for name, value in vars(cls).items():
            if value == code and name.isupper():
                return name
        return f"0x{code:x}"


class H2ProtocolError(ProtocolError):
    """The server broke HTTP/2's rules (or the connection cannot take a request); the
    connection is over. ``error_code`` is the HTTP/2 error code sent in our GOAWAY;
    ``events`` what the same bytes completed before the violation (deliver them)."""

    def __init__(self, message: str, error_code: int = ErrorCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.error_code = error_code
        self.events: list[Any] = []


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


# -- HPACK ------------------------------------------------------------------------------------


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


class StatelessEncoder:
    """An HPACK encoder that never uses the dynamic table (and says so: its first block sets
    the table size to 0), so that each field's encoding depends on nothing but the field.

    Push requests repeat almost every field (authority, topic, push type, the provider token),
    so their encodings are cached. Values are sent as they are (no Huffman): a few more
    bytes on the wire. Sensitive fields (`hpack.NeverIndexedHeaderTuple`) are sent as
    never-indexed literals.
    """

    _CACHE_LIMIT = 1024

    def __init__(self) -> None:
        self._first = True
        self._cache: dict[tuple[bytes, bytes, bool], bytes] = {}

    def encode(self, headers: Any) -> bytes:
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


class HpackError(H2ProtocolError):
    """A response header block that does not decode (a COMPRESSION_ERROR)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.COMPRESSION_ERROR)


class HeaderListTooLong(HpackError):
    """A response header list longer than ``max_header_list_size``."""


_STATIC_TABLE = hpack.table.HeaderTable.STATIC_TABLE
_HUFFMAN_STEPS: dict[int, tuple[int, bytes, bool]] = {}


def _huffman_step(state: int, byte: int) -> tuple[int, bytes, bool]:
    """hpack's nibble-table Huffman decoder, two nibbles (one byte) at once."""
    from hpack.huffman_table import HUFFMAN_COMPLETE, HUFFMAN_EMIT_SYMBOL, HUFFMAN_FAIL, HUFFMAN_TABLE

    out = b""
    flags = 0
    for nibble in (byte >> 4, byte & 0x0F):
        state, flags, symbol = HUFFMAN_TABLE[state * 16 + nibble]
        if flags & HUFFMAN_FAIL:
            raise HpackError("an invalid Huffman string")
        if flags & HUFFMAN_EMIT_SYMBOL:
            out += bytes((symbol,))
    return state, out, bool(flags & HUFFMAN_COMPLETE)


def decode_huffman(data: bytes) -> bytes:
    """Decode an HPACK Huffman string (RFC 7541 5.2), one byte per step (steps are tabled
    as they are first met: at most 256 states x 256 bytes)."""
    steps = _HUFFMAN_STEPS
    state = 0
    complete = True
    out = bytearray()
    for byte in data:
        key = state << 8 | byte
        step = steps.get(key)
        if step is None:
            step = steps[key] = _huffman_step(state, byte)
        state, emitted, complete = step
        if emitted:
            out += emitted
    if not complete:
        raise HpackError("an incomplete Huffman string")
    return bytes(out)


class HpackDecoder:
    """An HPACK decoder (RFC 7541) for response header blocks: the static and dynamic
    tables, Huffman strings, table size updates up to ``max_table_size`` (our
    SETTINGS_HEADER_TABLE_SIZE), and a bound on the decoded header list."""

    #: How Huffman strings are decoded (a subclass may cache it).
    huffman = staticmethod(decode_huffman)

    def __init__(self, max_table_size: int = 4096, max_header_list_size: int = 65536) -> None:
        self.max_table_size = max_table_size
        self.max_header_list_size = max_header_list_size
        self.table_size = max_table_size
        #: The dynamic table, oldest first, and its size as RFC 7541 4.1 counts it.
        self.entries: deque[tuple[bytes, bytes]] = deque()
        self.size = 0

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        fields = []
        pos = 0
        end = len(block)
        total = 0
        integer = self._integer
        while pos < end:
            first = block[pos]
            if first & 0x80:  # indexed field
                index, pos = integer(block, pos, 0x7F)
                field = self._field(index)
            elif first & 0x20 and not first & 0x40:  # dynamic table size update
                if fields:
                    raise HpackError("a table size update after a field")
                size, pos = integer(block, pos, 0x1F)
                if size > self.max_table_size:
                    raise HpackError(f"a table size update to {size}, above our {self.max_table_size}")
                self.table_size = size
                self._evict(0)
                continue
            else:  # a literal: with incremental indexing (01), without (0000) or never indexed (0001)
                index, pos = integer(block, pos, 0x3F if first & 0x40 else 0x0F)
                if index:
                    name = self._field(index)[0]
                else:
                    name, pos = self._string(block, pos)
                value, pos = self._string(block, pos)
                field = (name, value)
                if first & 0x40:
                    self._add(field)
            total += len(field[0]) + len(field[1]) + 32
            if total > self.max_header_list_size:
                raise HeaderListTooLong(f"a header list over {self.max_header_list_size} bytes")
            fields.append(field)
        return fields

    @staticmethod
    def _integer(block: bytes, pos: int, mask: int) -> tuple[int, int]:
        value = block[pos] & mask
        pos += 1
        if value < mask:
            return value, pos
        shift = 0
        while True:
            if pos >= len(block):
                raise HpackError("a truncated integer")
            byte = block[pos]
            pos += 1
            value += (byte & 0x7F) << shift
            if not byte & 0x80:
                return value, pos
            shift += 7
            if shift > 28:
                raise HpackError("an integer too large")

    def _string(self, block: bytes, pos: int) -> tuple[bytes, int]:
        if pos >= len(block):
            raise HpackError("a truncated string")
        huffman = block[pos] & 0x80
        length, pos = self._integer(block, pos, 0x7F)
        if pos + length > len(block):
            raise HpackError("a string longer than its header block")
        data = block[pos:pos + length]
        return (self.huffman(data) if huffman else data), pos + length

    def _field(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= 61:
            return _STATIC_TABLE[index - 1]
        entries = self.entries
        if 61 < index <= 61 + len(entries):
            return entries[len(entries) - (index - 61)]  # 62 is the newest
        raise HpackError(f"no table entry {index}")

    def _add(self, field: tuple[bytes, bytes]) -> None:
        size = len(field[0]) + len(field[1]) + 32
        self._evict(size)
        if size <= self.table_size:
            self.entries.append(field)
            self.size += size

    def _evict(self, room: int) -> None:
        entries = self.entries
        while entries and self.size + room > self.table_size:
            name, value = entries.popleft()
            self.size -= len(name) + len(value) + 32


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
