"""Pigeon's socket protocol: frames, framing, typed methods and sans-IO connections.

Everything at this level is sans-IO (bytes in, events out; no trio or asyncio import). The
clients live beside it: `protocols.trio_client` and `protocols.asyncio_client`. The wire
format is specified in ``PROTOCOL.md`` next to this file.

`protocols.h2client` is the other codec here: the HTTP/2 client the push senders speak to
APNs and FCM (imported on its own; not part of this package's names).
"""

from . import api as api
from .connection import ClientConnection as ClientConnection
from .connection import ServerConnection as ServerConnection
from .errors import CallError as CallError
from .errors import ConnectionClosed as ConnectionClosed
from .errors import FrameTooLarge as FrameTooLarge
from .errors import HandshakeError as HandshakeError
from .errors import MalformedFrame as MalformedFrame
from .errors import PigeonProtocolError as PigeonProtocolError
from .errors import ProtocolError as ProtocolError
from .errors import Status as Status
from .frames import PROTOCOL_VERSION as PROTOCOL_VERSION
from .framing import FrameDecoder as FrameDecoder
from .framing import FrameEncoder as FrameEncoder

__all__ = [
    "api",
    "ClientConnection",
    "ServerConnection",
    "CallError",
    "ConnectionClosed",
    "FrameTooLarge",
    "HandshakeError",
    "MalformedFrame",
    "PigeonProtocolError",
    "ProtocolError",
    "Status",
    "PROTOCOL_VERSION",
    "FrameDecoder",
    "FrameEncoder",
]
