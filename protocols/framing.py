"""Length-prefixed framing: 4-byte big-endian length, then that many bytes of MessagePack.

Sans-IO, in h2's manner: `FrameDecoder.feed` takes bytes and returns complete frame payloads;
nothing here reads or writes a socket.
"""

from __future__ import annotations

import msgspec

from .errors import FrameTooLarge
from .frames import DEFAULT_MAX_FRAME, Frame

__all__ = ["HEADER_SIZE", "DEFAULT_MAX_FRAME", "DECODE_ERRORS", "decode_error_text", "FrameEncoder", "FrameDecoder"]

HEADER_SIZE = 4

#: What decoding untrusted MessagePack (or JSON) with msgspec can raise: its own errors, and
#: RecursionError for input nested deeper than the interpreter's stack allows (msgspec checks
#: the depth as it goes, so a 1 KB frame of nested arrays raises it, wherever it is decoded).
DECODE_ERRORS = (msgspec.DecodeError, RecursionError)


def decode_error_text(exc: Exception) -> str:
    """What was wrong with input that raised one of `DECODE_ERRORS`."""
    if isinstance(exc, RecursionError):
        return "nested too deeply (arrays or maps inside each other beyond what the decoder follows)"
    return str(exc)


class FrameEncoder:
    """Encodes frames (or bodies) with one reused msgspec encoder."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._buffer = bytearray(HEADER_SIZE)

    def frame(self, frame: Frame) -> bytes:
        """Return ``frame`` with its length prefix, ready for the wire."""
        buffer = self._buffer
        self._encoder.encode_into(frame, buffer, HEADER_SIZE)
        # The length comes from the buffer, not from a separately encoded message.
        buffer[:HEADER_SIZE] = (len(buffer) - HEADER_SIZE).to_bytes(HEADER_SIZE, "big")
        data = bytes(buffer)
        del buffer[HEADER_SIZE:]
        return data

    def body(self, obj: object) -> msgspec.Raw:
        """Encode a call body or reply body for embedding in a frame."""
        return msgspec.Raw(self._encoder.encode(obj))


class FrameDecoder:
    """Splits a byte stream into frame payloads.

    Args:
        max_frame: the largest payload accepted. A header announcing more raises
            `FrameTooLarge` as soon as the header is complete, before the body is buffered.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame (a partial frame)."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        """Add ``data`` and return every frame payload now complete, in order."""
        buffer = self._buffer
        buffer += data
        frames: list[bytes] = []
        start = 0
        end = len(buffer)
        while end - start >= HEADER_SIZE:
            size = int.from_bytes(buffer[start : start + HEADER_SIZE], "big")
            if size > self.max_frame:
                del buffer[:]
                raise FrameTooLarge(size, self.max_frame, frames)
            if end - start - HEADER_SIZE < size:
                break
            start += HEADER_SIZE
            frames.append(bytes(buffer[start : start + size]))
            start += size
        if start:
            del buffer[:start]
        return frames
