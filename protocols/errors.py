"""Status codes and the protocol's exception tree.

The tree, drawn once::

    PigeonProtocolError                 any failure seen by a protocol user
    ├── ProtocolError                   the byte stream broke the rules
    │   ├── FrameTooLarge               a length prefix above the advertised maximum
    │   ├── MalformedFrame              a frame that is not a valid envelope
    │   ├── HandshakeError              hello/welcome went wrong (version, order)
    │   │   └── NotPigeonServer         the peer answered the hello in another protocol (HTTP, TLS)
    │   └── H2ProtocolError             an HTTP/2 server broke RFC 9113 (`protocols.h2client`)
    │       └── HpackError              ... with a header block that does not decode
    ├── CallError                       a call ended with a non-OK status
    ├── ConnectionClosed                the peer went away (carries the goaway, if any)
    └── BatchFailed                     an event batcher's call failed; carries the events

`CallError` carries a canonical gRPC `Status` and the server's message, which names the bad
field where there is one.
"""

from __future__ import annotations

import enum
from typing import Any

__all__ = [
    "Status",
    "PigeonProtocolError",
    "ProtocolError",
    "FrameTooLarge",
    "MalformedFrame",
    "HandshakeError",
    "NotPigeonServer",
    "CallError",
    "ConnectionClosed",
    "BatchFailed",
    "ErrorCode",
    "H2ProtocolError",
    "HpackError",
    "HeaderListTooLong",
]


class Status(enum.StrEnum):
    """The canonical gRPC status codes, sent on the wire by name."""

    OK = "OK"
    CANCELLED = "CANCELLED"
    UNKNOWN = "UNKNOWN"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    INTERNAL = "INTERNAL"
    UNAVAILABLE = "UNAVAILABLE"
    DATA_LOSS = "DATA_LOSS"
    UNAUTHENTICATED = "UNAUTHENTICATED"

    @property
    def number(self) -> int:
        """The numeric gRPC code (``OK`` is 0, ``UNAUTHENTICATED`` is 16)."""
        return _NUMBERS[self]


_NUMBERS = {status: number for number, status in enumerate(Status)}


class PigeonProtocolError(Exception):
    """Root of every error raised by the protocol package and its clients."""


class ProtocolError(PigeonProtocolError):
    """The byte stream violated the protocol; the connection cannot be trusted any more.

    Attributes:
        events: what the same bytes completed before the violation (a client delivers them,
            so that what it receives does not depend on how the bytes were split into reads).
    """

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.events: list[Any] = []


class FrameTooLarge(ProtocolError):
    """A frame's length prefix exceeds the maximum the receiver advertised.

    Raised before the frame's body is buffered.
    """

    def __init__(self, size: int, limit: int, frames: list[bytes] | None = None) -> None:
        super().__init__(f"frame of {size} bytes exceeds the maximum frame size of {limit} bytes")
        self.size = size
        self.limit = limit
        #: Payloads completed in the same feed before the oversized header.
        self.frames = frames or []


class MalformedFrame(ProtocolError):
    """A complete frame that does not decode to a valid envelope."""


class HandshakeError(ProtocolError):
    """The hello/welcome exchange failed (wrong order, unsupported version)."""


class NotPigeonServer(HandshakeError):
    """The server's first bytes are not a Pigeon frame: something else listens there.

    Attributes:
        speaks: ``"http"`` or ``"tls"`` when the answer shows which protocol it speaks, else None.
    """

    def __init__(self, message: str, speaks: str | None = None) -> None:
        super().__init__(message)
        self.speaks = speaks


class CallError(PigeonProtocolError):
    """A call finished with a non-OK status.

    Attributes:
        status: the canonical status code.
        message: the server's explanation; it names the offending field when there is one.
        field: the path of the offending field (``$.events[3].type``) when known.
        retry_after_ms: with RESOURCE_EXHAUSTED from a server shedding load, the call did
            nothing and may be retried after this many milliseconds (the event batchers do);
            else None.
    """

    def __init__(self, status: Status, message: str, field: str | None = None, retry_after_ms: int | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = Status(status)
        self.message = message
        self.field = field
        self.retry_after_ms = retry_after_ms


class ConnectionClosed(PigeonProtocolError):
    """The connection is gone; calls still in flight on it fail with this.

    Attributes:
        status: the goaway's status if the server sent one, else ``UNAVAILABLE``.
        message: why.
    """

    def __init__(self, message: str, status: Status = Status.UNAVAILABLE) -> None:
        super().__init__(f"{status}: {message}")
        self.status = Status(status)
        self.message = message


class BatchFailed(PigeonProtocolError):
    """A batch of events was not acknowledged; ``events`` lists them so they can be retried.

    Attributes:
        error: why the call failed.
        events: the events of the batch, none of which is known to be stored.
    """

    def __init__(self, error: BaseException, events: list[Any]) -> None:
        super().__init__(f"{len(events)} events were not acknowledged: {error}")
        self.error = error
        self.events = list(events)


# -- HTTP/2 (raised by `protocols.h2client`, which re-exports these) ----------------------------


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


class HpackError(H2ProtocolError):
    """A response header block that does not decode (a COMPRESSION_ERROR)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorCode.COMPRESSION_ERROR)


class HeaderListTooLong(HpackError):
    """A response header list longer than ``max_header_list_size``."""
