"""Sans-IO protocol state machines for both ends of a connection.

Like h2's ``H2Connection``: ``receive_data(bytes)`` returns a list of events, the ``send_*``
methods queue frames, and ``data_to_send()`` drains the queued bytes. Nothing here blocks,
reads a socket or imports an async library; the Trio server and both clients drive these.

Protocol violations by the peer are answered here: a frame that cannot be decoded gets an
``Error`` for its call (or for call 0 when its id cannot be read), and a stream that cannot be
resynchronised (a frame over the size limit, a broken handshake) gets a ``GoAway`` and a
`Terminated` event, after which the I/O layer flushes and closes.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable
from typing import Any

import msgspec
import msgspec.structs

from .errors import FrameTooLarge, HandshakeError, MalformedFrame, ProtocolError, Status
from .frames import (
    DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
    AnyFrame,
    Call,
    Cancel,
    Credit,
    End,
    Error,
    GoAway,
    Hello,
    Item,
    Ping,
    Pong,
    Reply,
    Welcome,
)
from .framing import DECODE_ERRORS, HEADER_SIZE, FrameDecoder, FrameEncoder, decode_error_text

__all__ = [
    "State",
    "ServerConnection",
    "ClientConnection",
    # events
    "HelloReceived",
    "CallReceived",
    "CallCancelled",
    "CreditGranted",
    "Terminated",
    "Closed",
    "Welcomed",
    "ReplyReceived",
    "ItemReceived",
    "EndReceived",
    "ErrorReceived",
    "GoAwayReceived",
    "PongReceived",
]


class State(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    #: GoAway sent (server) or received (client): no new calls.
    DRAINING = "draining"
    CLOSED = "closed"


# ---------------------------------------------------------------------------------------------
# events


class HelloReceived(msgspec.Struct, frozen=True):
    hello: Hello


class CallReceived(msgspec.Struct, frozen=True):
    call: Call


class CallCancelled(msgspec.Struct, frozen=True):
    id: int


class CreditGranted(msgspec.Struct, frozen=True):
    """The client may receive ``items`` more items of stream ``id``."""

    id: int
    items: int


class Terminated(msgspec.Struct, frozen=True):
    """This end sent a GoAway for a protocol violation; flush, then close."""

    code: Status
    message: str


class Closed(msgspec.Struct, frozen=True):
    """The peer closed its side. ``truncated`` is how many bytes of a partial frame were left."""

    truncated: int = 0


class Welcomed(msgspec.Struct, frozen=True):
    welcome: Welcome


class ReplyReceived(msgspec.Struct, frozen=True):
    id: int
    body: msgspec.Raw


class ItemReceived(msgspec.Struct, frozen=True):
    id: int
    body: msgspec.Raw


class EndReceived(msgspec.Struct, frozen=True):
    id: int


class ErrorReceived(msgspec.Struct, frozen=True):
    id: int
    code: Status
    message: str
    field: str | None = None
    retry_after_ms: int | None = None


class GoAwayReceived(msgspec.Struct, frozen=True):
    goaway: GoAway


class PongReceived(msgspec.Struct, frozen=True):
    nonce: int


class _Salvage(msgspec.Struct):
    """Reads just the call id of a frame that failed to decode as a whole."""

    id: int = 0


_frame_decoder = msgspec.msgpack.Decoder(AnyFrame)
_salvage_decoder = msgspec.msgpack.Decoder(_Salvage)


def _status(name: str) -> Status:
    """A status by name; a name from a newer server that this client does not know is UNKNOWN."""
    try:
        return Status(name)
    except ValueError:
        return Status.UNKNOWN


def _field_of(exc: msgspec.ValidationError) -> str | None:
    text = str(exc)
    marker = " - at `"
    at = text.rfind(marker)
    return text[at + len(marker) : -1] if at >= 0 else None


class _Base:
    def __init__(self, max_frame: int) -> None:
        self.state = State.HANDSHAKE
        self._decoder = FrameDecoder(max_frame)
        self._encoder = FrameEncoder()
        self._out: list[bytes] = []
        self._out_size = 0
        self.frames_in = 0
        self.frames_out = 0

    def _queue(self, frame: AnyFrame) -> None:
        data = self._encoder.frame(frame)
        self._out.append(data)
        self._out_size += len(data)
        self.frames_out += 1

    @property
    def pending_bytes(self) -> int:
        """Bytes queued and not yet taken by `data_to_send`."""
        return self._out_size

    def data_to_send(self) -> bytes:
        """Take every byte queued for the peer (named so because it performs no I/O)."""
        data = b"".join(self._out)
        self._out.clear()
        self._out_size = 0
        return data

    def encode_body(self, obj: Any) -> msgspec.Raw:
        return self._encoder.body(obj)


class ServerConnection(_Base):
    """The server's end of one connection.

    Args:
        server: name and version announced in the welcome.
        max_frame: largest frame accepted (announced in the welcome).
        max_calls: calls a client may keep in flight (announced in the welcome); a call beyond
            it is answered with RESOURCE_EXHAUSTED.
        check_hello: called with the hello before it is welcomed; a ``(code, message)`` it
            returns refuses the connection (a goaway, then `Terminated`), None accepts it.
    """

    def __init__(
        self,
        *,
        server: str,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_calls: int = 256,
        check_hello: Callable[[Hello], tuple[Status, str] | None] | None = None,
    ) -> None:
        super().__init__(max_frame)
        self.check_hello = check_hello
        self.server = server
        self.max_frame = max_frame
        self.max_calls = max_calls
        #: Ids of calls received and not yet answered with a terminal frame.
        self.open_calls: set[int] = set()
        self.last_id = 0
        self.hello: Hello | None = None
        #: The client's frame limit, from its hello.
        self.peer_max_frame = DEFAULT_MAX_FRAME

    # -- input ------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> list[Any]:
        """Feed bytes from the client; ``b""`` means the client closed its side."""
        if self.state is State.CLOSED:
            return []
        if not data:
            truncated = self._decoder.buffered
            self.state = State.CLOSED
            return [Closed(truncated)]
        too_large: FrameTooLarge | None = None
        try:
            payloads = self._decoder.feed(data)
        except FrameTooLarge as exc:
            payloads, too_large = exc.frames, exc
        events: list[Any] = []
        for payload in payloads:
            self.frames_in += 1
            events.extend(self._receive_frame(payload))
            if self.state is State.CLOSED:
                return events
        if too_large is not None:
            events.extend(self._terminate(Status.RESOURCE_EXHAUSTED, str(too_large)))
        return events

    def _receive_frame(self, payload: bytes) -> list[Any]:
        try:
            frame = _frame_decoder.decode(payload)
        except DECODE_ERRORS as exc:
            return self._malformed(payload, exc)
        if self.state is State.HANDSHAKE:
            return self._receive_hello(frame)
        match frame:
            case Call():
                return self._receive_call(frame)
            case Cancel(id=call_id):
                return [CallCancelled(call_id)] if call_id in self.open_calls else []
            case Credit(id=call_id, items=items):
                return [CreditGranted(call_id, items)] if call_id in self.open_calls else []
            case Ping(nonce=nonce):
                self._queue(Pong(nonce=nonce))
                return []
            case Pong():
                return []
            case _:
                self._queue(
                    Error(
                        id=0,
                        code=Status.INVALID_ARGUMENT,
                        message=f"a client may not send a {frame.__struct_config__.tag!r} frame",
                        field="$.t",
                    )
                )
                return []

    def _malformed(self, payload: bytes, exc: Exception) -> list[Any]:
        try:
            call_id = _salvage_decoder.decode(payload).id
        except DECODE_ERRORS:
            call_id = 0
        what = decode_error_text(exc)
        if self.state is State.HANDSHAKE:
            return self._terminate(Status.INVALID_ARGUMENT, f"malformed hello frame: {what}")
        field = _field_of(exc) if isinstance(exc, msgspec.ValidationError) else None
        if call_id <= 0 or call_id in self.open_calls:
            call_id = 0
        self._queue(Error(id=call_id, code=Status.INVALID_ARGUMENT, message=f"malformed frame: {what}", field=field))
        return []

    def _receive_hello(self, frame: AnyFrame) -> list[Any]:
        if not isinstance(frame, Hello):
            tag = frame.__struct_config__.tag
            return self._terminate(Status.FAILED_PRECONDITION, f"expected a hello frame first, got {tag!r}")
        if frame.version != PROTOCOL_VERSION:
            return self._terminate(
                Status.FAILED_PRECONDITION,
                f"unsupported protocol version {frame.version}; this server speaks version {PROTOCOL_VERSION}",
            )
        if self.check_hello is not None:
            refusal = self.check_hello(frame)
            if refusal is not None:
                return self._terminate(*refusal)
        self.hello = frame
        self.peer_max_frame = frame.max_frame
        self.state = State.OPEN
        self._queue(
            Welcome(version=PROTOCOL_VERSION, server=self.server, max_frame=self.max_frame, max_calls=self.max_calls)
        )
        return [HelloReceived(frame)]

    def _receive_call(self, call: Call) -> list[Any]:
        if call.id in self.open_calls:
            # Answered on id 0: an answer on the call's own id would look like the first
            # call's answer to the client.
            self._queue(
                Error(
                    id=0,
                    code=Status.INVALID_ARGUMENT,
                    message=f"call id {call.id} is already in flight on this connection; "
                    "this second call was rejected and the first one continues",
                    field="$.id",
                )
            )
            return []
        if self.state is State.DRAINING:
            self._queue(
                Error(
                    id=call.id,
                    code=Status.UNAVAILABLE,
                    message="the server is shutting down and accepts no new calls; retry on a new connection",
                )
            )
            return []
        if len(self.open_calls) >= self.max_calls:
            self._queue(
                Error(
                    id=call.id,
                    code=Status.RESOURCE_EXHAUSTED,
                    message=f"{self.max_calls} calls are already in flight on this connection (welcome.max_calls); "
                    "wait for an answer before starting another",
                )
            )
            return []
        self.open_calls.add(call.id)
        if call.id > self.last_id:
            self.last_id = call.id
        return [CallReceived(call)]

    def _terminate(self, code: Status, message: str) -> list[Any]:
        self._queue(GoAway(code=code, message=message, last_id=self.last_id))
        self.state = State.CLOSED
        return [Terminated(code, message)]

    # -- output -----------------------------------------------------------------------------

    def send_reply(self, call_id: int, body: Any) -> bool:
        """Queue the unary result of a call. False if the call is no longer open.

        Raises:
            Whatever encoding ``body`` raises; the call is then still open (for an error).
        """
        if call_id not in self.open_calls:
            return False
        encoded = self._encoder.body(body)
        self.open_calls.discard(call_id)
        self._queue_answer(Reply(id=call_id, body=encoded))
        return True

    def send_item(self, call_id: int, body: Any) -> bool:
        """Queue one item of a streamed call. False if the call is no longer open."""
        if call_id not in self.open_calls:
            return False
        self._queue_answer(Item(id=call_id, body=self._encoder.body(body)))
        return True

    def _queue_answer(self, frame: Reply | Item) -> None:
        data = self._encoder.frame(frame)
        size = len(data) - HEADER_SIZE
        if size > self.peer_max_frame:
            # Sending it would break the client's connection: fail the call instead.
            self.open_calls.discard(frame.id)
            self._queue(
                Error(
                    id=frame.id,
                    code=Status.RESOURCE_EXHAUSTED,
                    message=f"the answer is {size} bytes; this client accepts frames of at most "
                    f"{self.peer_max_frame} bytes (hello.max_frame)",
                )
            )
            return
        self._out.append(data)
        self._out_size += len(data)
        self.frames_out += 1

    def send_end(self, call_id: int) -> bool:
        if call_id not in self.open_calls:
            return False
        self.open_calls.discard(call_id)
        self._queue(End(id=call_id))
        return True

    def send_error(
        self, call_id: int, code: Status, message: str, field: str | None = None, retry_after_ms: int | None = None
    ) -> bool:
        if call_id not in self.open_calls:
            return False
        self.open_calls.discard(call_id)
        self._queue(Error(id=call_id, code=code, message=message, field=field, retry_after_ms=retry_after_ms))
        return True

    def send_goaway(self, code: Status, message: str) -> None:
        """Announce that no new calls are accepted; calls already open are still answered."""
        if self.state in (State.OPEN, State.HANDSHAKE):
            self._queue(GoAway(code=code, message=message, last_id=self.last_id))
            self.state = State.DRAINING


class ClientConnection(_Base):
    """The client's end of one connection: allocates call ids and tracks the handshake.

    Call `hello` first and send its bytes; calls may be queued before the welcome arrives.
    """

    def __init__(self, *, client: str = "pigeon-client", api_key: str | None = None, max_frame: int = DEFAULT_MAX_FRAME,
                 sandbox: str | None = None) -> None:
        super().__init__(max_frame)
        self.client = client
        self.api_key = api_key
        self.sandbox = sandbox
        self.welcome: Welcome | None = None
        self.goaway: GoAway | None = None
        self._ids = itertools.count(1)
        #: The server's frame limit, known after the welcome (the default until then).
        self.server_max_frame = DEFAULT_MAX_FRAME

    def hello(self) -> None:
        self._queue(
            Hello(version=PROTOCOL_VERSION, client=self.client, api_key=self.api_key, max_frame=self._decoder.max_frame,
                  sandbox=self.sandbox)
        )

    def start_call(self, method: str, body: Any, *, timeout_ms: int | None = None, window: int | None = None) -> int:
        """Queue a call and return its id.

        Raises:
            FrameTooLarge: the encoded call exceeds the server's frame limit; nothing was queued.
            HandshakeError: the connection is draining or closed.
        """
        if self.state in (State.DRAINING, State.CLOSED):
            reason = self.goaway.message if self.goaway else "connection closed"
            raise HandshakeError(f"cannot start {method}: {reason}")
        call_id = next(self._ids)
        raw = body if isinstance(body, msgspec.Raw) else self._encoder.body(body)
        data = self._encoder.frame(Call(id=call_id, method=method, body=raw, timeout_ms=timeout_ms, window=window))
        if len(data) - HEADER_SIZE > self.server_max_frame:
            raise FrameTooLarge(len(data) - HEADER_SIZE, self.server_max_frame)
        self._out.append(data)
        self._out_size += len(data)
        self.frames_out += 1
        return call_id

    def cancel(self, call_id: int) -> None:
        if self.state is not State.CLOSED:
            self._queue(Cancel(id=call_id))

    def grant(self, call_id: int, items: int) -> None:
        """Let the server send ``items`` more items of stream ``call_id``."""
        if self.state is not State.CLOSED:
            self._queue(Credit(id=call_id, items=items))

    def ping(self, nonce: int = 0) -> None:
        self._queue(Ping(nonce=nonce))

    def receive_data(self, data: bytes | bytearray) -> list[Any]:
        """Feed bytes from the server; ``b""`` means the server closed.

        Raises:
            ProtocolError: the server sent something this client cannot accept; its
                ``events`` are those of the frames before it in ``data`` (deliver them).
        """
        if not data:
            truncated = self._decoder.buffered
            self.state = State.CLOSED
            return [Closed(truncated)]
        too_large: FrameTooLarge | None = None
        try:
            payloads = self._decoder.feed(data)
        except FrameTooLarge as exc:
            payloads, too_large = exc.frames, exc
        events: list[Any] = []
        try:
            for payload in payloads:
                self.frames_in += 1
                self._receive_frame(payload, events)
            if too_large is not None:
                raise too_large
        except ProtocolError as exc:
            exc.events = events
            raise
        return events

    def _receive_frame(self, payload: bytes, events: list[Any]) -> None:
        """Decode one frame from the server and add its event (if any) to ``events``."""
        try:
            frame = _frame_decoder.decode(payload)
        except DECODE_ERRORS as exc:
            raise MalformedFrame(f"malformed frame from server: {decode_error_text(exc)}") from exc
        match frame:
            case Reply(id=i, body=b):
                events.append(ReplyReceived(i, b))
            case Item(id=i, body=b):
                events.append(ItemReceived(i, b))
            case End(id=i):
                events.append(EndReceived(i))
            case Error(id=i, code=c, message=m, field=f, retry_after_ms=r):
                events.append(ErrorReceived(i, _status(c), m, f, r))
            case Welcome():
                if self.welcome is not None:
                    raise HandshakeError("the server sent a second welcome")
                if frame.version != PROTOCOL_VERSION:
                    raise HandshakeError(f"server speaks protocol version {frame.version}, not {PROTOCOL_VERSION}")
                self.welcome = frame
                self.server_max_frame = frame.max_frame
                if self.state is State.HANDSHAKE:
                    self.state = State.OPEN
                events.append(Welcomed(frame))
            case GoAway():
                frame = msgspec.structs.replace(frame, code=_status(frame.code))
                self.goaway = frame
                self.state = State.DRAINING
                events.append(GoAwayReceived(frame))
            case Ping(nonce=n):
                self._queue(Pong(nonce=n))
            case Pong(nonce=n):
                events.append(PongReceived(n))
            case _:
                raise MalformedFrame(f"a server may not send a {frame.__struct_config__.tag!r} frame")
