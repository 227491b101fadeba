"""The envelope: every frame on the wire is one of these tagged structs.

A frame is a MessagePack map whose ``t`` key names its kind. Call bodies stay encoded
(`msgspec.Raw`) in the envelope and are decoded later against the method's own types, so
a bad body is reported for its call without losing the connection.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

__all__ = [
    "PROTOCOL_VERSION",
    "DEFAULT_MAX_FRAME",
    "CallId",
    "Frame",
    "Hello",
    "Welcome",
    "Call",
    "Reply",
    "Item",
    "End",
    "Error",
    "Cancel",
    "Credit",
    "Ping",
    "Pong",
    "GoAway",
    "AnyFrame",
    "EMPTY_BODY",
]

#: The protocol version this package speaks.
PROTOCOL_VERSION = 1

#: Call ids are chosen by the client: 1 .. 2**63-1; 0 means "the connection itself".
CallId = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]

#: Default largest frame payload either side accepts, in bytes (4 MiB).
DEFAULT_MAX_FRAME = 4 * 1024 * 1024

#: An encoded empty map, the body of calls that take no arguments.
EMPTY_BODY = msgspec.Raw(b"\x80")


class Frame(msgspec.Struct, tag_field="t", frozen=True, kw_only=True, omit_defaults=True):
    """Base of all frames.

    Subclasses repeat ``frozen=True``: msgspec inherits it anyway, but type checkers
    (``dataclass_transform``, PEP 681) only see it when each class says so.
    """


class Hello(Frame, tag="hello", frozen=True):
    """Client → server, first frame on a connection."""

    version: int
    client: str = ""
    #: The client's API key (PROTOCOL.md, section 5.1); None or "": no key (``server.health``
    #: only, on a server with keys). A key that is not valid is refused with a goaway.
    api_key: str | None = None
    #: Largest frame the client accepts; a larger answer becomes a RESOURCE_EXHAUSTED error.
    max_frame: Annotated[int, msgspec.Meta(ge=1024)] = DEFAULT_MAX_FRAME
    #: The sandbox the connection works in (PROTOCOL.md, section 5.2): None, that of its key
    #: (``default`` without keys); with a key, only the key's own may be named.
    sandbox: Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9-]{0,31}\Z")] | None = None


class Welcome(Frame, tag="welcome", frozen=True):
    """Server → client, answer to `Hello`. Nothing else is sent before it."""

    version: int
    server: str
    #: Largest frame (length prefix value) the server accepts.
    max_frame: int
    #: Calls a client may have in flight on this connection; more are refused with
    #: RESOURCE_EXHAUSTED until one of them has its terminal frame.
    max_calls: int


class Call(Frame, tag="call", frozen=True):
    """Client → server: start call ``id`` of ``method`` (``service.method``)."""

    id: CallId
    method: str
    body: msgspec.Raw = EMPTY_BODY
    #: Optional deadline relative to receipt; the call ends with DEADLINE_EXCEEDED after it.
    timeout_ms: Annotated[int, msgspec.Meta(ge=1)] | None = None
    #: For a streamed method: items the server may send before the client grants more with
    #: `Credit`. Absent: no flow control (the server sends as fast as the socket takes).
    window: Annotated[int, msgspec.Meta(ge=1)] | None = None


class Reply(Frame, tag="reply", frozen=True):
    """Server → client: the unary result of call ``id``. Terminal."""

    id: int
    body: msgspec.Raw


class Item(Frame, tag="item", frozen=True):
    """Server → client: one item of a server-streamed call."""

    id: int
    body: msgspec.Raw


class End(Frame, tag="end", frozen=True):
    """Server → client: a server-streamed call finished successfully. Terminal."""

    id: int


class Error(Frame, tag="error", frozen=True):
    """Server → client: call ``id`` failed. Terminal. ``id`` 0 concerns the connection."""

    id: int
    #: A `Status` name; clients map names they do not know to UNKNOWN.
    code: str
    message: str
    field: str | None = None
    #: With RESOURCE_EXHAUSTED when the server sheds load: the call did nothing, and may be
    #: sent again after this many milliseconds.
    retry_after_ms: Annotated[int, msgspec.Meta(ge=0)] | None = None


class Cancel(Frame, tag="cancel", frozen=True):
    """Client → server: abandon call ``id``; the server answers with CANCELLED if still running."""

    id: CallId


class Credit(Frame, tag="credit", frozen=True):
    """Client → server: the client consumed ``items`` more items of stream ``id``; the server
    may send that many more (see `Call.window`)."""

    id: CallId
    items: Annotated[int, msgspec.Meta(ge=1)]


class Ping(Frame, tag="ping", frozen=True):
    """Either way: answered by a `Pong` carrying the same nonce."""

    nonce: int = 0


class Pong(Frame, tag="pong", frozen=True):
    nonce: int = 0


class GoAway(Frame, tag="goaway", frozen=True):
    """Server → client: no new calls will be accepted; the connection closes soon.

    Calls with ids up to ``last_id`` that were received are still answered; later ones are
    answered with UNAVAILABLE and may be retried elsewhere.
    """

    #: A `Status` name.
    code: str
    message: str
    last_id: int = 0


AnyFrame = Hello | Welcome | Call | Reply | Item | End | Error | Cancel | Credit | Ping | Pong | GoAway
