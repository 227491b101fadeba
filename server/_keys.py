"""Every LMDB key Pigeon writes is built here (schema version 1).

Layout, one named database per record kind:

    meta        ascii name                         -> versioned value
    identities  utf-8 "namespace:value"            -> profile id (8 bytes)
    profiles    profile id (u64 BE)                -> versioned ProfileRecord
    tokens      utf-8 app + NUL + token            -> profile id (8 bytes)
    events      profile id + ts µs + seq (3 × u64) -> versioned EventRecord

Integers are fixed-width big-endian so byte order is numeric order: a profile's events are one
contiguous range sorted by time. The profile key is derived from the identity here and only
here, so that partitioning profiles by identity (scale-out) has one place to change.
"""

from __future__ import annotations

import struct

from ._errors import InvalidArgument

__all__ = [
    "MAX_KEY_BYTES",
    "identity_key",
    "pid_key",
    "pid_of",
    "token_key",
    "event_key",
    "event_prefix",
    "ts_seq",
    "split_event_key",
]

#: LMDB's default key limit is 511 bytes.
MAX_KEY_BYTES = 511

_U64 = struct.Struct(">Q")
_EVENT = struct.Struct(">QQQ")
_TS_SEQ = struct.Struct(">QQ")


def identity_key(identity: str, field: str = "$.identity") -> bytes:
    key = identity.encode()
    if len(key) > MAX_KEY_BYTES:
        raise InvalidArgument(
            f"{field}: the identity is {len(key)} bytes long; at most {MAX_KEY_BYTES} bytes are allowed", field=field
        )
    return key


def pid_key(pid: int) -> bytes:
    return _U64.pack(pid)


def pid_of(key: bytes) -> int:
    return _U64.unpack(key)[0]


def token_key(app: str, token: str) -> bytes:
    key = f"{app}\x00{token}".encode()
    if len(key) > MAX_KEY_BYTES:
        raise InvalidArgument(
            f"app id and token together are {len(key)} bytes; at most {MAX_KEY_BYTES} are allowed", field="$.token"
        )
    return key


def event_key(pid: int, ts_us: int, seq: int) -> bytes:
    return _EVENT.pack(pid, ts_us, seq)


def ts_seq(ts_us: int, seq: int) -> bytes:
    """The part of an event key after the profile id (for callers that hold the id's bytes)."""
    return _TS_SEQ.pack(ts_us, seq)


def event_prefix(pid: int, ts_us: int = 0) -> bytes:
    """The first possible key of ``pid``'s events at or after ``ts_us``."""
    return _EVENT.pack(pid, ts_us, 0)


def split_event_key(key: bytes) -> tuple[int, int, int]:
    return _EVENT.unpack(key)  # type: ignore[return-value]
